"""A frozen ViT's forward on CPU with its linears on oneDNN (``core.backbones.OneDnnLinear``, the project's
default) against timm's own ``nn.Linear`` modules (MKL's sgemm), same weights, same inputs, in turn.

Prints a table: CPU-seconds per forward (median over --rounds, each round timing both in turn so that the
machine's load falls on both alike), the ratio, and the largest difference of the outputs.

    .venv/bin/python benchmarks/vit_linears.py --backbone vit_small_patch16 --batch 8 --size 224 --threads 1
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import timm
import torch

from raysseg.core.backbones import VIT_MODELS, ViTBackbone


def cpu_seconds(fn, repeats: int) -> float:
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_small_patch16", choices=sorted(VIT_MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="forwards per round and side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = ViTBackbone(args.backbone).eval()
    plain = timm.create_model(VIT_MODELS[args.backbone], pretrained=False, num_classes=0, dynamic_img_size=True)
    plain.load_state_dict(ours.vit.state_dict())
    plain.eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    sides = {"timm nn.Linear (MKL sgemm)": lambda: plain.forward_features(x),
             "OneDnnLinear (oneDNN, GELU fused)": lambda: ours.forward_tokens(x)[0]}
    times: dict[str, list[float]] = {name: [] for name in sides}
    with torch.no_grad():
        diff = float((sides["timm nn.Linear (MKL sgemm)"]() - sides["OneDnnLinear (oneDNN, GELU fused)"]()).abs().max())
        for _ in range(args.rounds):
            for name, fn in sides.items():
                times[name].append(cpu_seconds(fn, args.repeats))
    base = np.array(times["timm nn.Linear (MKL sgemm)"])
    print(f"{args.backbone} forward, batch {args.batch} at {args.size} px, {args.threads} thread(s), "
          f"{platform.machine()}, torch {torch.__version__}; median of {args.rounds} rounds in turn")
    print("| linears | CPU-seconds per forward | vs timm's (per round) |")
    print("|---|---:|---|")
    for name, per_round in times.items():
        ratios = base / np.array(per_round)
        print(f"| {name} | {np.median(per_round):.3f} | {np.median(ratios):.2f}x "
              f"({', '.join(f'{r:.2f}' for r in ratios)}) |")
    print(f"largest output difference: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
