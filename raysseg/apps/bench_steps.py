"""Training-step benchmarks that need only torch: ``raysseg bench step --local`` (one method, one
precision) and ``raysseg bench gpu`` (every method at the papers' settings, fp32 and bf16, one table).

Both time the real trainers on synthetic scenes held in memory (:mod:`raysseg.engine.steps`), so
they run where Ray, MLflow, faiss and pyarrow are not installed (a bare GPU machine):
``python -m raysseg.apps.cli bench gpu``. FLOPs are counted with ``torch.utils.flop_counter``.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raysseg.core.device import clock
from raysseg.core.machine import count_flops, count_flops_split, describe
from raysseg.settings import ConfigError

# The papers' settings per GPU (one worker = one GPU): the configs users run, at their batch and size.
PAPER_SETTINGS = {
    "hp": ("hp_cocostuff", []),  # ViT-S/8, batch 64 at 224, pool 2048
    "picie": ("picie_cocostuff", []),  # R50-FPN 128-d, batch 16 at 320
    "pgg": ("pgg_cocostuff", []),  # R50-FPN 256-d, pyramid guidance, CAE, batch 16 at 320
    "segsort": ("segsort_voc", ["train.batch_size=8"]),  # R50-FPN, 32-d embeddings; the paper's 8 images per step
    "concepts": ("concepts_voc", ["train.batch_size=8"]),
    "stego": ("stego_cocostuff", []),  # ViT-S/8, batch 16 at 224, each image with its KNN partner
    "moco": ("pgg_cocostuff", ["pretrain.crop_size=224"]),  # MoCo v2 on the R50-FPN trunk: batch 32 per GPU, 2 crops at 224
}
# The CPU mode: the same code paths at sizes a laptop (and the default tests) can run.
CPU_SETTINGS = {
    "hp": ("hp_camvid", ["train.batch_size=2", "data.image_size=64", "hp.pool_size=16", "model.code_dim=32"]),
    "picie": ("picie_camvid", ["train.batch_size=2", "data.image_size=64", "model.backbone=resnet18_fpn",
                               "model.fpn_dim=16", "kmeans.init_sample=500"]),
    "pgg": ("pgg_camvid", ["train.batch_size=2", "data.image_size=64", "model.backbone=resnet18_fpn",
                           "model.fpn_dim=16", "kmeans.init_sample=500", "pgg.global_clusters=4"]),
    "segsort": ("segsort_camvid", ["train.batch_size=2", "data.image_size=64", "model.backbone=resnet18_fpn",
                                   "model.fpn_dim=16", "segsort.embed_dim=8", "segments.min_size=20"]),
    "concepts": ("concepts_camvid", ["train.batch_size=2", "data.image_size=64", "model.backbone=resnet18_fpn",
                                     "model.fpn_dim=16", "segsort.embed_dim=8", "segments.min_size=20",
                                     "concepts.n_concepts=16"]),
    "stego": ("stego_camvid", ["train.batch_size=2", "data.image_size=64", "model.code_dim=16", "stego.points=4"]),
    "moco": ("pgg_camvid", ["model.backbone=resnet18_fpn", "model.fpn_dim=16", "pretrain.batch_size=4",
                            "pretrain.queue=64", "pretrain.crop_size=64"]),
}
DISTINCT_IMAGES = 64  # synthetic scenes generated; rows beyond that repeat them under other paths
CLUSTER_ROWS = 64  # images of the split the per-epoch clustering and pseudo labels see (setup cost only)
CPU_CLUSTER_ROWS = 16  # the same in the CPU mode


@dataclass
class StepResult:
    method: str
    backbone: str
    batch: int
    size: int
    precision: str
    device: str
    step_s: list[float] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)  # seconds per step
    peak_memory_gib: float = 0.0
    memory_kind: str = ""
    backbone_gflop_per_image: float = 0.0  # forward
    backbone_fwd_s: float = 0.0
    step_gflop: float = 0.0  # everything one step runs, backward included
    step_exact_gflop: float = 0.0  # of which in exact fp32 (decisions: no tensor cores on a GPU)
    recheck_frac: float | None = None  # HP's low-precision selection: share of its pairs re-checked in fp32
    recheck_gathered_gb: float | None = None  # and what that re-check's gathers write (its GEMMs read it again)
    peak_flops: float = float("nan")
    peak_source: str = ""

    @property
    def images_per_s(self) -> float:
        return self.batch / statistics.median(self.step_s)

    def row(self) -> list[str]:
        step = statistics.median(self.step_s)
        bb_flops = self.backbone_gflop_per_image * 1e9 * self.batch / max(self.backbone_fwd_s, 1e-12)
        step_flops = self.step_gflop * 1e9 / step
        parts = " · ".join(f"{k} {1000 * v:.0f}" for k, v in self.parts.items() if k != "step")
        return [self.method, self.backbone, f"{self.batch} x {self.size}", self.precision, f"{self.images_per_s:.1f}",
                f"{1000 * step:.0f}", f"{self.peak_memory_gib:.2f} ({self.memory_kind})", parts or "-",
                f"{self.backbone_gflop_per_image:.1f}", f"{bb_flops / 1e12:.2f} ({100 * bb_flops / self.peak_flops:.0f}%)",
                f"{step_flops / 1e12:.2f} ({100 * step_flops / self.peak_flops:.0f}%)"]


HEADER = ["method", "backbone", "batch x size", "precision", "images/s", "step ms (median)", "peak memory GiB",
          "parts ms/step", "backbone GFLOP/image (fwd)", "backbone fwd TFLOP/s (% peak)", "whole step TFLOP/s (% peak)"]


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "CUDA allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"


def _time_backbone(backbone, x: torch.Tensor, precision, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds of one no-grad forward of the batch, its FLOPs)."""
    with torch.no_grad(), precision.autocast():
        backbone(x)  # warm-up (cuDNN autotuning, lazy inits)
        flops = count_flops(lambda: backbone(x))
        times = []
        for _ in range(repeats):
            t0 = clock(device)
            backbone(x)
            times.append(clock(device) - t0)
    return statistics.median(times), flops


def _config(name: str, overrides: list[str]):
    from raysseg.config import load_config

    # random weights (model.weights=): a step costs the same with the paper configs' pretrained ones
    return load_config(name, ["data.limit=0", "train.num_workers=1", "train.use_gpu=false", "model.weights=",
                              *overrides])


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def folder_images(folder: str, n: int, size: int) -> np.ndarray:
    """The first ``n`` images (sorted paths) under a local folder (its ``images/`` if it has one), each resized to
    a short side of ``size`` and centre-cropped: uint8 (m, size, size, 3), m <= n. Torch-only machines: PIL, no Ray."""
    from PIL import Image

    root = Path(folder)
    root = root / "images" if (root / "images").is_dir() else root
    paths = sorted(q for q in root.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if not paths:
        raise ConfigError(f"--scenes {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}; "
                          "point it at a folder of images or a split with an images/ folder")
    out = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        (w, h), side = image.size, min(image.size)  # the centred square, resized: short side to size, centre crop
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        out.append(np.asarray(image.resize((size, size), Image.BILINEAR, box=box)))
    return np.stack(out)


def step_benchmark(method: str, device: str, precision: str, overrides: list[str], steps: int = 8, warmup: int = 2,
                   paper: bool = False, scenes: str = "") -> StepResult:
    """Time ``steps`` training steps of ``method`` (after ``warmup`` steps) on synthetic scenes, or on the images
    of the folder ``scenes``."""
    from raysseg.apps.synth import synth_images
    from raysseg.core.backbones import standardize
    from raysseg.core.device import peak_flops
    from raysseg.core.precision import Precision
    from raysseg.engine.steps import build_rig, memory_rows

    name, preset = (PAPER_SETTINGS if paper else CPU_SETTINGS)[method]
    cfg = _config(name, [*preset, *overrides, f"train.precision={precision}"])
    dev = torch.device(device)
    prec = Precision(precision, dev.type)
    if method == "moco":
        return _moco_benchmark(cfg, dev, prec, steps, warmup, scenes)
    size, batch = cfg.data.image_size, cfg.train.batch_size
    images = folder_images(scenes, DISTINCT_IMAGES, size) if scenes else synth_images(DISTINCT_IMAGES, size,
                                                                                       seed=cfg.train.seed)
    n_rows = max(CLUSTER_ROWS if paper else CPU_CLUSTER_ROWS, batch, cfg.hp.pool_size if method == "hp" else 0)
    rig = build_rig(cfg, memory_rows(images, n_rows), dev, total_steps=steps + warmup)
    batches = rig.batches()
    for i in range(warmup):
        rig.trainer.train_step(next(batches), i)
    rig.trainer.timers.clear()
    _reset_memory(dev)
    result = StepResult(method, cfg.model.backbone, batch, size, precision, str(dev))
    for i in range(warmup, warmup + steps):
        batch_rows = next(batches)
        t0 = clock(dev)
        rig.trainer.train_step(batch_rows, i)
        result.step_s.append(clock(dev) - t0)
    result.peak_memory_gib, result.memory_kind = _peak_memory(dev)
    result.parts = {k: v / steps for k, v in rig.trainer.timers.items()}
    batch_rows = next(batches)
    counted: dict = {}
    total, exact = count_flops_split(lambda: counted.update(rig.trainer.train_step(batch_rows, warmup + steps)))
    result.step_gflop, result.step_exact_gflop = total / 1e9, exact / 1e9
    result.recheck_frac = counted.get("recheck_frac")
    result.recheck_gathered_gb = counted.get("recheck_gathered_gb")
    x = standardize(torch.from_numpy(batch_rows["image"]).to(dev).permute(0, 3, 1, 2).float().div(255))
    fwd_s, fwd_flops = _time_backbone(rig.seg.backbone, x, prec, dev, repeats=max(3, steps // 2))
    result.backbone_fwd_s, result.backbone_gflop_per_image = fwd_s, fwd_flops / 1e9 / batch
    result.peak_flops, result.peak_source = peak_flops(dev, precision)
    return result


def _moco_benchmark(cfg, dev: torch.device, prec, steps: int, warmup: int, scenes: str = "") -> StepResult:
    """MoCo v2 steps (query and key encoders on two crops, queue) on synthetic scenes or ``scenes``' images."""

    from raysseg.apps.synth import synth_images
    from raysseg.core.backbones import standardize
    from raysseg.core.device import configure, peak_flops
    from raysseg.methods.base import TrainContext
    from raysseg.methods.moco.trainer import MoCoTrainer, build_moco, crop_size
    from raysseg.methods.shared import LocalSharedState

    pc = cfg.pretrain
    configure(dev)
    torch.manual_seed(cfg.train.seed)
    moco = build_moco(cfg, dev)
    moco.sync_key_encoder()
    ctx = TrainContext(rank=0, world=1, device=dev, shared=LocalSharedState(), total_steps=steps + warmup + 1,
                       precision=prec)
    trainer = MoCoTrainer(cfg, moco, ctx)
    size = crop_size(cfg)
    side, n = max(size, cfg.data.image_size), min(DISTINCT_IMAGES, pc.batch_size)
    images = folder_images(scenes, n, side) if scenes else synth_images(n, side, seed=cfg.train.seed)
    batch = images[np.arange(pc.batch_size) % len(images)]
    weight = np.ones(pc.batch_size, np.float32)
    for i in range(warmup):
        trainer.step(batch, weight, i)
    _reset_memory(dev)
    result = StepResult("moco", cfg.model.backbone, pc.batch_size, size, prec.name, str(dev))
    for i in range(warmup, warmup + steps):
        t0 = clock(dev)
        trainer.step(batch, weight, i)
        result.step_s.append(clock(dev) - t0)
    result.peak_memory_gib, result.memory_kind = _peak_memory(dev)
    total, exact = count_flops_split(lambda: trainer.step(batch, weight, warmup + steps))
    result.step_gflop, result.step_exact_gflop = total / 1e9, exact / 1e9
    x = standardize(torch.from_numpy(batch[:, :size, :size]).to(dev).permute(0, 3, 1, 2).float().div(255))
    fwd_s, fwd_flops = _time_backbone(moco.backbone, x, prec, dev, repeats=max(3, steps // 2))
    result.backbone_fwd_s, result.backbone_gflop_per_image = fwd_s, fwd_flops / 1e9 / pc.batch_size
    result.peak_flops, result.peak_source = peak_flops(dev, prec.name)
    return result


def machine() -> str:
    return f"{describe()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def table(title: str, results: list[StepResult]) -> str:
    peaks = sorted({f"{r.precision}: {r.peak_flops / 1e12:.1f} TFLOP/s ({r.peak_source})" for r in results})
    lines = [f"### {title}", "", f"Machine: {machine()}", "", "Peak FLOP/s used for the percentages: "
             + "; ".join(peaks), "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.row()) + " |" for r in results]
    return "\n".join(lines) + "\n"


def bench_step_local(method: str, device: str, precision: str, steps: int, paper: bool = False,
                     overrides: list[str] = (), scenes: str = "") -> str:
    """``raysseg bench step --local``: one method's step in this process (CPU-sized unless ``paper``;
    ``overrides`` are ``key=value`` settings on top; ``scenes``: a folder of images instead of synthetic scenes)."""
    result = step_benchmark(method, device, precision, list(overrides), steps=steps, paper=paper, scenes=scenes)
    return table(f"{method} training step in process ({'papers settings' if paper else 'CPU settings'}"
                 f"{', images of ' + scenes if scenes else ''}), median of {steps} steps", [result])


# HP's low-precision selections, timed in bf16 beside its exact fp32 one by `bench gpu`
GPU_SELECTIONS = ("bf16_recheck", "bf16x3_recheck", "fp16_recheck")


def bench_gpu(device: str = "cuda", precisions=("fp32", "bf16"), methods=tuple(PAPER_SETTINGS), steps: int = 8,
              paper: bool = True) -> str:
    """Every method's step at the papers' settings in each precision: one table (``paper=False``: the CPU mode).
    HP also runs in bf16 with each of :data:`GPU_SELECTIONS` (its row names the selection and prints the share of
    pairs re-checked)."""
    results = []
    for method in methods:
        runs = [(precision, []) for precision in precisions]
        if method == "hp" and "bf16" in precisions:
            runs += [("bf16", [f"hp.selection={selection}"]) for selection in GPU_SELECTIONS]
        for precision, overrides in runs:
            name = method + "".join(f" ({o.split('=')[1]})" for o in overrides)
            t0 = time.perf_counter()
            try:
                results.append(step_benchmark(method, device, precision, overrides, steps=steps, paper=paper))
            except torch.OutOfMemoryError as exc:
                print(f"[bench gpu] {name} {precision}: out of memory ({' '.join(str(exc).split())[:120]})", flush=True)
                continue
            finally:
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
            r = results[-1]
            r.method = name
            share = "" if r.recheck_frac is None else f", {r.recheck_frac:.2%} of pairs re-checked"
            print(f"[bench gpu] {name} {precision}: {r.images_per_s:.1f} images/s{share} "
                  f"({time.perf_counter() - t0:.0f} s with setup)", flush=True)
    return table(f"Training step per method, {'papers settings' if paper else 'CPU mode'}, "
                 f"median of {steps} steps", results)


def step_gflop(method: str, batch: int, overrides: list[str],
               scenes: str = "") -> tuple[float, float, float | None, float]:
    """GFLOP of one training step of ``method`` at the papers' settings with ``batch`` images, counted on the CPU,
    how many of them run in exact fp32, the share of HP's selection pairs re-checked (None without one) and the GB
    its re-check gathers (0 without one)."""
    result = step_benchmark(method, "cpu", "fp32", [f"train.batch_size={batch}", f"pretrain.batch_size={batch}",
                                                    *overrides], steps=1, warmup=1, paper=True, scenes=scenes)
    return result.step_gflop, result.step_exact_gflop, result.recheck_frac, result.recheck_gathered_gb or 0.0


# The rows of `bench demand`: HP once per hp.selection (the selection's products in exact fp32, or in bf16 with
# an fp32 re-check of the pairs near their thresholds).
DEMAND_ROWS = {"hp": [["hp.selection=fp32"], ["hp.selection=bf16_recheck"], ["hp.selection=bf16x3_recheck"],
                      ["hp.selection=fp16_recheck"]]}


def bench_demand(gpu_tflops: float = 989.4, gpu_fp32_tflops: float = 67.0, gpu_tb_s: float = 3.35,
                 utilisation: float = 0.4, methods: tuple[str, ...] = tuple(PAPER_SETTINGS), scenes: str = "") -> str:
    """Images/s one GPU would consume per method at the papers' settings, from FLOPs counted on the CPU.

    A step's FLOPs are counted at two small batches and fitted as a * B + b * B^2 (HP's selection and
    contrastive loss compare every patch of the batch with every other: quadratic in B), then taken at
    the papers' batch; the FLOPs in exact fp32 (decisions, :func:`raysseg.core.machine.count_flops_split`)
    are fitted apart. A step's time = utilisation x (tensor-core FLOPs / the GPU's dense bf16 peak + exact
    fp32 FLOPs / its fp32 peak without tensor cores); defaults: H100 SXM / H200 datasheets, 989.4 and 67. HP's
    selection (its products: the fp32 row's exact FLOPs; in the others the FLOPs beyond the fp32 row's rest) gets
    its share of that time.
    The low-precision selections' re-check multiplies rows and columns its gathers first write out (counted, and
    fitted the same way): written, then read, at ``gpu_tb_s`` (H100 SXM: 3.35 TB/s; H200: 4.8) that can take
    longer than its FLOPs. The last two columns price the exact part at the longer of the two, at the same
    utilisation: a roofline, so still a lower bound on the time.
    The steps run on synthetic scenes, or on the images of the folder ``scenes`` (HP's fp32 re-check of
    ``bf16_recheck`` is data-dependent: it re-computes only the pairs near their thresholds)."""
    def at_paper_batch(f1: float, f2: float, b1: int, b2: int, batch: int) -> float:
        quad = (f2 / b2 - f1 / b1) / (b2 - b1)  # per-image FLOPs = a + b * B
        return f1 / b1 - quad * b1 + quad * batch

    rows = []
    rest = 0.0  # HP: GFLOP per image outside the selection's products (the fp32 row's total less its exact part)
    for method in methods:
        cfg = _config(PAPER_SETTINGS[method][0], PAPER_SETTINGS[method][1])
        paper_batch = cfg.pretrain.batch_size if method == "moco" else cfg.train.batch_size
        # HP: the pool's features cost B x M, not B^2 (a small pool), and the counted step is past the warm-up, so
        # lambda > 0 and the task-specific positives are selected too (2 N^2 x code_dim more exact products)
        small = ["hp.pool_size=64", "hp.warmup=0"] if method == "hp" else []
        for variant in DEMAND_ROWS.get(method, [[]]):
            b1, b2 = (2, 4)
            (f1, e1, s1, g1), (f2, e2, s2, g2) = (step_gflop(method, b, small + variant, scenes) for b in (b1, b2))
            per_image, exact = at_paper_batch(f1, f2, b1, b2, paper_batch), at_paper_batch(e1, e2, b1, b2, paper_batch)
            gathered = at_paper_batch(g1, g2, b1, b2, paper_batch)  # GB per image
            fast_s, exact_s = (per_image - exact) / (gpu_tflops * 1e3), exact / (gpu_fp32_tflops * 1e3)
            exact_roof_s = max(exact_s, 2 * gathered / (gpu_tb_s * 1e3))  # written, then read
            seconds, roof_seconds = fast_s + exact_s, fast_s + exact_roof_s
            name = method + (f" ({', '.join(variant)})" if variant else "")
            share = "-" if s1 is None else f"{s1:.1%} / {s2:.1%}"
            selection = roof_selection = "-"
            if method == "hp":
                rest = per_image - exact if variant == ["hp.selection=fp32"] else rest
                fast_selected = (per_image - exact - rest) / (gpu_tflops * 1e3)
                selection = f"{(fast_selected + exact_s) / seconds:.0%}"
                roof_selection = f"{(fast_selected + exact_roof_s) / roof_seconds:.0%}"
            rows.append([name, f"{paper_batch}", f"{f1 / b1:.0f}", f"{f2 / b2:.0f}", f"{per_image:.0f}",
                         f"{exact:.1f}", share, selection, f"{utilisation / seconds:,.0f}", f"{gathered:.2f}",
                         roof_selection, f"{utilisation / roof_seconds:,.0f}"])
            print(f"[bench demand] {name}: {per_image:.0f} GFLOP per image at batch {paper_batch}, "
                  f"{exact:.1f} in exact fp32", flush=True)
    header = ["method", "papers batch", "GFLOP/image at B=2", "GFLOP/image at B=4", "GFLOP/image at the papers batch",
              "of which exact fp32", "pairs re-checked at B=2 / 4", "selection's share of the FLOP-time",
              f"images/s per GPU at {100 * utilisation:.0f}% of {gpu_tflops:.0f} (bf16) "
              f"and {gpu_fp32_tflops:.0f} (fp32) TFLOP/s", "re-check's gathers, GB/image",
              f"selection's share with the gathers at {gpu_tb_s:g} TB/s", "images/s then"]
    on = f"the images of {scenes}" if scenes else "synthetic scenes"
    lines = [f"### Demand: training images/s one GPU consumes (FLOPs of a step on {on}, torch.utils.flop_counter)",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def main(args) -> None:
    """Print (and with ``args.out`` append to a file) the table of ``args.what``: ``step`` or ``gpu``."""
    device = args.device
    scenes = getattr(args, "scenes", "") or ""
    if args.what == "demand":
        text = bench_demand(methods=(args.method,) if args.method else tuple(PAPER_SETTINGS), scenes=scenes)
    elif args.what == "gpu":
        text = bench_gpu(device=device, steps=args.steps, paper=torch.device(device).type == "cuda")
    else:
        text = bench_step_local(args.method or "hp", device, args.precision, args.steps, paper=args.paper,
                                overrides=args.set or [], scenes=scenes)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":  # python -m raysseg.apps.bench_steps [--device cuda]: the GPU table, torch only
    import argparse

    cli = argparse.ArgumentParser(description="every method's training step, fp32 and bf16, one table")
    cli.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_argument("--steps", type=int, default=8)
    cli.add_argument("--out", default=None)
    main(argparse.Namespace(what="gpu", **vars(cli.parse_args())))
