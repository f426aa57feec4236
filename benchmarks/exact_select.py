"""HP's selection three ways, side by side on the same features: exact fp32, and bf16 products (one pass or
three) with the fp32 re-check of `raysseg/core/exact_select.py`. Prints a table: milliseconds for the anchor
criterion + mask (median of --repeats), the share of pairs re-checked, and whether the mask equals fp32's.

Features: a random ViT-S/16 on CamVid train images at 224 px (--images of them; N = 196 per image), the pool
a random half of them (batch patches, so thresholds tie products exactly, as in HP's pools).

    .venv/bin/python benchmarks/exact_select.py --images 8 --threads 2
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from raysseg.core.backbones import IMAGENET_MEAN, IMAGENET_STD, ViTBackbone
from raysseg.core.exact_select import exact_row_max, exact_select
from raysseg.methods.hp.core import anchor_criterion, hidden_positive_mask


def camvid_features(folder: Path, images: int) -> torch.Tensor:
    files = sorted(folder.glob("*.png"))[::max(1, len(list(folder.glob("*.png"))) // images)][:images]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    batch = torch.stack([(torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((224, 224)),
                                                      dtype=np.float32)).permute(2, 0, 1) / 255 - mean) / std
                         for p in files])
    torch.manual_seed(0)
    with torch.no_grad():
        feats = ViTBackbone("vit_small_patch16").eval()(batch).features
    return F.normalize(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), dim=1)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--camvid", default="../shared/data/camvid/train/images")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    f = camvid_features(Path(args.camvid), args.images)
    pool = f[torch.randperm(f.shape[0], generator=torch.Generator().manual_seed(0))[:f.shape[0] // 2]].clone()
    chunk = args.chunk
    crit = anchor_criterion(f, pool, chunk)
    ref = hidden_positive_mask(f, pool, chunk)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads; N = {f.shape[0]} patches "
          f"({args.images} CamVid images, random ViT-S/16), pool {pool.shape[0]}, chunk {chunk}\n")
    print("| selection | criterion + mask ms (median) | vs fp32 | pairs re-checked (mask) | (row maxima) | equal |")
    print("|---|---:|---:|---:|---:|---|")
    fp32_ms = median_ms(lambda: hidden_positive_mask(f, pool, chunk), args.repeats)
    print(f"| fp32 | {fp32_ms:.1f} | 1.00x | | | |")
    for scheme, name in (("bf16", "bf16_recheck"), ("bf16x3", "bf16x3_recheck"), ("fp16", "fp16_recheck")):
        ms = median_ms(lambda: hidden_positive_mask(f, pool, chunk, name), args.repeats)
        s_max, s_sel = {}, {}
        same = torch.equal(exact_row_max(f, pool, chunk, scheme, stats=s_max), crit)
        got = exact_select(f, f, crit, crit, chunk=chunk, scheme=scheme, stats=s_sel)
        got.fill_diagonal_(False)
        same = same and torch.equal(got, ref)
        print(f"| {name} | {ms:.1f} | {fp32_ms / ms:.2f}x | {s_sel['rechecked'] / s_sel['pairs']:.2%} | "
              f"{s_max['rechecked'] / s_max['pairs']:.2%} | {'yes' if same else '**NO**'} |")


if __name__ == "__main__":
    main()
