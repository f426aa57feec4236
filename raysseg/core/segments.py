"""Segments: pseudo segments from a classical oversegmentation, pixel sorting (SegSort's
per-image spherical k-means), and segment prototypes.

Shared by SegSort and visual-concepts training, retrieval evaluation and concept browsing.
Pseudo segments stand in for the paper's HED-owt-ucm contours (which need MATLAB and a
trained edge detector): scikit-image's felzenszwalb (default) or SLIC on the RGB image.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raysseg.core.precision import exact_fp32


def oversegment(image: np.ndarray, method: str = "felzenszwalb", *, scale: float = 100.0, sigma: float = 0.8,
                min_size: int = 50, n_segments: int = 64, compactness: float = 10.0) -> np.ndarray:
    """uint8 RGB image (H, W, 3) -> pseudo segment ids (H, W) int32, consecutive from 0."""
    from skimage.segmentation import felzenszwalb, slic

    if method == "felzenszwalb":
        ids = felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size)
    elif method == "slic":
        ids = slic(image, n_segments=n_segments, compactness=compactness, start_label=0)
    else:
        raise ValueError(f"segments.method: unknown oversegmentation {method!r}; use felzenszwalb or slic")
    _, ids = np.unique(ids, return_inverse=True)
    return ids.reshape(image.shape[:2]).astype(np.int32)


def oversegment_kwargs(segments_cfg) -> dict:
    """The :func:`oversegment` settings of a ``SegmentsConfig``."""
    s = segments_cfg
    return {"method": s.method, "scale": s.scale, "sigma": s.sigma, "min_size": s.min_size,
            "n_segments": s.n_segments, "compactness": s.compactness}


def grid_cells(h: int, w: int, grid: int, device=None) -> Tensor:
    """Cell index (h*w,) of each location in a grid x grid partition of an h x w map (row-major)."""
    ys = torch.arange(h, device=device) * grid // h
    xs = torch.arange(w, device=device) * grid // w
    return (ys[:, None] * grid + xs[None, :]).reshape(-1)


def pixel_sort(emb: Tensor, grid: int = 5, iterations: int = 10, position_weight: float = 1.0) -> Tensor:
    """SegSort's pixel sorting: spherical k-means per image on the embedding concatenated with
    normalised (y, x), initialised from a grid x grid partition.

    emb: (B, D, h, w) L2-normalised embeddings. Features are cat(emb, position_weight * (y, x))
    with y, x in [-1, 1], re-normalised onto the sphere (a vMF mixture with shared concentration).
    Each of the grid*grid clusters starts as the mean of its cell; empty clusters stay empty.
    Returns cluster ids (B, h, w) int64 in [0, grid*grid).
    """
    with exact_fp32():  # a clustering decides the segments: fp32 whatever the run's precision
        return _pixel_sort(emb.detach().float(), grid, iterations, position_weight)


def _pixel_sort(emb: Tensor, grid: int, iterations: int, position_weight: float) -> Tensor:
    b, d, h, w = emb.shape
    g = grid * grid
    ys = torch.linspace(-1, 1, h, device=emb.device) if h > 1 else torch.zeros(1, device=emb.device)
    xs = torch.linspace(-1, 1, w, device=emb.device) if w > 1 else torch.zeros(1, device=emb.device)
    pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).reshape(2, h * w) * position_weight
    x = torch.cat([emb.detach().reshape(b, d, h * w), pos.expand(b, 2, h * w).to(emb.dtype)], 1)
    x = F.normalize(x, dim=1).transpose(1, 2)  # (B, N, D+2)
    assign = grid_cells(h, w, grid, emb.device).expand(b, h * w)
    for _ in range(iterations + 1):
        one_hot = F.one_hot(assign, g).to(x.dtype)  # (B, N, G)
        sums = one_hot.transpose(1, 2) @ x  # (B, G, D+2)
        empty = one_hot.sum(1) == 0  # (B, G)
        sims = x @ F.normalize(sums, dim=2).transpose(1, 2)  # (B, N, G)
        sims = sims.masked_fill(empty[:, None, :], float("-inf"))
        new = sims.argmax(2)
        if torch.equal(new, assign):
            break
        assign = new
    return assign.reshape(b, h, w)


def batch_segment_ids(*maps: Tensor) -> tuple[Tensor, Tensor]:
    """Intersect per-image id maps and number the pieces consecutively across the batch.

    maps: integer tensors (B, h, w) (e.g. pixel-sorting clusters and pseudo segments); a
    segment is a set of locations of one image with equal ids in every map.
    Returns (ids (B, h, w) int64 in [0, S), image index of each segment (S,) int64)."""
    b = maps[0].shape[0]
    key = torch.arange(b, device=maps[0].device).view(b, 1, 1).expand_as(maps[0]).to(torch.int64)
    for m in maps:
        m = m.to(torch.int64)
        key = key * (int(m.max()) + 1 if m.numel() else 1) + m
    uniq, ids = torch.unique(key, return_inverse=True)
    # the image is the most significant digit; recover it by re-keying the first location of each segment
    first = torch.full((len(uniq),), key.numel(), dtype=torch.int64, device=key.device)
    first.scatter_reduce_(0, ids.reshape(-1), torch.arange(key.numel(), device=key.device), reduce="amin")
    image = first // (key[0].numel())
    return ids.reshape(maps[0].shape), image


def merge_small_segments(ids: Tensor, min_cells: int) -> Tensor:
    """Merge every segment smaller than ``min_cells`` locations into a 4-adjacent one, until none is left
    (or a small segment has no neighbour: a whole image).

    ids (B, h, w) int64 numbered across the batch in [0, S), no segment spanning two images (as
    :func:`batch_segment_ids` gives). Each round, every small segment picks the neighbour it shares the
    longest border with (ties: the larger neighbour, then the lower id). A pick is carried out when its
    target is not small, or when two small segments pick each other; other picks wait for the next round
    (their target may have grown), so chains of small segments do not snowball into one large segment
    (if no pick qualifies, all are carried out). Returns ids (B, h, w) int64 renumbered consecutively in
    the order of the smallest old id of each merged segment (the image order is kept)."""
    if min_cells <= 1 or ids.numel() == 0:
        return ids
    b, h, w = ids.shape
    flat = ids.reshape(-1)
    total = flat.numel()
    while True:
        n = int(flat.max()) + 1
        counts = torch.bincount(flat, minlength=n)
        small = counts < min_cells
        grid = flat.view(b, h, w)
        a = torch.cat([grid[:, :, :-1].reshape(-1), grid[:, :-1, :].reshape(-1)])
        c = torch.cat([grid[:, :, 1:].reshape(-1), grid[:, 1:, :].reshape(-1)])
        cut = a != c
        src, dst = torch.cat([a[cut], c[cut]]), torch.cat([c[cut], a[cut]])  # both directions
        pick = small[src]
        if not bool(pick.any()):
            return flat.view(b, h, w)
        pairs, border = torch.unique(src[pick] * n + dst[pick], return_counts=True)
        s, d = pairs // n, pairs % n
        score = (border * (total + 1) + counts[d]) * n + (n - 1 - d)  # border, then size, then lower id
        best = torch.full((n,), -1, dtype=torch.int64, device=flat.device).scatter_reduce_(0, s, score, reduce="amax")
        small_ids = torch.nonzero(best >= 0).reshape(-1)
        target = n - 1 - best[small_ids] % n
        pick_of = torch.full((n,), -1, dtype=torch.int64, device=flat.device).index_put_((small_ids,), target)
        now = ~small[target] | (pick_of[target] == small_ids)
        if bool(now.any()):
            small_ids, target = small_ids[now], target[now]
        label = torch.arange(n, device=flat.device)
        while True:  # connected components of the picks: propagate the smallest id along them
            low = torch.minimum(label[small_ids], label[target])
            new = label.clone()
            new.scatter_reduce_(0, small_ids, low, reduce="amin")
            new.scatter_reduce_(0, target, low, reduce="amin")
            new = new[new]
            if torch.equal(new, label):
                break
            label = new
        _, flat = torch.unique(label[flat], return_inverse=True)


def segment_prototypes(emb: Tensor, ids: Tensor, n_segments: int) -> tuple[Tensor, Tensor]:
    """Normalised mean embedding of each segment.

    emb: (N, D) pixel embeddings; ids: (N,) segment of each pixel in [0, n_segments).
    Returns (prototypes (S, D) L2-normalised, pixel counts (S,)). Differentiable in ``emb``."""
    sums = torch.zeros(n_segments, emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, ids, emb)
    counts = torch.bincount(ids, minlength=n_segments)
    return F.normalize(sums, dim=1), counts


def flat_pixels(emb: Tensor) -> Tensor:
    """(B, D, h, w) -> (B*h*w, D) in the order of ``ids.reshape(-1)`` for ids (B, h, w)."""
    return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])


def image_segments(codes: Tensor, grid: int, iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """k-means segments of each image (pixel sorting) and their prototypes.

    codes: (B, D, h, w) L2-normalised. Returns (segment ids (B, h, w) int64 numbered across the
    batch in [0, S), image of each segment (S,) int64, prototypes (S, D) L2-normalised mean codes)."""
    ids, image = batch_segment_ids(pixel_sort(codes, grid, iterations))
    protos, _ = segment_prototypes(flat_pixels(codes), ids.reshape(-1), len(image))
    return ids, image, protos
