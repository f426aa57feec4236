"""How much fp32 re-check work two narrower designs would leave, counted (not timed) on real features; neither is
adopted (BENCHMARKS.md, "Two ways to narrow the re-check").

1. Margins per row or per pair instead of one per chunk (the bound row_i + col_j of core/exact_select.py taken
   at the chunk's maximum): pairs inside the margin, per scheme.
2. Row tiles of 4 or 8 instead of 16: the re-check's GEMM work (rows x union of uncertain columns, before and
   after the width classes' padding) and its gathered columns, and whether this machine's batched GEMMs give
   the full GEMM's values bit for bit at that tile.
3. The transposed layout: blocks of 32-128 contiguous columns, each against the gathered rows with an uncertain
   pair in it (padded to a power of two, at least 16, as today's widths are), beside today's 16-row tiles against their gathered columns: GEMM work, FLOP per
   byte of gathered operand moved (written, then read), and a roofline time on an H100 (67 TFLOP/s fp32,
   3.35 TB/s) relative to today's.

Features: a random ViT-S/16 on CamVid train images at 224 px, anchors against themselves with row thresholds
over a pool of half of them (as benchmarks/exact_select.py).

    .venv/bin/python benchmarks/recheck_work.py --images 8
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from exact_select import camvid_features  # noqa: E402

from raysseg.core import exact_select as es  # noqa: E402
from raysseg.core.precision import exact_fp32  # noqa: E402


def uncertain(y, t, row_e, col_e):
    """Pairs within the margin of either threshold (the selection's row | column rule)."""
    sure = (y > t[:, None] + row_e) | (y > t[None, :] + col_e)
    maybe = (y > t[:, None] - row_e) | (y > t[None, :] - col_e)
    return maybe & ~sure


def tile_is_exact(f: torch.Tensor, tile: int, width: int, groups: int = 64) -> bool:
    g = torch.Generator().manual_seed(tile * 1000 + width)
    a = f[:groups * tile]
    with exact_fp32():
        ref = a @ f.T
        cols = torch.randint(0, f.shape[0], (groups, width), generator=g)
        out = torch.bmm(a.view(groups, tile, -1), f[cols].transpose(1, 2))
    rows = torch.arange(groups * tile).view(groups, tile)
    return bool(torch.equal(out, ref[rows[:, :, None], cols[:, None, :]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--camvid", default="../shared/data/camvid/train/images")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    f = camvid_features(Path(args.camvid), args.images)
    pool = f[torch.randperm(f.shape[0], generator=torch.Generator().manual_seed(0))[:f.shape[0] // 2]].clone()
    n = f.shape[0]
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, N = {n}, {args.threads} thread(s)\n")
    print("| scheme | pairs within one margin per chunk | per row | per pair |\n|---|---:|---:|---:|")
    maybe_fp16 = None
    for scheme in es.SCHEMES:
        sc = es._scheme(scheme)
        t = es.exact_row_max(f, pool, 2048, scheme)
        fa, fb = es._operand(f, sc, "left"), es._operand(f, sc, "right")
        m = es._margins(fa, fb, sc.passes)
        y = es._fast_product(fa.fast, fb.fast, f.shape[1], sc.piece)
        one = es._widen(m.row.max() + m.col.max()).expand(n)
        counts = [uncertain(y, t, one, one),
                  uncertain(y, t, es._widen(m.row + m.col.max())[:, None], es._widen(m.row.max() + m.col)[None, :]),
                  uncertain(y, t, es._widen(m.row[:, None] + m.col[None, :]), es._widen(m.row[:, None] + m.col[None, :]))]
        print(f"| {scheme} | " + " | ".join(f"{int(c.sum()):,}" for c in counts) + " |")
        if scheme == "fp16":
            maybe_fp16 = counts[0]
    floor = int(maybe_fp16.sum())
    ordered = maybe_fp16[es._principal_key(f).argsort()]
    print(f"\nfp16's {floor:,} pairs, rows grouped along their principal direction:\n")
    print("| rows per tile | GEMM work / pairs | with width-class padding | gathered columns | "
          "values exact at 32 / 8 columns |\n|---:|---:|---:|---:|---|")
    for tile in (1, 2, 4, 8, 16):
        groups = n // tile
        width = es.mask_any(ordered[:groups * tile].view(groups, tile, n), 1).sum(dim=1).double()
        padded = torch.where(width > 0, 2 ** torch.ceil(torch.log2(width.clamp(min=es._MIN_COLS))), 0.0)
        exact = " / ".join("yes" if tile_is_exact(f, tile, w) else "no" for w in (32, 8))
        print(f"| {tile} | {float(width.sum()) * tile / floor:.1f}x | {float(padded.sum()) * tile / floor:.1f}x | "
              f"{float(width.sum()):,.0f} | {exact} |")
        if tile == 16:
            today = (2 * 16 * float(padded.sum()) * f.shape[1], 8 * float(padded.sum()) * f.shape[1])
    roofline = lambda flops, moved: max(flops / 67e12, moved / 3.35e12)  # noqa: E731
    print("\n| layout | GEMM work / pairs | FLOP per byte moved | roofline time vs today | GEMMs before batching |"
          "\n|---|---:|---:|---:|---:|")
    print(f"| 16-row tiles x gathered columns (today) | {today[0] / (2 * 16 * f.shape[1]) * 16 / floor:.1f}x | "
          f"{today[0] / today[1]:.0f} | 1.00 | {n // 16} |")
    for block in (32, 64, 128):
        blocks = n // block
        rows = es.mask_any(maybe_fp16[:, :blocks * block].view(n, blocks, block), 2).sum(dim=0).double()
        rows = torch.where(rows > 0, 2 ** torch.ceil(torch.log2(rows.clamp(min=16))), 0.0)  # padded as today's widths
        flops, moved = 2 * float(rows.sum()) * block * f.shape[1], 8 * float(rows.sum()) * f.shape[1]
        print(f"| {block}-column blocks x gathered rows | {float(rows.sum()) * block / floor:.1f}x | "
              f"{flops / moved:.0f} | {roofline(flops, moved) / roofline(*today):.2f} | {int((rows > 0).sum())} |")


if __name__ == "__main__":
    main()
