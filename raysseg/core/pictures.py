"""Pictures for logging: label colouring, overlays, image grids and confusion heatmaps."""

from __future__ import annotations

import colorsys
import io
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
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


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


MIN_CELL = 160  # overlay cells narrower than this are enlarged (nearest) by an integer factor, so text fits


def _enlarge(cell: np.ndarray, factor: int) -> np.ndarray:
    return cell if factor == 1 else cell.repeat(factor, axis=0).repeat(factor, axis=1)


def _legend_band(entries: list[tuple[np.ndarray, str]], width: int, font, swatch: int = 14, pad: int = 6) -> np.ndarray:
    """White band of colour swatches with their names, flowing into as many lines as ``width`` needs."""
    from PIL import ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = [(colour, text, swatch + 4 + int(measure.textlength(text, font=font)) + 14) for colour, text in entries]
    lines, line, used = [], [], pad
    for item in items:
        if line and used + item[2] > width - pad:
            lines.append(line)
            line, used = [], pad
        line.append(item)
        used += item[2]
    if line:
        lines.append(line)
    line_h = swatch + 6
    band = Image.new("RGB", (width, pad + line_h * len(lines) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        x, y = pad, pad + i * line_h
        for colour, text, w in line:
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
            draw.text((x + swatch + 4, y + swatch // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
            x += w
    return np.asarray(band)


def overlay_grid(
    images: list[np.ndarray],
    preds: list[np.ndarray],
    targets: list[np.ndarray] | None,
    ignore_index: int | None,
    gap: int = 2,
    titles: list[str] | None = None,
    legend: dict[int, str] | None = None,
) -> np.ndarray:
    """A picture a person can read: column titles on top, one row per image (image | prediction overlay |
    colourised ground truth, if given), and a colour legend at the bottom.

    Predictions should already be in class ids (see metrics.apply_mapping) so colours match the ground
    truth. ``titles``: one per column (default: image, prediction / clusters, ground truth). ``legend``:
    label id -> name for each colour (default: every id present, "cluster i" without targets, "class i"
    with them). Cells narrower than MIN_CELL are enlarged by an integer factor (nearest); cells of
    different sizes are padded; white gaps between.
    Returns uint8 (title band + rows * (cell_h + gap) - gap + legend band, cols * (cell_w + gap) - gap, 3).
    """
    from PIL import ImageDraw

    if not images or len(preds) != len(images) or (targets is not None and len(targets) != len(images)):
        raise EvalInputError(
            f"overlay_grid: need as many preds/targets as images (>0), got {len(images)} images, "
            f"{len(preds)} preds, {None if targets is None else len(targets)} targets"
        )
    n_cols = 2 if targets is None else 3
    titles = titles or ["image", "clusters" if targets is None else "prediction", "ground truth"][:n_cols]
    if len(titles) != n_cols:
        raise EvalInputError(f"overlay_grid: {len(titles)} titles for {n_cols} columns")
    rows = []
    for i, (image, pred) in enumerate(zip(images, preds)):
        cells = [np.asarray(image), overlay(image, pred, ignore_index=ignore_index)]
        if targets is not None:
            cells.append(colorize(targets[i], ignore_index))
        rows.append(cells)
    raw_w = max(cell.shape[1] for row in rows for cell in row)
    factor = max(1, min(4, -(-MIN_CELL // raw_w)))
    rows = [[_enlarge(cell, factor) for cell in row] for row in rows]
    cell_h = max(cell.shape[0] for row in rows for cell in row)
    cell_w = max(cell.shape[1] for row in rows for cell in row)
    width = n_cols * (cell_w + gap) - gap
    font = _font(13)
    title_h = 22
    grid = np.full((title_h + len(rows) * (cell_h + gap) - gap, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            y, x = title_h + r * (cell_h + gap), c * (cell_w + gap)
            grid[y : y + cell_h, x : x + cell_w] = 0
            grid[y : y + cell.shape[0], x : x + cell.shape[1]] = cell
    picture = Image.fromarray(grid)
    draw = ImageDraw.Draw(picture)
    for c, title in enumerate(titles):
        draw.text((c * (cell_w + gap) + cell_w // 2, title_h // 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    ids = sorted({int(v) for labels in [*preds, *(targets or [])] for v in np.unique(np.asarray(labels))
                  if v >= 0 and v != ignore_index})
    if legend is None:
        legend = {i: f"{'cluster' if targets is None else 'class'} {i}" for i in ids}
    shown = sorted(set(legend) & set(ids)) or sorted(legend)
    if not shown:
        return np.asarray(picture)
    colours = palette(max(shown) + 1)
    band = _legend_band([(colours[i], legend[i]) for i in shown], width, font)
    return np.concatenate([np.asarray(picture), band])


def matched_legend(class_names: list[str], mapping: list[int] | np.ndarray) -> dict[int, str]:
    """Legend of an evaluation overlay: class id -> "name (clusters i, j)" for the clusters matched to it
    (``mapping``: cluster id -> class id, -1 unmatched)."""
    legend = {}
    for c, name in enumerate(class_names):
        clusters = [str(k) for k, m in enumerate(np.asarray(mapping).tolist()) if m == c]
        legend[c] = f"{name} (cluster{'s' if len(clusters) > 1 else ''} {', '.join(clusters)})" if clusters else name
    return legend


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
    cell = 0.55 if max(n_rows, n_cols) <= 30 else 0.3  # inches per cell: room for a two-digit percentage
    fig = Figure(figsize=(3.2 + cell * n_cols, 2.4 + cell * n_rows), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(normalised * 100, cmap="Blues", vmin=0, vmax=100)
    label_size = 9 if max(n_rows, n_cols) <= 30 else 6
    ax.set_xticks(range(n_cols), pred_names, rotation=60, ha="right", rotation_mode="anchor", fontsize=label_size)
    ax.set_yticks(range(n_rows), class_names, fontsize=label_size)
    ax.set_xlabel("prediction", fontsize=10)
    ax.set_ylabel("ground truth", fontsize=10)
    ax.set_title(f"{title}\n% of each ground-truth class's pixels", fontsize=10)
    if n_rows * n_cols <= 900:  # percentages in the cells; empty cells (under 0.5 %) stay blank
        for r in range(n_rows):
            for c in range(n_cols):
                value = 100 * normalised[r, c]
                if value >= 0.5:
                    ax.text(c, r, f"{value:.0f}", ha="center", va="center", fontsize=label_size,
                            color="white" if value > 50 else "black")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("%", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def sweep_figure(rows: list[dict], metric: str, mode: str, curves: dict[str, tuple[list, list]]) -> bytes:
    """PNG of a sweep: the metric against each swept key (one panel per key, at most 3 panels a line; the
    best trial ringed in red; trials stopped early hollow) and, when given, each trial's metric per report,
    its line named by the trial's values."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    scored = [r for r in rows if isinstance(r.get(metric), (int, float))]
    finished = [r for r in scored if r["status"] == "finished"]
    sign = 1 if mode == "max" else -1
    best = max(finished, key=lambda r: sign * r[metric]) if finished else None
    panels = max(len(keys) + (1 if curves else 0), 1)
    n_cols = min(panels, 3)
    n_lines = -(-panels // n_cols)
    fig = Figure(figsize=(4.6 * n_cols + (2.2 if curves else 0), 3.8 * n_lines + 0.6), dpi=110)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(n_lines, n_cols, i + 1)
        values = [r["overrides"].get(key) for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ticks = sorted({str(v) for v in values})
        xs = [v if numeric else ticks.index(str(v)) for v in values]
        for x, r in zip(xs, scored):
            done = r["status"] == "finished"
            ax.scatter([x], [r[metric]], s=45, facecolors="tab:blue" if done else "none", edgecolors="tab:blue")
            if r is best:
                ax.scatter([x], [r[metric]], s=220, facecolors="none", edgecolors="tab:red", linewidths=2)
        if not numeric:
            ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=9)
        elif values and min(values) > 0 and max(values) / min(values) >= 20:
            ax.set_xscale("log")
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
        ax.set_xlabel(key, fontsize=10)
        ax.set_ylabel(metric, fontsize=10)
        ax.set_title(f"{metric} by {key}", fontsize=10)
    if curves:
        ax = fig.add_subplot(n_lines, n_cols, len(keys) + 1)
        names = {r.get("trial"): ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in r["overrides"].items())
                 for r in rows}
        for trial, (steps, values) in sorted(curves.items()):
            ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2, label=names.get(trial) or trial[-8:])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("report (epochs, then final)", fontsize=10)
        ax.set_ylabel(metric, fontsize=10)
        ax.set_title(f"{metric} per report", fontsize=10)
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
        if len(curves) <= 12:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    stopped = sum(r["status"] == "stopped early" for r in rows)
    best_text = f"best {_short(best[metric])}" if best else "no finished trial"
    fig.suptitle(f"{len(rows)} trials ({len(finished)} finished, {stopped} stopped early); {metric}, "
                 f"{'higher' if mode == 'max' else 'lower'} is better; {best_text} (red ring); hollow = stopped early",
                 fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def per_class_figure(rows: dict[str, tuple[list[float], list[float]]], class_names: list[str], title: str) -> bytes:
    """PNG of grouped horizontal bars: for each class, one bar per row (a method or a baseline) of its IoU in
    [0, 1] (mean, with the std as an error bar). rows: label -> (means, stds), each of len(class_names)."""
    for label, (means, stds) in rows.items():
        if len(means) != len(class_names) or len(stds) != len(class_names):
            raise EvalInputError(f"per_class_figure: row {label!r} has {len(means)} means and {len(stds)} stds "
                                 f"for {len(class_names)} classes")
    n_rows, n_classes = len(rows), len(class_names)
    height = 0.8 / max(n_rows, 1)
    fig = Figure(figsize=(8.5, 1.2 + 0.09 * n_rows * n_classes + 0.25 * n_classes), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bar_colours = matplotlib.colormaps["tab10" if n_rows <= 10 else "tab20"]  # no two rows share a colour up to 20
    for i, (label, (means, stds)) in enumerate(rows.items()):
        ys = np.arange(n_classes) - 0.4 + height * (i + 0.5)
        ax.barh(ys, 100 * np.asarray(means), height=height, xerr=100 * np.asarray(stds), label=label,
                color=bar_colours(i % bar_colours.N), error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.set_yticks(range(n_classes), class_names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("IoU (%)", fontsize=10)
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("\n".join(textwrap.wrap(title, 95)), fontsize=10)  # a long title wraps instead of being cut
    ax.legend(fontsize=8, loc="lower right")
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
