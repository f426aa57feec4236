"""The label map of an image of any size in row strips: the cluster logits at the model's resolution are
upsampled (bilinear, the arithmetic of ``F.interpolate(..., mode="bilinear", align_corners=False)``) a strip of
rows at a time and reduced to cluster ids at once, so that no per-pixel float tensor of the whole image exists.
Memory: the ids (1 or 2 bytes per pixel) and one strip of ``STRIP_BYTES`` of logits."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from raysseg.core.precision import exact_fp32

STRIP_BYTES = 16 * 2**20  # float32 logits of one strip (K clusters x rows x width)


def _taps(out_len: int, in_len: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first source index, second source index, weight of the second) of output positions start..stop-1, in the
    float32 arithmetic of PyTorch's bilinear upsampling: source = (out + 0.5) * in / out_len - 0.5, clamped at 0."""
    scale = torch.tensor(in_len / out_len, dtype=torch.float32)
    src = ((torch.arange(start, stop, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.long()
    return i0, (i0 + 1).clamp(max=in_len - 1), src - i0


def upsampled_rows(logits: torch.Tensor, size: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows start..stop-1 of ``logits`` (K, h, w) bilinearly upsampled to ``size`` (H, W): (K, stop - start, W).
    The few source rows the strip reads are widened to W first; each output row is then a weighted sum of two of
    them, one small matrix product (several times faster than gathering the rows)."""
    (h, w), (height, width) = logits.shape[1:], size
    y0, y1, wy = (t.to(logits.device) for t in _taps(height, h, start, stop))
    x0, x1, wx = (t.to(logits.device) for t in _taps(width, w, 0, width))
    first, last = int(y0.min()), int(y1.max())
    rows = logits[:, first:last + 1]
    wide = rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx  # (K, r, W)
    weights = torch.zeros(stop - start, last - first + 1, device=logits.device)  # (rows, r): two taps per row
    row = torch.arange(stop - start, device=logits.device)
    weights.index_put_((row, y0 - first), 1 - wy, accumulate=True)
    weights.index_put_((row, y1 - first), wy, accumulate=True)  # y0 == y1 at the last row: its weights add to 1
    with exact_fp32():
        return torch.matmul(weights, wide)


def strips(size: tuple[int, int], channels: int, budget: int = STRIP_BYTES) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges covering ``size`` (H, W), each holding at most ``budget`` bytes of float32
    ``channels`` x rows x W (at least one row)."""
    height, width = size
    rows = max(1, budget // (4 * channels * max(1, width)))
    for start in range(0, height, rows):
        yield start, min(height, start + rows)


def label_map_in_strips(logits: torch.Tensor, size: tuple[int, int], dtype: type,
                        budget: int = STRIP_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Cluster logits (K, h, w) -> (cluster ids (H, W) of ``dtype``: argmax of the bilinearly upsampled
    logits; pixels per cluster (K,) int64), computed a strip of rows at a time."""
    k = logits.shape[0]
    labels = np.empty(size, dtype)
    counts = torch.zeros(k, dtype=torch.int64)
    with torch.inference_mode():
        logits = logits.float()
        for start, stop in strips(size, k, budget):
            ids = upsampled_rows(logits, size, start, stop).max(0).indices  # argmax(0), several times faster
            counts += torch.bincount(ids.ravel(), minlength=k).cpu()
            labels[start:stop] = ids.cpu().numpy().astype(dtype, copy=False)
    return labels, counts.numpy()


def counts_in_strips(labels: np.ndarray, n: int, rows: int = 1024) -> np.ndarray:
    """Pixels per value 0..max of a label map (at least ``n`` entries), counted a strip of rows at a time
    (``np.bincount`` of the whole map would copy it to 8 bytes per pixel)."""
    counts = np.zeros(n, np.int64)
    for start in range(0, labels.shape[0], rows):
        part = np.bincount(labels[start:start + rows].ravel(), minlength=n)
        if len(part) > len(counts):
            counts = np.pad(counts, (0, len(part) - len(counts)))
        counts[:len(part)] += part
    return counts
