"""Benchmarks that print a table (``raysseg bench data|eval|step``), on the CamVid copy in ../shared.

Each runs the real code path (Ray Data, Ray Train, the S3 server, MLflow) in a
temporary directory and prints a markdown table; ``--out`` also writes it to a file.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

CAMVID = Path(os.environ.get("RAYSSEG_CAMVID", "../shared/data/camvid"))


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB, {gpu}"


def _table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", f"Machine: {machine()}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _camvid() -> Path:
    if not (CAMVID / "train" / "images").is_dir():
        raise SystemExit(f"benchmarks read CamVid from {CAMVID}; set RAYSSEG_CAMVID to its folder")
    return CAMVID.resolve()


def bench_data() -> str:
    """Images/s of the Ray Data pipeline over CamVid train, from a folder and from the local S3 server."""
    import secrets

    from raysseg.data import make_dataset, upload
    from raysseg.storage import SeaweedServer
    from raysseg.train import init_ray

    camvid = _camvid()
    init_ray()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", secrets.token_hex(12))
        with SeaweedServer(tmp) as server:
            os.environ["AWS_ENDPOINT_URL"] = server.endpoint
            server.create_bucket("bench")
            upload(str(camvid / "train"), "s3://bench/camvid/train")
            for source, uri in (("folder", str(camvid / "train")), ("S3 (local SeaweedFS)", "s3://bench/camvid/train")):
                for train in (False, True):
                    ds = make_dataset(uri, image_size=224, train=train, with_labels=False)
                    for _ in ds.iter_batches(batch_size=32):  # warm-up pass
                        pass
                    t0 = time.perf_counter()
                    n = sum(len(b["image"]) for b in ds.iter_batches(batch_size=32, batch_format="numpy"))
                    dt = time.perf_counter() - t0
                    what = "random crop + flip" if train else "resize + centre crop"
                    rows.append([source, what, n, f"{dt:.2f}", f"{n / dt:.0f}"])
    return _table("Ray Data pipeline, CamVid train at 224x224", ["source", "transform", "images", "seconds", "images/s"],
                  rows)


def _run_config(name: str, tmp: str, overrides: list[str]):
    from raysseg.config import load_config

    camvid = _camvid()
    return load_config(name, [f"data.train={camvid / 'train'}", f"data.val={camvid / 'val'}",
                              f"train.storage={tmp}/runs", f"mlflow.tracking_uri=sqlite:///{tmp}/mlruns.db",
                              *overrides])


def bench_eval() -> str:
    """Time to evaluate CamVid val (k-means baseline checkpoint), with and without CRF."""
    from raysseg.evaluate import evaluate
    from raysseg.train import train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        result = train(_run_config("kmeans_camvid", tmp, []))
        for crf in (False, True):
            t0 = time.perf_counter()
            report = evaluate(result.checkpoint, crf=crf, out=f"{tmp}/eval", log_to_mlflow=False)
            dt = time.perf_counter() - t0
            s = report["scores"]
            suffix = "_crf" if crf else ""
            rows.append(["with CRF" if crf else "no CRF", report["n_images"], f"{dt:.1f}",
                         f"{100 * s['clusters' + suffix]['miou']:.1f}", f"{100 * s['probe' + suffix]['miou']:.1f}"])
    return _table("Evaluation of CamVid val (101 images, 176x176, incl. linear probe)",
                  ["variant", "images", "seconds", "clusters mIoU", "probe mIoU"], rows)


def bench_step(method: str) -> str:
    """Iterations/s, peak memory and where the time goes, batch 8 at 224 with ViT-S/16, 1 and 2 workers."""
    from raysseg.train import train

    steps, batch = 6, 8
    rows = []
    for workers in (1, 2):
        limit = steps * batch * workers
        with tempfile.TemporaryDirectory() as tmp:
            cfg = _run_config(f"{method}_camvid", tmp, [
                "data.image_size=224", f"train.batch_size={batch}", f"train.num_workers={workers}", "train.epochs=1",
                f"data.limit={limit}", f"hp.pool_size={min(256, limit)}", "hp.warmup=0", "hp.renew_every=2",
                "hp.sigma=14.0", "kmeans.pixels_per_image=10",
            ])
            m = train(cfg).metrics
        step = m["time_step_s"]
        parts = ["backbone", "selection", "loss", "head_forward", "backward", "bank"]  # inside a step
        rows.append([workers, f"{m['iterations_per_s']:.3f}", f"{m['iterations_per_s'] * batch * workers:.1f}",
                     f"{m['peak_rss_mb'] / 1024:.2f}"]
                    + [f"{m.get(f'time_{p}_s', 0):.3f} ({100 * m.get(f'time_{p}_s', 0) / step:.0f}%)" for p in parts]
                    + [f"{m['time_data_wait_s']:.3f}", f"{m['time_pool_build_s']:.1f}"])
    header = ["workers", "it/s", "images/s", "peak RSS GiB (rank 0)", "backbone fwd s/it", "selection s/it",
              "contrastive loss s/it", "all head fwd s/it", "backward+opt s/it", "bank s/it", "waiting for data s/it",
              "pool build s (once)"]
    return _table(f"{method.upper()} training step, batch {batch}/worker at 224x224, ViT-S/16 (frozen), {steps} steps",
                  header, rows)


def main(args) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    table = {"data": bench_data, "eval": bench_eval}.get(args.what)
    text = table() if table else bench_step(args.method)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
