"""A method's training steps on rows held in memory, with no runner around them: what
``raysseg bench step --local`` and ``raysseg bench gpu`` time, and what the precision tests compare.

The trainer is the real one (:func:`raysseg.methods.registry.build_trainer`) with an in-process
shared state; its datasets are the given rows, named as the method's spec asks (the pool's
files, pseudo segments). Imports nothing from :mod:`raysseg.io`: it runs where only torch is
installed (no Ray, MLflow, faiss or pyarrow).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raysseg.core.batches import BatchShard
from raysseg.core.device import configure, prepare_model
from raysseg.core.precision import precision_for
from raysseg.methods.base import TrainContext
from raysseg.methods.registry import build_segmenter, build_trainer, output_stride, spec
from raysseg.methods.shared import LocalSharedState


def memory_rows(images: np.ndarray, n_rows: int | None = None) -> dict:
    """Pipeline rows (``image``, ``path``, ``valid``, ``error``) of ``n_rows`` images cycled from
    ``images`` (uint8 (n, S, S, 3)), each row with its own path."""
    n_rows = n_rows or len(images)
    index = np.arange(n_rows) % len(images)
    return {"image": images[index], "path": np.array([f"memory/{i:07d}.png" for i in range(n_rows)], dtype=object),
            "valid": np.ones(n_rows, bool), "error": np.array([""] * n_rows, dtype=object)}


def _with_segments(rows: dict, options: dict, cache: dict) -> dict:
    """``rows`` plus the pseudo segments the options ask for (computed once per distinct image)."""
    from raysseg.core.segments import oversegment

    key = tuple(sorted(options.items()))
    if key not in cache:
        cache[key] = {}
    done = cache[key]
    segments = []
    for image in rows["image"]:
        digest = hash(image.tobytes())
        if digest not in done:
            done[digest] = oversegment(image, **options)
        segments.append(done[digest])
    return {**rows, "segments": np.stack(segments)}


def memory_tables(cfg, rows: dict, seg) -> dict[str, dict]:
    """The method's precomputed tables over ``rows`` (:class:`raysseg.methods.base.PrecomputedTable`), in memory."""
    tables = {}
    for name, table in spec(cfg.method).tables(cfg).items():
        with torch.no_grad():
            vectors = torch.cat([table.vectors(seg, rows["image"][i:i + cfg.eval.batch_size]).float().cpu()
                                 for i in range(0, len(rows["image"]), cfg.eval.batch_size)])
        tables[name] = {"paths": [str(p) for p in rows["path"]], "rows": np.asarray(table.rows(vectors, 0, len(vectors)))}
    return tables


def _with_partners(rows: dict, partners: dict) -> dict:
    """``rows`` plus each row's first partner candidate as ``partner`` (the readers draw one per epoch)."""
    index = {str(p): i for i, p in enumerate(rows["path"])}
    picked = [index[partners[str(p)][0]] for p in rows["path"]]
    return {**rows, "partner": rows["image"][picked], "partner_path": rows["path"][picked]}


def memory_datasets(cfg, rows: dict, seg=None) -> tuple[dict, dict[str, BatchShard]]:
    """(the method's plan, its datasets as shards of ``rows``): the pool keeps only its planned files;
    datasets with ``segments`` options get the pseudo segments of their images, those with ``partners`` their
    partners (the method's tables are computed here with ``seg``)."""
    method = spec(cfg.method)
    files = [str(p) for p in rows["path"]]
    plan = method.plan(cfg, files, (cfg.data.image_size // output_stride(cfg)) ** 2) if method.plan else {}
    if method.tables(cfg):
        plan["tables"] = memory_tables(cfg, rows, seg)
    wanted = {"cluster": {"train": False}, **method.datasets(cfg, plan)}
    datasets, cache = {}, {}
    for name, options in wanted.items():
        picked = rows
        if options.get("files") is not None:
            keep = np.isin(rows["path"], np.array(sorted(options["files"]), dtype=object))
            picked = {k: v[keep] for k, v in rows.items()}
        if options.get("segments"):
            picked = _with_segments(picked, options["segments"], cache)
        if options.get("partners"):
            picked = _with_partners(picked, options["partners"])
        datasets[name] = BatchShard([picked])
    return plan, datasets


@dataclass
class StepRig:
    """A model and its trainer, set up (pools built, clusters fitted) and ready to step."""

    cfg: Any
    seg: torch.nn.Module
    trainer: Any
    datasets: dict
    device: torch.device

    def batches(self):
        """The training shard's batches, cycled forever (``train.batch_size`` rows each)."""
        while True:
            yield from self.datasets["train"].iter_batches(batch_size=self.cfg.train.batch_size, drop_last=True)


def build_rig(cfg, rows: dict, device, total_steps: int = 1000) -> StepRig:
    """Build ``cfg``'s segmenter and trainer on ``device`` over ``rows`` and run the trainer's
    ``setup`` and first ``before_epoch`` (pools, pseudo labels, clustering)."""
    device = torch.device(device)
    configure(device)
    torch.manual_seed(cfg.train.seed)
    seg = build_segmenter(cfg).to(device)
    prepare_model(seg, device, cfg.model.backbone, cfg.train.compile)
    plan, datasets = memory_datasets(cfg, rows, seg)
    ctx = TrainContext(rank=0, world=1, device=device, shared=LocalSharedState(), total_steps=total_steps,
                       plan=plan, precision=precision_for(cfg, device))
    trainer = build_trainer(cfg, seg, ctx)
    trainer.setup(datasets.__getitem__)
    trainer.before_epoch(datasets.__getitem__, 0)
    return StepRig(cfg, seg, trainer, datasets, device)
