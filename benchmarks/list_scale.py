"""Bucket scale: what the driver of `raysseg train` pays, before training starts, for a split of many objects.

Starts a SeaweedFS server (:class:`raysseg.io.storage.SeaweedServer`), uploads splits of small PNGs and, for each
source tree given with ``--tree NAME=PATH`` (its raysseg is imported), runs in a fresh process the driver's
steps of `raysseg train` (HP) that grow with the split: the input checks, the data cache (off), the method's
plan and the Ray datasets of every read (after Ray has started; nothing is trained). For each: the LIST
requests the server answered for the bucket, the process's peak RSS (VmHWM; also its RSS once Ray had
started) and the seconds those steps took; also the seconds of one plain paginated listing of the split.
What does not grow with the split (starting Ray, the Train workers, building the model) comes on top.

    .venv/bin/python benchmarks/list_scale.py --objects 2000,100000 --tree before=/work/ext/before --tree after=.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from raysseg.io.storage import SeaweedServer

BUCKET = "listscale"


def _pngs(count: int = 16) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        im = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).resize((64, 64))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def upload(client, prefix: str, n: int) -> None:
    """``n`` PNGs at <prefix>/images/<i // 1000>/<i>.png."""
    pngs = _pngs()

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/images/{i // 1000:04d}/{i:08d}.png", Body=pngs[i % len(pngs)])

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(n)))


def time_listing(client, prefix: str) -> tuple[float, int, int]:
    """(seconds, pages, keys) of one ListObjectsV2 pagination of the split."""
    t0, pages, keys = time.perf_counter(), 0, 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        pages += 1
        keys += len(page.get("Contents", ()))
    return time.perf_counter() - t0, pages, keys


PHASE = r"""
import json, os, sys, time
t_start = time.perf_counter()
from raysseg.config import load_config
from raysseg.engine import inputs
from raysseg.runtime.datasets import make_dataset
from raysseg.runtime.driver import init_ray

def rss(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

cfg = load_config("hp_camvid", sys.argv[2:])
init_ray(1)  # fixed cost, not timed: the phase below is what grows with the split
base = rss("VmRSS:")
t0 = time.perf_counter()
if hasattr(inputs, "check_training"):  # one listing, passed on
    n, listing = inputs.check_training(cfg)
    plan, reads = inputs.run_plan(cfg, inputs.prepared_split(cfg, listing=listing), listing=listing)
else:
    n = inputs.check_inputs(cfg)
    plan, reads = inputs.run_plan(cfg, inputs.prepared_split(cfg))
t_plan = time.perf_counter() - t0
peak_plan = rss("VmHWM:")
datasets = {name: make_dataset(cfg.data.train, **options, epoch_clock=object(), train_seed=0)
            for name, options in reads.items()}
seconds = time.perf_counter() - t0
print("RESULT " + json.dumps({"images": n, "phase_s": seconds, "plan_s": t_plan, "base_mb": base / 1024, "peak_plan_mb": peak_plan / 1024,
                              "peak_mb": rss("VmHWM:") / 1024}), flush=True)
"""


def run_phase(tree: str, split: str, work: str, server: SeaweedServer) -> dict:
    """The driver's work between its start and the Train workers that grows with the split: the checks, the
    plan and the Ray datasets of `raysseg train` (HP), in a fresh process importing ``tree``."""
    env = {**os.environ, **server.client_env, "PYTHONPATH": tree}
    env.pop("RAY_ADDRESS", None)
    sets = [f"data.train={split}", "data.image_size=64", "train.num_workers=1", "train.batch_size=4",
            f"train.storage={work}/runs", "hp.pool_size=64"]
    lists0 = server.request_count("LIST", BUCKET)
    done = subprocess.run([sys.executable, "-c", PHASE, "x", *sets], cwd=work, env=env, capture_output=True,
                          text=True, timeout=3600)
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not found:
        raise SystemExit(f"{tree}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {**json.loads(found[0][7:]), "lists": server.request_count("LIST", BUCKET) - lists0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", default="2000,100000", help="split sizes, comma-separated")
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a raysseg source tree")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    sizes = [int(s) for s in args.objects.split(",")]
    import boto3

    results = []
    with tempfile.TemporaryDirectory(prefix="list-scale-") as tmp:
        access, secret = SeaweedServer.generate_credentials()
        with SeaweedServer(Path(tmp) / "seaweed", access_key=access, secret_key=secret) as server:
            server.create_bucket(BUCKET)
            client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=access,
                                  aws_secret_access_key=secret, region_name="us-east-1")
            for n in sizes:
                prefix = f"split{n}"
                t0 = time.perf_counter()
                upload(client, prefix, n)
                print(f"uploaded {n} objects in {time.perf_counter() - t0:.0f} s", flush=True)
                seconds, pages, keys = time_listing(client, prefix)
                for name, tree in trees.items():
                    work = tempfile.mkdtemp(dir=tmp)
                    row = {"tree": name, "objects": n, "one_listing_s": round(seconds, 2), "listing_pages": pages,
                           **run_phase(os.path.abspath(tree), f"s3://{BUCKET}/{prefix}", work, server)}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    print("| tree | objects | LIST requests (one listing's pages) | driver peak RSS (after Ray started) | "
          "split-dependent seconds before training | one plain listing |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['tree']} | {r['objects']:,} | {r['lists']} ({r['listing_pages']}) | {r['peak_mb']:.0f} MB "
              f"({r['base_mb']:.0f}) | {r['phase_s']:.1f} s | {r['one_listing_s']:.1f} s |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
