"""Threshold decisions on dot products at low-precision speed, equal to the fp32 decisions bit for bit.

A decision ``s_ij > t`` (s = a_i . b_j as the fp32 path computes it) is made on a fast product y_ij wherever
y_ij lies farther than a proven margin from t; the pairs inside the margin are recomputed in fp32 by the same
kind of GEMM the fp32 path runs, and decided on those values.

The fast product (:data:`SCHEMES`). Each operand is split into pieces valued in bf16 (or fp16) and held in
fp32: x1 = bf16(x), x2 = bf16(x - x1), and the remainders d = x - x1, r = x - x1 - x2 (all exact in fp32). One
pass (schemes bf16, fp16): y = a1 . b1. Three passes (bf16x3): y = a1 . b1 + [a1, a2] . [b2, b1], a GEMM over C
and one over 2C for the small terms, added in fp32 (one GEMM over 3C would round its sum of small terms at the
size of the large one's). The GEMMs take bf16 or fp16 operands and give fp32 (a GEMM with fp32 output on CUDA's
tensor cores; on CPU an fp32 GEMM, in oneDNN's bf16 mode for bf16 pieces), so every product is exact (8 + 8 or
11 + 11 significant bits fit fp32's 24) and only the fp32 accumulation rounds.

Error bound (C = dims, K = C x passes, v = 2^-24, gamma_n = n v / (1 - n v)). Exactly,
  one pass:    a.b - a1.b1 = d_a.b + a1.d_b
  three passes: a.b - (a1.b1 + a1.b2 + a2.b1) = r_a.b + a2.d_b + a1.r_b,
each term bounded by the product of norms (Cauchy-Schwarz); norms are computed per row, so a row whose
rounding happened to be small gets a small margin. Summing n exact products in fp32, in any order, adds at
most gamma_n sum|p_k| <= gamma_n sum over the pieces' pairs of |x_p| |y_q|, counted twice to cover kernels
whose accumulation rounds twice per step or truncates: 2 gamma_C |a1| |b1| for the main GEMM, and for three
passes 2 gamma_2C (|a1| |b2| + |a2| |b1|) for the small terms' GEMM and 2 v (the pieces' sum) for the add; the
fp32 path's own value differs from a.b by at most gamma_C |a| |b|; K 2^-122 covers flushed subnormals. So
for every pair

    |y_ij - s_ij| <= row_i + col_j + r0

(one pass: row_i = |d_a,i| max|b|, col_j = max|a1| |d_b,j|; three passes: row_i = |r_a,i| max|b| +
|a2_i| max|d_b|, col_j = max|a1| |r_b,j|; r0 the accumulation terms), with every norm inflated by
(1 + (C+2) v) for its own fp32 rounding. For unit vectors of C = 384 that is 0.0034-0.004 for one bf16 pass
(0.0118 when the bound took bf16's worst case 2^-8 per element and a bf16 output), about 5e-4 for one fp16 pass
(11 significant bits to bf16's 8) and about 8e-5 for three bf16 passes (1.7e-4 when they were one GEMM over 3C).
The compare runs in fp32 against t +- m' with m' = m (1 + 2^-10) + 2^-20, which covers its own rounding:
y > t + m' implies s > t and y <= t - m' implies s <= t; only |y - t| < m' is recomputed.

Thresholds that are themselves products (a row maximum over a pool) are found exactly first
(:func:`exact_row_max`): candidates y_im >= max_m y_im - 2 m'_i contain every m whose fp32 product can be
the row's maximum, and their fp32 values give it.

Bit-exactness with the fp32 path: that path computes ``a[rows] @ b.T`` a chunk of rows at a time (MKL sgemm on
CPU). The re-check runs GEMMs of 16 rows (neighbours along the rows' first principal direction, so that their
uncertain columns overlap) against the union of their uncertain columns, padded to at
least 32 columns, batched (bmm) per width class (groups of 33-64 columns are padded to the widest of them, and so
on: a group costs at most twice its own union); a chunk of the fp32 path with fewer than 16 rows (a tail) is
computed here exactly as that path does. That a GEMM's value for one element does not depend on the GEMM's shape
from 16 rows and 32 columns up is a property of the BLAS, not of IEEE arithmetic: MKL on an Intel AVX-512 CPU has
it from 16 x 1, MKL on an AMD AVX2 CPU only from 12 columns (measured). So it is checked on the machine itself,
once per (device, C, chunk, M, threads), on random operands of those shapes (:func:`recheck_is_exact`); where it
fails the selection computes every product in fp32 (the fp32 path's decisions, at its speed) and
``stats["fallback"]`` says so. On CUDA that check covers cuBLAS; the fp32 accumulation of bf16 tensor cores within
the bound above is an assumption not yet checked on a GPU.
Memory: the products of a chunk (chunk x columns floats, as in the fp32
path), the re-check's gathered columns and results (each at most as many floats) and bool masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raysseg.core.precision import exact_fp32, fast_product


@dataclass(frozen=True)
class Scheme:
    """How the fast products are made: each operand split into ``passes`` (1 or 3) pieces valued in ``piece``."""

    piece: torch.dtype
    passes: int


# fp16 has 11 significant bits to bf16's 8, so one fp16 pass leaves a margin ~8x narrower than one bf16 pass at the
# same tensor-core rate (fp16 x fp16 products are exact in fp32 too; unit vectors stay far inside fp16's range)
SCHEMES = {"bf16": Scheme(torch.bfloat16, 1), "bf16x3": Scheme(torch.bfloat16, 3), "fp16": Scheme(torch.float16, 1)}
_MIN_TILE = 16  # rows of a re-check GEMM (MKL's per-element value is shape-independent from here)
_MIN_COLS = 32  # columns of a re-check GEMM at least (MKL on AVX2 takes another kernel below 12)
_RECHECK_EXACT: dict[tuple, bool] = {}  # recheck_is_exact's answers on this machine
_V = 2.0 ** -24


@dataclass(frozen=True)
class _Operand:
    """A matrix [N, C] in fp32, its bf16- or fp16-valued pieces for the fast GEMM, and per-row norms for the
    bound."""

    x: Tensor
    fast: Tensor      # [N, C x passes]: a1 (one pass) or [a1, a1, a2] / [b1, b2, b1] (three passes)
    norm: Tensor      # [N] |x|
    norm1: Tensor     # [N] |x1|
    norm2: Tensor     # [N] |x2| (zeros for one pass)
    rest: Tensor      # [N] what the pieces leave out: |d| (one pass) or |r| (three passes)
    d: Tensor         # [N] |d| = |x - x1|


def _scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"exact_select: scheme must be one of {', '.join(SCHEMES)}, got {name!r}")
    return SCHEMES[name]


def _operand(x: Tensor, scheme: Scheme, side: str) -> _Operand:
    x = x.float()
    infl = 1 + (x.shape[1] + 2) * _V
    x1 = x.to(scheme.piece).float()
    d = x - x1
    if scheme.passes == 1:
        fast, x2, err = x1, torch.zeros_like(x[:, :1]), d
    else:
        x2 = d.to(scheme.piece).float()
        err = d - x2
        fast = torch.cat([x1, x1, x2] if side == "left" else [x1, x2, x1], dim=1)
    norm = lambda t: t.norm(dim=1) * infl  # noqa: E731
    return _Operand(x, fast.contiguous(), norm(x), norm(x1), norm(x2), norm(err), norm(d))


@dataclass(frozen=True)
class _Margins:
    row: Tensor   # [N] row_i + r0
    col: Tensor   # [M] col_j


def _margins(a: _Operand, b: _Operand, passes: int) -> _Margins:
    """row_i + col_j + r0 >= |y_ij - s_ij| (module docstring); the compare's rounding is added by _widen."""
    c = a.x.shape[1]
    k = c * passes
    gamma = lambda n: n * _V / (1 - n * _V)  # noqa: E731
    amax, bmax = float(a.norm.max()), float(b.norm.max())
    a1, b1 = float(a.norm1.max()), float(b.norm1.max())
    if passes == 1:
        row = a.rest * bmax
        col = a1 * b.rest
        accumulation = 2 * gamma(c) * a1 * b1
    else:
        a2, b2 = float(a.norm2.max()), float(b.norm2.max())
        row = a.rest * bmax + a.norm2 * float(b.d.max())
        col = a1 * b.rest
        small = a1 * b2 + a2 * b1
        add = 2 * _V * (1 + 2 * gamma(2 * c)) * (a1 * b1 + small)  # the fp32 sum of the two GEMMs
        accumulation = 2 * gamma(c) * a1 * b1 + 2 * gamma(2 * c) * small + add
    r0 = gamma(c) * amax * bmax + accumulation + k * 2.0 ** -122
    return _Margins(row + r0, col)


def _widen(m: Tensor) -> Tensor:
    return m * (1 + 2.0 ** -10) + 2.0 ** -20


def _fast_product(a: Tensor, b: Tensor, dims: int, piece: torch.dtype) -> Tensor:
    """The fast product of operands' ``fast`` pieces (module docstring): a1 . b1 for one pass (``dims`` columns),
    a1 . b1 + [a1, a2] . [b2, b1] for three (3 x ``dims``)."""
    with fast_product():  # tensor cores' FLOPs on a GPU, whatever the CPU computes them in
        if a.shape[1] == dims:
            return _piece_gemm(a, b, piece)
        return _piece_gemm(a[:, :dims], b[:, :dims], piece) + _piece_gemm(a[:, dims:], b[:, dims:], piece)


def _piece_gemm(a: Tensor, b: Tensor, piece: torch.dtype) -> Tensor:
    """a @ b.T for ``piece``-valued fp32 operands, exact products accumulated in fp32, fp32 out. On CUDA a bf16 or
    fp16 GEMM with fp32 output on tensor cores (no reduced-precision reduction). On CPU: bf16 pieces in oneDNN's
    bf16 mode (AMX / AVX512-BF16 where the CPU has them, else plain fp32: exact on these operands either way);
    fp16 pieces in plain fp32 (exact, at fp32's speed: oneDNN has no fp16 mode for fp32 matmuls)."""
    if a.is_cuda:
        matmul = torch.backends.cuda.matmul
        name = ("allow_bf16_reduced_precision_reduction" if piece == torch.bfloat16
                else "allow_fp16_reduced_precision_reduction")
        old = getattr(matmul, name)
        setattr(matmul, name, False)
        try:
            with torch.autocast("cuda", enabled=False):
                return torch.mm(a.to(piece), b.to(piece).T, out_dtype=torch.float32)
        finally:
            setattr(matmul, name, old)
    if piece == torch.float16:
        with exact_fp32():  # IEEE fp32 (no oneDNN bf16 mode, no autocast): exact on fp16-valued operands
            return a @ b.T
    mkldnn = torch.backends.mkldnn.matmul
    old = mkldnn.fp32_precision
    mkldnn.fp32_precision = "bf16"
    try:
        with torch.autocast("cpu", enabled=False):
            return a @ b.T
    finally:
        mkldnn.fp32_precision = old


def fast_products(a: Tensor, b: Tensor, scheme: str = "bf16") -> Tensor:
    """y = the fast GEMM's a_i . b_j (module docstring), [N, M] fp32; ``scheme`` one of :data:`SCHEMES`."""
    sc = _scheme(scheme)
    fa, fb = _operand(a, sc, "left"), _operand(b, sc, "right")
    return _fast_product(fa.fast, fb.fast, a.shape[1], sc.piece)


def error_margins(a: Tensor, b: Tensor, scheme: str = "bf16") -> Tensor:
    """m'_ij >= |fast a_i . b_j - fp32 a_i . b_j| plus the compare's rounding, [N, M] (the per-pair form of
    the margins the selection uses per chunk)."""
    sc = _scheme(scheme)
    m = _margins(_operand(a, sc, "left"), _operand(b, sc, "right"), sc.passes)
    return _widen(m.row[:, None] + m.col[None, :])


def _recheck(a: Tensor, b: Tensor, maybe: Tensor, stats: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 values of the pairs where ``maybe`` [R, M] (R >= 16 rows of a) is True: (rows, cols, values).

    Each group of 16 consecutive rows (the last group takes the last 16 rows) is multiplied with the union of its
    uncertain columns, as the fp32 path's GEMM computes them. Groups with no uncertain pair are skipped; the others
    run as batched GEMMs (bmm: the same per-element values as one GEMM, measured) per width class (unions of up
    to 32, 64, 128, ... columns, each class padded to its own widest union), in batches whose gathered columns
    stay within the fp32 path's R x M floats. So a group costs at most twice its own union, not the widest's.
    ``stats`` (optional) gets "gathered" added: the floats the gathers write (rows and columns of the groups),
    which the batched GEMMs then read; on a GPU they, not the FLOPs, bound the re-check."""
    n, m, c_dim = a.shape[0], b.shape[0], a.shape[1]
    r, c = maybe.nonzero(as_tuple=True)
    if r.shape[0] == 0:
        return r, c, torch.empty(0, device=a.device)
    groups = -(-n // _MIN_TILE)
    full = (groups - 1) * _MIN_TILE
    union = torch.cat([mask_any(maybe[:full].view(groups - 1, _MIN_TILE, m), 1), mask_any(maybe[full:], 0)[None]])
    position = union.cumsum(dim=1) - 1  # [G, M]: a column's place among its group's columns
    width = position[:, -1] + 1  # [G]
    start = torch.clamp(torch.arange(groups, device=a.device) * _MIN_TILE, max=n - _MIN_TILE)
    tile = torch.arange(_MIN_TILE, device=a.device)
    width_class = torch.ceil(torch.log2(width.clamp(min=min(m, _MIN_COLS)).double())).long()
    g = torch.div(r, _MIN_TILE, rounding_mode="floor")
    values = torch.empty(r.shape[0], device=a.device)
    for k in width_class[width > 0].unique().tolist():
        members = ((width_class == k) & (width > 0)).nonzero()[:, 0]  # [Gk] groups of this class
        widest = max(int(width[members].max()), min(m, _MIN_COLS))
        slot_of, col_of = union[members].nonzero(as_tuple=True)
        columns = torch.zeros(members.shape[0], widest, dtype=torch.long, device=a.device)  # padded with column 0
        columns[slot_of, position[members[slot_of], col_of]] = col_of
        rows = a[start[members][:, None] + tile]  # [Gk, 16, C]
        if stats is not None:
            stats["gathered"] = stats.get("gathered", 0) + members.shape[0] * (_MIN_TILE + widest) * c_dim
        per_batch = max(1, (n * m) // (widest * c_dim))
        out = torch.cat([torch.bmm(rows[s:s + per_batch], b[columns[s:s + per_batch]].transpose(1, 2))
                         for s in range(0, members.shape[0], per_batch)])  # [Gk, 16, widest]
        slot = torch.full((groups,), -1, dtype=torch.long, device=a.device)
        slot[members] = torch.arange(members.shape[0], device=a.device)
        pick = (width_class[g] == k).nonzero()[:, 0]
        gp = g[pick]
        values[pick] = out[slot[gp], r[pick] - start[gp], position[gp, c[pick]]]
    return r, c, values


def mask_any(mask: Tensor, dim: int) -> Tensor:
    """``mask.any(dim=dim)`` for a bool mask, as a max over its bytes: torch's bool reduction along a dim is ~30x
    slower on CPU (2.8 ms against 0.08 for the rows of a 1,568^2 mask)."""
    return mask.view(torch.uint8).amax(dim=dim).bool()


def _principal_key(x: Tensor, iterations: int = 8) -> Tensor:
    """[R]: each row of ``x`` [R, C] projected on the rows' first principal direction (power iterations from the
    row farthest from the mean). Rows sorted by it have similar products, so their uncertain columns overlap
    and a re-check group's union is narrower (on HP's CamVid selections 15-35% less re-check work than 16
    consecutive patches). Computed once per selection, for all its chunks."""
    x = x - x.mean(dim=0)
    v = x[x.norm(dim=1).argmax()]
    for _ in range(iterations):
        v = x.T @ (x @ v)
        v = v / v.norm().clamp(min=1e-30)
    return x @ v


def _recheck_similar(rows: Tensor, b: Tensor, maybe: Tensor, key: Tensor,
                     stats: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_recheck` with the rows grouped in the order of their ``key`` [R] (:func:`_principal_key`)."""
    order = key.argsort()
    r, c, values = _recheck(rows[order], b, maybe[order], stats)
    return order[r], c, values


@torch.no_grad()
def recheck_is_exact(device: torch.device, c_dim: int, chunk: int, m: int) -> bool:
    """Whether this machine's batched re-check GEMMs give the fp32 path's values bit for bit for operands of
    C = ``c_dim``, chunks of ``chunk`` rows against ``m`` columns: checked once (cached) on random unit
    vectors, at the re-check's narrowest, a middle and its widest column counts, every row group, and on groups
    of mixed widths whose rows are not consecutive."""
    key = (str(device), c_dim, chunk, m, torch.get_num_threads())
    if key not in _RECHECK_EXACT:
        g = torch.Generator().manual_seed(0)
        a = torch.nn.functional.normalize(torch.randn(chunk, c_dim, generator=g), dim=1).to(device)
        b = torch.nn.functional.normalize(torch.randn(m, c_dim, generator=g), dim=1).to(device)
        with exact_fp32():
            ref = a @ b.T
            ok = True
            for width in sorted({min(m, _MIN_COLS), min(m, _MIN_COLS + 5), min(m, 97), m}):
                maybe = torch.zeros(chunk, m, dtype=torch.bool, device=device)
                maybe[:, torch.randperm(m, generator=g)[:width].to(device)] = True
                r, c, vals = _recheck(a, b, maybe)
                ok = ok and bool(torch.equal(vals, ref[r, c]))
            # rows of very different densities, grouped as the selection groups them (not consecutive): groups
            # of every width class in one call, some groups empty
            density = torch.rand(chunk, 1, generator=g) ** 4
            maybe = (torch.rand(chunk, m, generator=g) < density).to(device)
            r, c, vals = _recheck_similar(a, b, maybe, _principal_key(a))
            ok = ok and bool(torch.equal(vals, ref[r, c]))
        _RECHECK_EXACT[key] = ok
    return _RECHECK_EXACT[key]


@torch.no_grad()
def exact_row_max(a: Tensor, b: Tensor, chunk: int, scheme: str = "bf16", stats: dict | None = None) -> Tensor:
    """max_m a_i . b_m for each row i, equal bit for bit to ``cat([(a[i:i+chunk] @ b.T).amax(1)])`` in fp32.

    a [N, C], b [M, C] float32 -> [N] float32. ``stats`` (optional) gets "pairs", "rechecked" and "gathered"
    (:func:`_recheck`) added.
    """
    sc = _scheme(scheme)
    fa, fb = _operand(a, sc, "left"), _operand(b, sc, "right")
    m = _margins(fa, fb, sc.passes)
    span = 2 * _widen(m.row + float(m.col.max()))  # [N]: 2 m'_i
    key = _principal_key(fa.x)
    out = []
    for i in range(0, a.shape[0], chunk):
        rows = fa.x[i:i + chunk]
        if rows.shape[0] < _MIN_TILE or not recheck_is_exact(a.device, a.shape[1], rows.shape[0], b.shape[0]):
            with exact_fp32():  # the fp32 path's GEMM, as it runs it (a small tail, or a BLAS without the property)
                out.append((rows @ fb.x.T).amax(dim=1))
            _count(stats, rows.shape[0] * b.shape[0], rows.shape[0] * b.shape[0], rows.shape[0] >= _MIN_TILE)
            continue
        y = _fast_product(fa.fast[i:i + chunk], fb.fast, a.shape[1], sc.piece)
        cand = y >= (y.amax(dim=1) - span[i:i + chunk])[:, None]
        with exact_fp32():
            r, _, vals = _recheck_similar(rows, fb.x, cand, key[i:i + chunk], stats)
        best = torch.full((rows.shape[0],), float("-inf"), device=a.device)
        out.append(best.scatter_reduce(0, r, vals, reduce="amax"))
        _count(stats, y.numel(), r.shape[0])
    return torch.cat(out)


@torch.no_grad()
def exact_select(a: Tensor, b: Tensor, threshold: Tensor, col_threshold: Tensor | None = None, *,
                 chunk: int, scheme: str = "bf16", stats: dict | None = None) -> Tensor:
    """bool [N, M]: a_i . b_j > threshold_i (or > col_threshold_j, when given), equal bit for bit to the fp32
    path ``a[i:i+chunk] @ b.T > threshold[i:i+chunk, None]`` (``| ... > col_threshold[None, :]``).

    a [N, C], b [M, C] float32; threshold [N], col_threshold [M] float32, computed exactly (e.g. by
    :func:`exact_row_max`). ``scheme``: "bf16" (one pass), "bf16x3" (three passes, a margin ~45x narrower for 3x
    the fast GEMM's work) or "fp16" (one pass, ~8x narrower at bf16's tensor-core rate; on CPU at fp32's speed).
    With ``b is a`` the fast products of each chunk cover only its own and later columns: the pairs before them
    are decided on the transposed products (:func:`_symmetric_select`), half the fast GEMM's work.
    ``stats`` (optional) gets "pairs", "rechecked" and "gathered" (:func:`_recheck`) added.
    """
    sc = _scheme(scheme)
    fa = _operand(a, sc, "left")
    fb = _operand(b, sc, "right")
    m = _margins(fa, fb, sc.passes)
    row_t = threshold.float()
    col_t = None if col_threshold is None else col_threshold.float()
    n, c_dim = a.shape
    key = _principal_key(fa.x)
    sizes = {min(chunk, n - i) for i in range(0, n, chunk)}
    if b is a and col_t is not None and min(sizes) >= _MIN_TILE and all(
            recheck_is_exact(a.device, c_dim, size, n) for size in sizes):
        return _symmetric_select(fa, fb, m, row_t, col_t, key, chunk, sc.piece, stats)
    col_max = float(m.col.max())
    mask = torch.empty(n, b.shape[0], dtype=torch.bool, device=a.device)
    for i in range(0, n, chunk):
        rows, t = fa.x[i:i + chunk], row_t[i:i + chunk]
        if rows.shape[0] < _MIN_TILE or not recheck_is_exact(a.device, c_dim, rows.shape[0], b.shape[0]):
            with exact_fp32():  # the fp32 path's GEMM, as it runs it (a small tail, or a BLAS without the property)
                sim = rows @ fb.x.T
            mask[i:i + chunk] = sim > t[:, None] if col_t is None else (sim > t[:, None]) | (sim > col_t[None, :])
            _count(stats, sim.numel(), sim.numel(), rows.shape[0] >= _MIN_TILE)
            continue
        y = _fast_product(fa.fast[i:i + chunk], fb.fast, c_dim, sc.piece)
        e = float(_widen(m.row[i:i + chunk].max() + col_max))  # this chunk's margin m'
        sure, maybe = _classify(y, t, col_t, e)
        del y
        mask[i:i + chunk] = _settle(sure, maybe, rows, fb.x, t, col_t, key[i:i + chunk], stats)
    return mask


def _symmetric_select(fa: _Operand, fb: _Operand, m: _Margins, row_t: Tensor, col_t: Tensor, key: Tensor,
                      chunk: int, piece: torch.dtype, stats: dict | None) -> Tensor:
    """:func:`exact_select` of a against itself, every chunk of at least 16 rows. Chunk I's fast products y [I, J]
    cover the columns J from its own first row on; the block below it (rows after I, columns I) is decided on
    y.T: y_ij approximates s_ji (row j's fp32 value, as the fp32 path computes it in j's chunk) within the same
    bound as s_ij, whose row part comes from i and column part from j, both within this chunk's margin. The
    pairs of that block inside the margin are re-checked as rows j against columns i."""
    n = fa.x.shape[0]
    col_max = float(m.col.max())
    mask = torch.empty(n, n, dtype=torch.bool, device=fa.x.device)
    for i in range(0, n, chunk):
        k = min(chunk, n - i)
        y = _fast_product(fa.fast[i:i + k], fb.fast[i:], fa.x.shape[1], piece)  # [k, n - i]
        e = float(_widen(m.row[i:i + k].max() + col_max))
        sure, maybe = _classify(y, row_t[i:i + k], col_t[i:], e)
        sure_below, maybe_below = _classify(y[:, k:].T, row_t[i + k:], col_t[i:i + k], e)
        del y
        rows = fa.x[i:i + k]
        mask[i:i + k, i:] = _settle(sure, maybe, rows, fb.x[i:], row_t[i:i + k], col_t[i:], key[i:i + k], stats)
        mask[i + k:, i:i + k] = _settle(sure_below, maybe_below, fa.x[i + k:], rows, row_t[i + k:],
                                        col_t[i:i + k], key[i + k:], stats)
    return mask


def _classify(y: Tensor, row_t: Tensor, col_t: Tensor | None, e: float) -> tuple[Tensor, Tensor]:
    """(sure, maybe) bool like y [R, M]: y_ij > t + e for a threshold (sure positive), or within e of one."""
    sure, maybe = y > (row_t + e)[:, None], y > (row_t - e)[:, None]
    if col_t is not None:
        sure |= y > (col_t + e)[None, :]
        maybe |= y > (col_t - e)[None, :]
    return sure, maybe & ~sure


def _settle(sure: Tensor, maybe: Tensor, rows: Tensor, cols: Tensor, row_t: Tensor, col_t: Tensor | None,
            key: Tensor, stats: dict | None) -> Tensor:
    """``sure`` with the ``maybe`` pairs decided on their fp32 values (rows [R, C] against cols [M, C]; the rows
    grouped by ``key`` [R])."""
    if bool(maybe.any()):
        with exact_fp32():
            r, c, vals = _recheck_similar(rows, cols, maybe, key, stats)
        sure[r, c] = vals > row_t[r] if col_t is None else (vals > row_t[r]) | (vals > col_t[c])
        _count(stats, sure.numel(), r.shape[0])
    else:
        _count(stats, sure.numel(), 0)
    return sure


def _count(stats: dict | None, pairs: int, rechecked: int, fallback: bool = False) -> None:
    if stats is not None:
        stats["pairs"] = stats.get("pairs", 0) + pairs
        stats["rechecked"] = stats.get("rechecked", 0) + rechecked
        stats["fallback"] = stats.get("fallback", False) or fallback
