"""Threshold decisions on dot products at low-precision speed, equal to the fp32 decisions bit for bit.

A decision ``s_ij > t_ij`` (s = a_i . b_j) is made on a bf16 product y_ij (or TF32 on a GPU) wherever
y_ij lies farther than a proven bound E from t_ij; the pairs inside the margin are recomputed in fp32
by the same kind of GEMM the fp32 path runs, and decided on those values.

Error bound (C = dims, u = unit roundoff of the low format: 2^-8 for bf16, 2^-11 for TF32; v = 2^-24,
fp32's; gamma_n = n v / (1 - n v)). Rounding each operand gives fl(a_k) = a_k (1 + d), |d| <= u, so
a product of rounded operands is a_k b_k (1 + e) with |e| <= 2u + u^2, held exactly in fp32 (8 + 8 or
11 + 11 significant bits <= 24). Summing C such terms in fp32, in any order, adds at most
gamma_C sum_k |p_k|; a bf16 output (torch's CPU bf16 matmul) rounds once more, relative u. The fp32
path's own value differs from a.b by at most gamma_C sum_k |a_k b_k|. With sum_k |a_k b_k| <= |a| |b|
(Cauchy-Schwarz):

    |y - s_fp32| <= E = [2u + u^2 + 2 gamma_C (1+u)^2 + u_out (1+gamma_C)(1+u)^2 + gamma_C] |a| |b| + C 2^-122

(u_out = u for a bf16 output, 0 for fp32 output; the accumulation term is counted twice to cover
kernels whose fp32 accumulation rounds twice per step; C 2^-122 covers flushed subnormals of inputs,
products and partial sums). |a| |b| is taken as the largest row norms of a and b, inflated by
(1 + (C+2) v) for their own fp32 rounding. For unit vectors, C = 384, bf16: E = 0.0118. The compare
itself runs in fp32 against t +- E' with E' = E (1 + 2^-10) + 2^-20, which covers its rounding.
Hence y > t + E' implies s > t and y <= t - E' implies s <= t: only |y - t| < E' is recomputed.

Thresholds that are themselves products (a row maximum over a pool) are found exactly first
(:func:`exact_row_max`): candidates y_im >= max_m y_im - 2E' contain every m whose fp32 product can be
the row's maximum, and their fp32 values give it.

Bit-exactness with the fp32 path: that path computes ``a[rows] @ b.T`` a chunk of rows at a time
(MKL sgemm on CPU). For row blocks of at least 16 rows MKL's value for one element does not depend on
the block's shape (measured; tests/test_exact_select.py checks the decisions), so the re-check runs
GEMMs of at least 16 rows and 16 columns gathered from a and b; a chunk of the fp32 path with fewer than
16 rows (a tail) is computed here exactly as that path does. Memory: float work is chunk x (columns),
as in the fp32 path, plus the bool masks of the result.
"""
from __future__ import annotations

import torch
from torch import Tensor

from raysseg.core.precision import exact_fp32

LOW_FORMATS = ("bf16", "tf32")
_MIN_TILE = 16  # rows and columns of a re-check GEMM (MKL's per-element value is shape-independent from here)
_GROUP = 16  # candidate rows per re-check GEMM


def _unit_roundoff(low: str) -> tuple[float, float]:
    """(u of the operands, u of the output) of a low-precision product."""
    if low == "bf16":
        return 2.0 ** -8, 2.0 ** -8  # torch's bf16 matmul returns bf16
    if low == "tf32":
        return 2.0 ** -11, 0.0
    raise ValueError(f"exact_select: low must be one of {', '.join(LOW_FORMATS)}, got {low!r}")


def error_bound(a: Tensor, b: Tensor, low: str = "bf16") -> float:
    """E' (module docstring): |low-precision a_i.b_j - fp32 a_i.b_j| < E' for every pair, with the
    compare's own rounding covered. a [N, C], b [M, C] float32."""
    u, u_out = _unit_roundoff(low)
    c = a.shape[1]
    v = 2.0 ** -24
    gamma = c * v / (1 - c * v)
    k = 2 * u + u * u + 2 * gamma * (1 + u) ** 2 + u_out * (1 + gamma) * (1 + u) ** 2 + gamma
    norms = float(a.norm(dim=1).max()) * float(b.norm(dim=1).max()) * (1 + (c + 2) * v) ** 2
    e = k * norms + c * 2.0 ** -122
    return e * (1 + 2.0 ** -10) + 2.0 ** -20


def _low_products(a_low: Tensor, b_low: Tensor, low: str) -> Tensor:
    """y = a_low @ b_low.T: bf16 operands (compared against fp32 thresholds without a float copy), or fp32
    operands with TF32 allowed (CUDA). On CUDA, bf16 products accumulate in full fp32, as the bound assumes."""
    if not a_low.is_cuda:
        return a_low @ b_low.T
    flag, value = ("allow_bf16_reduced_precision_reduction", False) if low == "bf16" else ("allow_tf32", True)
    old = getattr(torch.backends.cuda.matmul, flag)
    setattr(torch.backends.cuda.matmul, flag, value)
    try:
        return a_low @ b_low.T
    finally:
        setattr(torch.backends.cuda.matmul, flag, old)


def _cast(x: Tensor, low: str) -> Tensor:
    if low == "tf32" and not x.is_cuda:
        raise ValueError("exact_select: tf32 needs a CUDA device; use low='bf16' on CPU")
    return x.bfloat16() if low == "bf16" else x


def _recheck(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """fp32 values a[rows[k]] . b[cols[k]] (rows sorted), from GEMMs of 16 candidate rows against the union
    of their candidate columns (padded to >= 16 x 16), as the fp32 path's GEMM computes them. On CPU the
    many small ops run on one thread (waking a thread pool per op costs more than they do)."""
    if a.is_cuda:
        return _recheck_groups(a, b, rows, cols)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _recheck_groups(a, b, rows, cols)
    finally:
        torch.set_num_threads(threads)


def _recheck_groups(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=a.device)
    uniq, counts = torch.unique_consecutive(rows, return_counts=True)
    rank = torch.empty(a.shape[0], dtype=torch.long, device=a.device)
    rank[uniq] = torch.arange(uniq.shape[0], device=a.device)
    r_idx = rank.index_select(0, rows)  # the pair's row: its rank among the candidate rows
    col_pos = torch.empty(b.shape[0], dtype=torch.long, device=a.device)
    ends = counts.cumsum(0).tolist()
    for g in range(0, uniq.shape[0], _GROUP):
        lo, hi = (ends[g - 1] if g else 0), ends[min(g + _GROUP, uniq.shape[0]) - 1]
        g_rows, g_cols = uniq[g:g + _GROUP], torch.unique(cols[lo:hi])
        col_pos[g_cols] = torch.arange(g_cols.shape[0], device=a.device)
        if g_rows.shape[0] < _MIN_TILE:
            g_rows = torch.cat([g_rows, g_rows[:1].expand(_MIN_TILE - g_rows.shape[0])])
        if g_cols.shape[0] < _MIN_TILE:
            g_cols = torch.cat([g_cols, g_cols[:1].expand(_MIN_TILE - g_cols.shape[0])])
        sub = a.index_select(0, g_rows) @ b.index_select(0, g_cols).T
        flat = (r_idx[lo:hi] - g) * g_cols.shape[0] + col_pos.index_select(0, cols[lo:hi])
        out[lo:hi] = sub.view(-1).index_select(0, flat)
    return out


@torch.no_grad()
def exact_row_max(a: Tensor, b: Tensor, chunk: int, low: str = "bf16",
                  stats: dict | None = None) -> Tensor:
    """max_m a_i . b_m for each row i, equal bit for bit to ``cat([(a[i:i+chunk] @ b.T).amax(1)])`` in fp32.

    a [N, C], b [M, C] float32 -> [N] float32. ``stats`` (optional) gets "pairs" and "rechecked" added.
    """
    a, b = a.float(), b.float()
    e = error_bound(a, b, low)
    b_low = _cast(b, low)
    out = []
    with exact_fp32():
        for i in range(0, a.shape[0], chunk):
            rows = a[i:i + chunk]
            if rows.shape[0] < _MIN_TILE:  # the fp32 path's small tail GEMM, as it runs it
                out.append((rows @ b.T).amax(dim=1))
                _count(stats, rows.shape[0] * b.shape[0], rows.shape[0] * b.shape[0])
                continue
            y = _low_products(_cast(rows, low), b_low, low)
            cand = y >= (y.amax(dim=1, keepdim=True) - 2 * e)
            r, c = cand.nonzero(as_tuple=True)
            vals = _recheck(rows, b, r, c)
            best = torch.full((rows.shape[0],), float("-inf"), device=a.device)
            out.append(best.scatter_reduce(0, r, vals, reduce="amax"))
            _count(stats, y.numel(), r.shape[0])
    return torch.cat(out)


@torch.no_grad()
def exact_select(a: Tensor, b: Tensor, threshold: Tensor, col_threshold: Tensor | None = None, *,
                 chunk: int, low: str = "bf16", stats: dict | None = None) -> Tensor:
    """bool [N, M]: a_i . b_j > threshold_i (or > col_threshold_j, when given), equal bit for bit to the fp32
    path ``a[i:i+chunk] @ b.T > threshold[i:i+chunk, None]`` (``| ... > col_threshold[None, :]``).

    a [N, C], b [M, C] float32; threshold [N], col_threshold [M] float32, computed exactly (e.g. by
    :func:`exact_row_max`). ``stats`` (optional) gets "pairs" and "rechecked" added.
    """
    a, b = a.float(), b.float()
    e = error_bound(a, b, low)
    b_low = _cast(b, low)
    row_t = threshold.float()
    col_t = None if col_threshold is None else col_threshold.float()
    mask = torch.empty(a.shape[0], b.shape[0], dtype=torch.bool, device=a.device)
    with exact_fp32():
        for i in range(0, a.shape[0], chunk):
            rows, t = a[i:i + chunk], row_t[i:i + chunk, None]
            if rows.shape[0] < _MIN_TILE:  # the fp32 path's small tail GEMM, as it runs it
                sim = rows @ b.T
                mask[i:i + chunk] = sim > t if col_t is None else (sim > t) | (sim > col_t[None, :])
                _count(stats, sim.numel(), sim.numel())
                continue
            y = _low_products(_cast(rows, low), b_low, low)
            sure = y > t + e
            maybe = y > t - e
            if col_t is not None:
                sure |= y > (col_t + e)[None, :]
                maybe |= y > (col_t - e)[None, :]
            maybe &= ~sure
            r, c = maybe.nonzero(as_tuple=True)
            if r.shape[0]:
                vals = _recheck(rows, b, r, c)
                dec = vals > row_t[i + r] if col_t is None else (vals > row_t[i + r]) | (vals > col_t[c])
                sure[r, c] = dec
            mask[i:i + chunk] = sure
            _count(stats, y.numel(), r.shape[0])
    return mask


def _count(stats: dict | None, pairs: int, rechecked: int) -> None:
    if stats is not None:
        stats["pairs"] = stats.get("pairs", 0) + pairs
        stats["rechecked"] = stats.get("rechecked", 0) + rechecked
