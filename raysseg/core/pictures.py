"""Pictures for logging: label colouring, overlays, image grids and confusion heatmaps."""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from raysseg.core.metrics import EvalInputError

_GOLDEN = 0.6180339887498949


def palette(n: int) -> np.ndarray:
    """n distinct, non-black colours, uint8 (n, 3). Colour i does not depend on n."""
    colours = []
    for i in range(n):
        hue = (i * _GOLDEN) % 1.0
        saturation = (0.95, 0.6, 0.8)[(i // 2) % 3]
        value = (1.0, 0.7)[i % 2]
        colours.append(colorsys.hsv_to_rgb(hue, saturation, value))
    return np.round(np.asarray(colours, dtype=np.float64).reshape(n, 3) * 255).astype(np.uint8)


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise EvalInputError(f"{name}: labels must be an integer (H, W) array, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def colorize(labels: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """Integer labels (H, W) -> uint8 (H, W, 3); ignore_index and negative labels are black."""
    labels = _check_labels(labels, "colorize")
    valid = labels >= 0
    if ignore_index is not None:
        valid &= labels != ignore_index
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    if valid.any():
        out[valid] = palette(int(labels[valid].max()) + 1)[labels[valid]]
    return out


def overlay(
    image: np.ndarray, labels: np.ndarray, alpha: float = 0.5, ignore_index: int | None = None
) -> np.ndarray:
    """Blend label colours onto an image: uint8 (H, W, 3) + (H, W) -> uint8 (H, W, 3).
    Ignore (and negative) pixels keep the plain image."""
    image = np.asarray(image)
    labels = _check_labels(labels, "overlay")
    if image.dtype != np.uint8 or image.shape != labels.shape + (3,):
        raise EvalInputError(
            f"overlay: image must be uint8 {labels.shape + (3,)} to match labels, got {image.dtype} {image.shape}"
        )
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colorize(labels, ignore_index).astype(np.float32)
    keep = labels < 0 if ignore_index is None else (labels < 0) | (labels == ignore_index)
    blended[keep] = image[keep]
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def overlay_grid(
    images: list[np.ndarray],
    preds: list[np.ndarray],
    targets: list[np.ndarray] | None,
    ignore_index: int | None,
    gap: int = 2,
) -> np.ndarray:
    """One row per image: image | prediction overlay | colourised ground truth (if given).

    Predictions should already be in class ids (see metrics.apply_mapping) so colours
    match the ground truth. Cells of different sizes are padded; white gaps between.
    Returns uint8 (rows * cell_h + gaps, cols * cell_w + gaps, 3).
    """
    if not images or len(preds) != len(images) or (targets is not None and len(targets) != len(images)):
        raise EvalInputError(
            f"overlay_grid: need as many preds/targets as images (>0), got {len(images)} images, "
            f"{len(preds)} preds, {None if targets is None else len(targets)} targets"
        )
    rows = []
    for i, (image, pred) in enumerate(zip(images, preds)):
        cells = [np.asarray(image), overlay(image, pred, ignore_index=ignore_index)]
        if targets is not None:
            cells.append(colorize(targets[i], ignore_index))
        rows.append(cells)
    cell_h = max(cell.shape[0] for row in rows for cell in row)
    cell_w = max(cell.shape[1] for row in rows for cell in row)
    n_cols = len(rows[0])
    grid = np.full(
        (len(rows) * (cell_h + gap) - gap, n_cols * (cell_w + gap) - gap, 3), 255, dtype=np.uint8
    )
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            y, x = r * (cell_h + gap), c * (cell_w + gap)
            grid[y : y + cell_h, x : x + cell_w] = 0
            grid[y : y + cell.shape[0], x : x + cell.shape[1]] = cell
    return grid


def confusion_figure(
    conf: np.ndarray, class_names: list[str], title: str, pred_names: list[str] | None = None
) -> bytes:
    """PNG heatmap of a confusion matrix, each ground-truth class normalised to 1.

    conf: (n_pred, n_classes) with rows = predictions, as from metrics.confusion_matrix or
    metrics.matched_confusion. Drawn with classes as rows and predictions as columns.
    Columns are labelled pred_names, else class_names when n_pred == n_classes, else ids.
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[1] != len(class_names):
        raise EvalInputError(
            f"confusion_figure: conf must be (n_pred, {len(class_names)}) for {len(class_names)} class names, "
            f"got {conf.shape}"
        )
    if pred_names is None:
        pred_names = class_names if conf.shape[0] == len(class_names) else [str(i) for i in range(conf.shape[0])]
    if len(pred_names) != conf.shape[0]:
        raise EvalInputError(f"confusion_figure: {len(pred_names)} pred_names for {conf.shape[0]} predicted ids")
    by_class = conf.T
    totals = by_class.sum(axis=1, keepdims=True)
    normalised = np.divide(by_class, totals, out=np.zeros_like(by_class), where=totals > 0)

    n_rows, n_cols = normalised.shape
    fig = Figure(figsize=(2 + 0.45 * n_cols, 1.5 + 0.4 * n_rows), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n_cols), pred_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n_rows), class_names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    if n_rows * n_cols <= 900:
        for r in range(n_rows):
            for c in range(n_cols):
                value = normalised[r, c]
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=5,
                        color="white" if value > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def sweep_figure(rows: list[dict], metric: str, mode: str, curves: dict[str, tuple[list, list]]) -> bytes:
    """PNG of a sweep: the metric against each swept key (one panel per key, the best trial
    ringed; trials stopped early hollow) and, when given, each trial's metric per report."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    scored = [r for r in rows if isinstance(r.get(metric), (int, float))]
    finished = [r for r in scored if r["status"] == "finished"]
    sign = 1 if mode == "max" else -1
    best = max(finished, key=lambda r: sign * r[metric]) if finished else None
    panels = len(keys) + (1 if curves else 0)
    fig = Figure(figsize=(3.2 * max(panels, 1), 3.0), dpi=100)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, panels, i + 1)
        values = [r["overrides"].get(key) for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ticks = sorted({str(v) for v in values})
        xs = [v if numeric else ticks.index(str(v)) for v in values]
        for x, r in zip(xs, scored):
            done = r["status"] == "finished"
            ax.scatter([x], [r[metric]], s=30, facecolors="tab:blue" if done else "none", edgecolors="tab:blue")
            if r is best:
                ax.scatter([x], [r[metric]], s=160, facecolors="none", edgecolors="tab:red", linewidths=1.5)
        if not numeric:
            ax.set_xticks(range(len(ticks)), ticks, rotation=45, fontsize=7)
        elif values and min(values) > 0 and max(values) / min(values) >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
    if curves:
        ax = fig.add_subplot(1, panels, panels)
        for trial, (steps, values) in sorted(curves.items()):
            ax.plot(steps, values, marker=".", linewidth=1, label=trial[-5:])
        ax.set_xlabel("report (epochs, then final)", fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        if len(curves) <= 12:
            ax.legend(fontsize=6)
    fig.suptitle(f"{len(rows)} trials; {metric} ({mode}); red ring = best, hollow = stopped early", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, creating parent folders."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise EvalInputError(f"save_png: need uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape} for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
