"""Geometry of segment maps (area, centroid, box, adjacency) and the segments of an image batch.

Measured on the code map (the image at ``1/stride``): a segment's area is its fraction of
the map's cells, its centroid the mean of its cell centres, and its box the cells it spans,
all as fractions of the (square) image in [0, 1]. Used by concept browsing.
"""
from __future__ import annotations

import numpy as np


def upsample_map(seg_map: np.ndarray, size: int) -> np.ndarray:
    """Nearest upsampling of an (h, w) map to (size, size): pixel p takes cell p * h // size."""
    h, w = seg_map.shape
    rows = np.arange(size) * h // size
    cols = np.arange(size) * w // size
    return seg_map[rows][:, cols]


def segment_geometry(ids: np.ndarray, n_segments: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area, centroid and box of each segment of id maps (B, h, w) with ids in [0, n_segments).

    Returns area (S,) (fraction of one map's cells), centroid (S, 2) (cy, cx) of the cell
    centres and box (S, 4) (y0, x0, y1, x1) of the cells spanned, all as fractions in [0, 1].
    A segment id that does not occur gets area 0 and NaN geometry."""
    ids = np.asarray(ids)
    b, h, w = ids.shape
    flat = ids.reshape(-1).astype(np.int64)
    rows = np.broadcast_to(np.arange(h)[None, :, None], ids.shape).reshape(-1)
    cols = np.broadcast_to(np.arange(w)[None, None, :], ids.shape).reshape(-1)
    count = np.bincount(flat, minlength=n_segments).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=rows + 0.5, minlength=n_segments) / count / h
        cx = np.bincount(flat, weights=cols + 0.5, minlength=n_segments) / count / w
    y0 = np.full(n_segments, np.inf)
    x0 = np.full(n_segments, np.inf)
    y1 = np.full(n_segments, -np.inf)
    x1 = np.full(n_segments, -np.inf)
    np.minimum.at(y0, flat, rows)
    np.minimum.at(x0, flat, cols)
    np.maximum.at(y1, flat, rows + 1)
    np.maximum.at(x1, flat, cols + 1)
    box = np.stack([y0 / h, x0 / w, y1 / h, x1 / w], 1)
    box[count == 0] = np.nan
    area = count / (h * w)
    return area.astype(np.float32), np.stack([cy, cx], 1).astype(np.float32), box.astype(np.float32)


def adjacent_pairs(ids: np.ndarray) -> np.ndarray:
    """Pairs of segment ids that share an edge (4-neighbourhood) on id maps (h, w) or (B, h, w).

    Maps of a batch are never joined to each other. Returns (P, 2) int64, first < second,
    sorted and without repeats."""
    ids = np.asarray(ids).astype(np.int64)
    if ids.ndim == 2:
        ids = ids[None]
    pairs = [np.stack([ids[:, :, :-1].reshape(-1), ids[:, :, 1:].reshape(-1)], 1),
             np.stack([ids[:, :-1, :].reshape(-1), ids[:, 1:, :].reshape(-1)], 1)]
    p = np.concatenate(pairs)
    p = p[p[:, 0] != p[:, 1]]
    p = np.sort(p, axis=1)
    return np.unique(p, axis=0) if len(p) else np.zeros((0, 2), np.int64)


def segment_batch(seg, images: np.ndarray, grid: int, iterations: int) -> dict:
    """Segments of uint8 images (B, H, W, 3) with a Segmenter: per-image local maps (B, h, w),
    and per segment its image (in the batch), area, centroid, box and prototype; adjacent
    pairs as local segment rows of the batch."""
    import torch

    from raysseg.core.segments import image_segments

    if len(images) == 0:
        return {"maps": np.zeros((0, 1, 1), np.int16), "image": np.zeros(0, np.int64),
                "area": np.zeros(0, np.float32), "centroid": np.zeros((0, 2), np.float32),
                "box": np.zeros((0, 4), np.float32), "proto": np.zeros((0, seg.code_dim), np.float32),
                "pairs": np.zeros((0, 2), np.int64)}
    with torch.no_grad():
        codes = seg.codes(torch.from_numpy(np.ascontiguousarray(images)))
        ids, image, proto = image_segments(codes, grid, iterations)
        n = len(image)
    ids, image = ids.numpy(), image.numpy()
    first = np.searchsorted(image, np.arange(len(images)))
    area, centroid, box = segment_geometry(ids, n)
    return {"maps": (ids - first[:, None, None]).astype(np.int16), "image": image, "area": area,
            "centroid": centroid, "box": box, "proto": proto.numpy().astype(np.float32),
            "pairs": adjacent_pairs(ids)}
