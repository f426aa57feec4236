"""Pictures a person can read (issue 18, item 11): overlays with column titles and a colour legend,
a ground-truth column in evaluation overlays, readable confusion-matrix cells, a legible sweep.png.
Layout is checked (sizes, bands, where colours appear), not pixels."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from raysseg.core.pictures import (
    MIN_CELL, confusion_figure, matched_legend, overlay_grid, palette, sweep_figure,
)


def _scene(h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((h, w, 3), 90, np.uint8)
    labels = np.zeros((h, w), np.int64)
    labels[:, w // 2:] = 2
    labels[: h // 4] = 255
    return image, labels


def _bands(grid: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) row of each run of rows that are not all white."""
    busy = (grid < 250).any(axis=(1, 2))
    runs, start = [], None
    for y, b in enumerate(busy):
        if b and start is None:
            start = y
        if not b and start is not None:
            runs.append((start, y - 1))
            start = None
    if start is not None:
        runs.append((start, len(busy) - 1))
    return runs


def _has_colour(region: np.ndarray, colour: np.ndarray) -> bool:
    return bool((region.reshape(-1, 3) == colour).all(axis=1).any())


def test_evaluation_overlay_has_titles_a_ground_truth_column_and_a_legend_of_matched_classes():
    image, labels = _scene()
    mapping = [2, -1, 0, 2]  # clusters 0 and 3 -> class 2, cluster 2 -> class 0, cluster 1 unmatched
    legend = matched_legend(["sky", "road", "car"], mapping)
    assert legend == {0: "sky (cluster 2)", 1: "road", 2: "car (clusters 0, 3)"}
    grid = overlay_grid([image, image], [labels, labels], [labels, labels], 255,
                        titles=["image", "clusters, matched to classes", "ground truth"], legend=legend)
    factor = -(-MIN_CELL // 64)
    cell_h, cell_w = 48 * factor, 64 * factor  # small cells are enlarged so titles fit
    assert grid.shape[1] == 3 * cell_w + 2 * 2
    title_h = 22
    body = grid[title_h: title_h + 2 * cell_h + 2]
    gt = body[:cell_h, 2 * (cell_w + 2):]
    assert _has_colour(gt, palette(3)[2]) and _has_colour(gt, palette(3)[0])  # the ground-truth column
    assert (grid[:title_h] < 128).any()  # title text on top
    legend_band = grid[title_h + 2 * cell_h + 2:]
    assert legend_band.shape[0] >= 20  # a legend under the rows
    assert _has_colour(legend_band, palette(3)[0]) and _has_colour(legend_band, palette(3)[2])
    assert not _has_colour(legend_band, palette(3)[1])  # "road" is in no picture: no swatch


def test_training_overlay_legend_names_the_clusters():
    image, labels = _scene(96, 96)
    grid = overlay_grid([image], [labels], None, 255)
    factor = -(-MIN_CELL // 96)
    assert grid.shape[1] == 2 * 96 * factor + 2
    legend_band = grid[22 + 96 * factor:]
    assert _has_colour(legend_band, palette(3)[0]) and _has_colour(legend_band, palette(3)[2])
    assert len(_bands(legend_band)) >= 1


def test_legend_with_many_entries_wraps_onto_more_lines():
    image, _ = _scene(160, 160)
    many = np.arange(160 * 160).reshape(160, 160) % 27
    one_line = overlay_grid([image], [np.zeros((160, 160), np.int64)], None, 255)
    wrapped = overlay_grid([image], [many], None, 255)
    assert wrapped.shape[1] == one_line.shape[1]
    assert wrapped.shape[0] > one_line.shape[0] + 40  # 27 swatches need several lines


def _png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


def test_confusion_matrix_cells_are_large_enough_to_read():
    names = [f"class {i}" for i in range(27)]
    conf = np.random.default_rng(0).integers(0, 100, (27, 27))
    w, h = _png_size(confusion_figure(conf, names, "clusters (matched)"))
    assert w / 27 >= 50 and h / 27 >= 50  # pixels per cell: room for a two-digit percentage at 9 pt
    small_w, _ = _png_size(confusion_figure(np.eye(3) * 10, ["road", "sky", "car"], "val"))
    assert small_w < w


def test_sweep_figure_wraps_panels_and_names_curves_by_their_values():
    rows = [{"trial": f"t{i}", "status": "finished" if i else "stopped early", "overrides": {
        "hp.tau": 0.2 * (i + 1), "hp.pool_size": 100 * (i + 1), "train.lr": 10.0 ** -i, "hp.chunk": 64},
        "view_nmi": 0.1 * i} for i in range(4)]
    curves = {f"t{i}": ([1, 2, 3], [0.1 * i, 0.12 * i, 0.15 * i]) for i in range(4)}
    w, h = _png_size(sweep_figure(rows, "view_nmi", "max", curves))
    assert w <= 2000 and h >= 700  # 5 panels: two lines of at most three, not one long strip
    one_key = [dict(r, overrides={"hp.tau": r["overrides"]["hp.tau"]}) for r in rows]
    w1, h1 = _png_size(sweep_figure(one_key, "view_nmi", "max", {}))
    assert h1 < h and w1 < w
