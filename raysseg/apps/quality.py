"""``raysseg bench quality``: each method and its k-means baseline on the same backbone, over seeds.

A seed (``train.seed``) changes the backbone's random initialisation, the crops, the sampling and the
k-means initialisation. Each (config, seed) is one ``raysseg run`` in a subprocess (train on Ray Train,
then evaluate), its output in a log file. The baseline is ``kmeans`` with the method's backbone,
resolution and sampling settings at the same seed, so method and baseline start from the same weights
and the difference is paired by seed.

Protocols:
- ``dev``: train on a train part of the training split and score on the dev part (tuning happens here);
- ``val``: train on the whole training split and score on val (reported once, at the end).

Results go to ``<out>/results.json`` after every run, so the benchmark resumes where it stopped. The
summary (``summary.json``) and the table add each row's clusters IoU per class, also drawn as
``per_class.png``: which classes a method gains or loses against its baseline.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from raysseg.settings import ConfigError

VARIANTS = ("clusters", "clusters_crf", "probe", "retrieval")
GOAL_MIOU = 2.0  # points of clusters mIoU a method should gain over k-means on its own backbone (issue 19)
BASELINE_KEYS = ("data.image_size", "data.crop_scale_min", "model.backbone", "model.weights", "model.fpn_dim",
                 "kmeans.n_clusters", "kmeans.pixels_per_image", "kmeans.iterations", "kmeans.redo")
DEFAULT_CONFIGS = ("picie_camvid", "pgg_camvid", "segsort_camvid", "concepts_camvid", "hp_camvid", "stego_camvid")


@dataclass(frozen=True)
class Run:
    """One training + evaluation: a config with its overrides at one seed."""

    label: str       # the table's row: the method, or "k-means (<backbone>, <size> px[, from <weights' run>])"
    config: str
    overrides: tuple[str, ...]
    seed: int
    baseline: str = ""  # the row this one is compared with, seed by seed ('' for a baseline)

    @property
    def key(self) -> str:
        return json.dumps([self.config, list(self.overrides), self.seed])  # the baseline is not part of it


# --------------------------------------------------------------------------- the dev split


def split_dataset(src: str, out: str, dev: int, seed: int = 0) -> tuple[str, str]:
    """Copy a labelled split into ``out/train`` and ``out/dev`` (``dev`` images, a seeded random choice).

    Returns the two split URIs. An existing, complete copy with the same choice is reused."""
    import numpy as np

    from raysseg.io import storage
    from raysseg.io.images import list_split

    files = list_split(src, with_labels=True)
    n = len(files.images)
    if not 0 < dev < n:
        raise ConfigError(f"--dev {dev}: the dev part needs between 1 and {n - 1} of the {n} images in {src}")
    chosen = set(np.random.default_rng(seed).permutation(n)[:dev].tolist())
    train_uri, dev_uri = storage.join(out, "train"), storage.join(out, "dev")
    marker = storage.join(out, "split.json")
    plan = {"source": src, "dev": dev, "seed": seed, "images": n}
    if storage.exists(marker) and json.loads(storage.read_bytes(marker)) == plan:
        return train_uri, dev_uri
    images_root = storage.join(src, "images")
    labels_root = storage.join(src, "labels")
    for i, (image, label) in enumerate(zip(files.images, files.labels)):
        part = dev_uri if i in chosen else train_uri
        for uri, root, kind in ((image, images_root, "images"), (label, labels_root, "labels")):
            relative = uri[len(root):].lstrip("/\\")
            storage.write_bytes_atomic(storage.join(part, kind, relative), storage.read_bytes(uri))
    storage.write_bytes_atomic(marker, json.dumps(plan).encode())  # last: a half-copied split is redone
    return train_uri, dev_uri


# --------------------------------------------------------------------------- the runs


def baseline_overrides(config: str, overrides: tuple[str, ...]) -> tuple[str, ...]:
    """``kmeans`` settings that put the baseline on the method's backbone, resolution and sampling."""
    from raysseg.config import load_config

    cfg = load_config(config, list(overrides))
    values = {}
    for key in BASELINE_KEYS:
        section, name = key.split(".")
        values[key] = getattr(getattr(cfg, section), name)
    return tuple(f"{k}={v}" for k, v in values.items()) + ("model.frozen=true",)


def parse_config_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """``name`` or ``name+key=value+key=value`` (a variant): the config and its own overrides."""
    name, *overrides = spec.split("+")
    bad = [o for o in overrides if "=" not in o]
    if not name or bad:
        raise ConfigError(f"--configs {spec!r}: write a config name, optionally followed by +key=value settings "
                          f"(e.g. segsort_camvid+segsort.min_cells=8)")
    return name, tuple(overrides)


def plan_runs(configs: list[str], seeds: list[int], common: tuple[str, ...]) -> list[Run]:
    """Every method run and every baseline run (a baseline shared by methods on one backbone runs once).

    ``configs`` are :func:`parse_config_spec` specs; a variant's row is labelled with its settings. A ``kmeans``
    config is a baseline row only (e.g. to score a backbone: ``kmeans_camvid+model.backbone=resnet18_fpn``)."""
    from raysseg.config import load_config

    runs: list[Run] = []
    seen: set[str] = set()
    for config_spec in configs:
        config, own = parse_config_spec(config_spec)
        cfg = load_config(config, [*common, *own])
        label = f"{cfg.method} ({', '.join(own)})" if own else cfg.method
        weights = cfg.model.weights
        start = f", from {PurePosixPath(weights).parent.name or weights}" if weights else ""  # the pretraining run
        baseline = f"k-means ({cfg.model.backbone}, {cfg.data.image_size} px{start})"
        for seed in seeds:
            pair = (Run(baseline, "kmeans_camvid", common + baseline_overrides(config, common + own), seed),
                    Run(label, config, common + own, seed, baseline))
            for run in pair[:1] if cfg.method == "kmeans" else pair:  # a k-means spec is its own baseline row
                if run.key not in seen:
                    seen.add(run.key)
                    runs.append(run)
    return runs


def _settings(run: Run, out: Path) -> list[str]:
    """Every ``--set`` of the run's ``raysseg run``."""
    return [*run.overrides, f"train.seed={run.seed}", f"train.storage={out / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}"]


def run_name(run: Run, out: Path) -> str:
    """The training run's name, a hash of every setting the run computes with, defaults included."""
    from raysseg.config import load_config

    return load_config(run.config, _settings(run, out)).run_name()


def _report_of(result: dict) -> dict | None:
    """The evaluation report a recorded result points at (None when it is gone): what results recorded
    before a field was kept are read from."""
    report = Path(result.get("report", ""))
    return json.loads(report.read_text()) if report.is_file() else None


def recorded_run_name(result: dict) -> str:
    """The training run a recorded result came from ('' when unknown): recorded since this was kept, read
    from the report's checkpoint path (``<storage>/<run name>/checkpoint_*/model.pt``) before."""
    if "run_name" in result:
        return result["run_name"]
    report = _report_of(result)
    return Path(report["checkpoint"]).parents[1].name if report else ""


def _run_once(run: Run, out: Path, log: Path) -> dict:
    """``raysseg run`` in a subprocess; the evaluation report and the wall time."""
    eval_dir = out / "eval" / f"{run.config}-{hashlib.sha1(run.key.encode()).hexdigest()[:8]}-s{run.seed}"
    argv = [sys.executable, "-m", "raysseg.apps.cli", "run", "--config", run.config, "--out", str(eval_dir)]
    for o in _settings(run, out):
        argv += ["--set", o]
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{run.label} seed {run.seed} failed (exit {code}); see {log}")
    report = json.loads((eval_dir / "report.json").read_text())
    return {"label": run.label, "config": run.config, "overrides": list(run.overrides), "seed": run.seed,
            "run_name": run_name(run, out), "seconds": round(time.time() - t0, 1), "report": str(eval_dir / "report.json"),
            "scores": {v: {m: report["scores"][v][m] for m in ("accuracy", "miou")}
                       for v in VARIANTS if v in report["scores"]},
            "class_names": report["class_names"], "per_class_iou": report["scores"]["clusters"]["per_class_iou"]}


def per_class_iou(result: dict) -> tuple[list[str], list[float]] | None:
    """A run's clusters IoU per class, with the class names; runs recorded before these were kept are read
    from their report (None when it is gone)."""
    if "per_class_iou" in result:
        return result["class_names"], result["per_class_iou"]
    report = _report_of(result)
    return (report["class_names"], report["scores"]["clusters"]["per_class_iou"]) if report else None


def runs_to_do(runs: list[Run], results: dict, out: Path) -> tuple[list[Run], list[Run]]:
    """The runs to run: those ``results`` lacks, then the stale ones (also returned alone), whose recorded
    training run has another name than the run's settings give today (a default changed since)."""
    stale = [r for r in runs if r.key in results and recorded_run_name(results[r.key]) not in ("", run_name(r, out))]
    return [r for r in runs if r.key not in results] + stale, stale


def run_all(runs: list[Run], out: Path) -> dict:
    """Run what ``results.json`` does not hold yet, or holds from other settings (a default changed since:
    the run's name differs); write it after every run."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    todo, stale = runs_to_do(runs, results, out)
    print(f"[quality] {len(runs)} runs, {len(runs) - len(todo)} already done"
          + (f", {len(stale)} to run again (recorded with other defaults)" if stale else "")
          + f"; logs in {out / 'runs.log'}", flush=True)
    t0 = time.time()
    for i, run in enumerate(todo):
        results[run.key] = _run_once(run, out, out / "runs.log")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, path)
        per_run = (time.time() - t0) / (i + 1)
        left = per_run * (len(todo) - i - 1)
        s = results[run.key]["scores"]["clusters"]
        print(f"[quality] {i + 1}/{len(todo)} {run.label} seed {run.seed}: clusters {100 * s['miou']:.1f} mIoU "
              f"in {results[run.key]['seconds']:.0f} s; about {left / 60:.0f} min left", flush=True)
    return results


# --------------------------------------------------------------------------- the table


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    m = 100 * statistics.fmean(values)
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def summarise(runs: list[Run], results: dict) -> dict:
    """Per row: every score over seeds, the paired differences to the row's baseline (same seeds), and the
    clusters IoU per class (mean and std over seeds) when every seed of the row has it."""
    by_row: dict[str, dict[int, dict]] = {}
    per_class: dict[str, list[tuple[list[str], list[float]]]] = {}
    baseline_of: dict[str, str] = {}
    for run in runs:
        if run.key in results:
            by_row.setdefault(run.label, {})[run.seed] = results[run.key]["scores"]
            found = per_class_iou(results[run.key])
            if found:
                per_class.setdefault(run.label, []).append(found)
            if run.baseline:
                baseline_of[run.label] = run.baseline
    summary = {}
    for label, seeds in by_row.items():
        entry = {"seeds": sorted(seeds), "scores": {}, "vs_baseline": {}, "baseline": baseline_of.get(label, "")}
        for v in VARIANTS:
            for m in ("accuracy", "miou"):
                entry["scores"][f"{v}_{m}"] = [s[v][m] for s in seeds.values() if v in s]
        base = by_row.get(entry["baseline"], {})
        for v in VARIANTS:
            for m in ("accuracy", "miou"):
                entry["vs_baseline"][f"{v}_{m}"] = [seeds[s][v][m] - base[s][v][m] for s in seeds
                                                    if s in base and v in seeds[s] and v in base[s]]
        classes = per_class.get(label, [])
        if classes and len(classes) == len(seeds) and all(names == classes[0][0] for names, _ in classes):
            values = [ious for _, ious in classes]
            entry["class_names"] = classes[0][0]
            entry["per_class_iou"] = {"mean": [statistics.fmean(v) for v in zip(*values)],
                                      "std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*values)]}
        summary[label] = entry
    return summary


def table(summary: dict, title: str) -> str:
    """Markdown: mIoU and accuracy (mean ± std over seeds), and the paired difference to the baseline."""
    head = ["method", "seeds", "clusters mIoU", "Δ vs k-means", "+ CRF mIoU", "Δ", "probe mIoU", "Δ",
            "retrieval mIoU", "Δ", "clusters acc", "Δ", f"goal: clusters Δ ≥ +{GOAL_MIOU:g} and > std, probe Δ ≥ 0"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in summary.items():
        cells = [label, str(len(e["seeds"]))]
        for v in ("clusters_miou", "clusters_crf_miou", "probe_miou", "retrieval_miou", "clusters_accuracy"):
            cells.append(_mean_std(e["scores"].get(v, [])))
            diffs = e["vs_baseline"].get(v)
            cells.append(_signed(diffs) if diffs else "")
        cells.append(goal_met(e["vs_baseline"].get("clusters_miou", []), e["vs_baseline"].get("probe_miou", [])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_class_table(summary: dict) -> str:
    """Markdown: clusters IoU per class (mean over seeds), a method's cells with its difference to the
    baseline's mean in brackets; "" when no row has per-class scores."""
    rows = {label: e for label, e in summary.items() if "per_class_iou" in e}
    if not rows:
        return ""
    names = next(iter(rows.values()))["class_names"]
    lines = ["| clusters IoU, mean over seeds | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for label, e in rows.items():
        base = rows.get(e["baseline"], {}).get("per_class_iou", {}).get("mean")
        cells = [f"{100 * m:.1f}" + (f" ({100 * (m - b):+.1f})" if base else "")
                 for m, b in zip(e["per_class_iou"]["mean"], base or e["per_class_iou"]["mean"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_met(diffs: list[float], probe_diffs: list[float] = ()) -> str:
    """The goal for a method: the mean paired gain in clusters mIoU is at least GOAL_MIOU points and larger
    than its std over seeds, and its linear probe is not below its baseline's on average (the method must
    not make the representation worse). "" for a baseline row, which has no differences."""
    if not diffs:
        return ""
    if len(diffs) < 2:
        return "one seed: no std"
    mean, std = 100 * statistics.fmean(diffs), 100 * statistics.stdev(diffs)
    if not (mean >= GOAL_MIOU and mean > std):
        return "**no**"
    if probe_diffs and statistics.fmean(probe_diffs) < 0:
        return "**no** (probe below)"
    return "yes"


def _signed(values: list[float]) -> str:
    m = 100 * statistics.fmean(values)
    return f"{m:+.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:+.1f}"


# --------------------------------------------------------------------------- the command


def bench_quality(configs: list[str], seeds: list[int], protocol: str, out: str, common: tuple[str, ...] = (),
                  camvid: str = "", dev: int = 67) -> str:
    """Run (or resume) the protocol and return its markdown table; the summary goes to ``<out>/summary.json``."""
    out_dir = Path(out)
    camvid = camvid or os.environ.get("RAYSSEG_CAMVID", "../shared/data/camvid")
    if "://" not in camvid:  # results are keyed by their settings: the same folder, however it is spelt, resumes
        camvid = os.path.abspath(camvid)
    if protocol not in ("dev", "val"):
        raise ConfigError(f"--protocol {protocol}: use dev (tuning) or val (the report, once)")
    plan_runs(configs, seeds, tuple(common))  # every config and setting checked before anything is copied or run
    if protocol == "dev":
        train_uri, dev_uri = split_dataset(os.path.join(camvid, "train"), str(out_dir / "camvid_split"), dev)
        common = (f"data.train={train_uri}", f"data.val={dev_uri}", *common)
        scored_on = f"the dev part ({dev} images) of CamVid train, trained on the rest"
    else:
        common = (f"data.train={os.path.join(camvid, 'train')}", f"data.val={os.path.join(camvid, 'val')}", *common)
        scored_on = "CamVid val, trained on the whole train split"
    runs = plan_runs(configs, seeds, tuple(common))
    results = run_all(runs, out_dir)
    summary = summarise(runs, results)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    extra = f"; settings: {', '.join(c for c in common if not c.startswith('data.'))}" if len(common) > 2 else ""
    text = table(summary, f"Quality over seeds {seeds} on {scored_on}{extra} (mean ± std, Δ paired by seed)")
    classes = per_class_table(summary)
    if classes:
        from raysseg.core.pictures import per_class_figure

        rows = {label: e for label, e in summary.items() if "per_class_iou" in e}
        (out_dir / "per_class.png").write_bytes(per_class_figure(
            {label: (e["per_class_iou"]["mean"], e["per_class_iou"]["std"]) for label, e in rows.items()},
            next(iter(rows.values()))["class_names"],
            f"Clusters IoU per class on {scored_on}, mean ± std over seeds {seeds}"))
        text += f"\n\n{classes}\n\n(per class as a picture: {out_dir / 'per_class.png'})"
    return text
