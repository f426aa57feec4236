"""The training step of two source trees side by side: A/B runs alternating in fresh processes.

    python benchmarks/compare_step.py OLD_TREE NEW_TREE [--methods hp,picie,segsort] [--repeats 3]

Each run trains one epoch of ``<method>_camvid`` in process (``train_local``: no Ray, no MLflow)
on the first images of CamVid train with the same settings in both trees, and reports the
trainer's own mean step time (``time_step_s``: data loading, pools and clustering excluded).
Runs alternate A, B, A, B, ... so both trees see the same machine load. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, tempfile
from raysseg.config import load_config
from raysseg.engine.local import train_local
method, camvid, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with tempfile.TemporaryDirectory() as tmp:
    cfg = load_config(f"{method}_camvid", [f"data.train={camvid}/train", f"data.val={camvid}/val",
                                           f"train.storage={tmp}/runs", *overrides])
    metrics = train_local(cfg).metrics
print("RESULT " + json.dumps({k: v for k, v in metrics.items() if k.startswith("time_")}))
"""

SETTINGS = ["data.image_size=224", "train.batch_size=8", "train.epochs=1", "train.num_workers=1", "data.limit=80",
            "hp.pool_size=80", "hp.warmup=0", "hp.renew_every=2", "kmeans.pixels_per_image=10",
            "kmeans.init_sample=5000", "pgg.global_clusters=20"]


def run(tree: str, method: str, camvid: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "OMP_NUM_THREADS": str(os.cpu_count())}
    proc = subprocess.run([sys.executable, "-c", CHILD, method, camvid, json.dumps(SETTINGS)], env=env,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{tree} {method} failed:\n{proc.stderr[-2000:]}")


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("old")
    cli.add_argument("new")
    cli.add_argument("--methods", default="hp,picie,segsort")
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--camvid", default=os.environ.get("RAYSSEG_CAMVID", "../shared/data/camvid"))
    args = cli.parse_args()
    camvid = str(Path(args.camvid).resolve())
    rows = []
    for method in args.methods.split(","):
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.repeats):
            for label, tree in (("old", args.old), ("new", args.new)):
                times[label].append(run(tree, method, camvid)["time_step_s"])
                print(f"{method} {label}: {times[label][-1]:.3f} s/step", flush=True)
        old, new = statistics.median(times["old"]), statistics.median(times["new"])
        rows.append(f"| {method} | {old:.3f} | {new:.3f} | {new / old:.2f} | "
                    f"{', '.join(f'{t:.3f}' for t in times['old'])} | {', '.join(f'{t:.3f}' for t in times['new'])} |")
    print("\n| method | old s/step (median) | new s/step (median) | new / old | old runs | new runs |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
