"""The Ray Train worker functions: a :class:`raysseg.engine.loop.WorkerEnv` made of Ray Train's
context (rank, device, dataset shards, checkpoints, ``prepare_model``) and the run's concept bank."""
from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from raysseg.config import config_from_dict
from raysseg.engine.loop import WorkerEnv, pretrain_worker, train_worker
from raysseg.runtime.bank import RaySharedState


def _restore(name: str):
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / name, map_location="cpu", weights_only=False), checkpoint.path


def _report(metrics: dict, payload: dict | None, name: str) -> None:
    if payload is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(payload, Path(tmp) / name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def worker_env(loop_cfg: dict) -> WorkerEnv:
    from raysseg.io import tracking

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    bank = loop_cfg.get("bank")
    return WorkerEnv(
        rank=rank, world=ctx.get_world_size(), local_world=ctx.get_local_world_size(),
        device=ray.train.torch.get_device(), get_shard=ray.train.get_dataset_shard, restore=_restore,
        report=_report, shared=RaySharedState(bank) if bank is not None else None,
        wrap_model=ray.train.torch.prepare_model,
        logger=tracking.RunLogger(loop_cfg["tracking_uri"], loop_cfg["run_id"]) if rank == 0 else None,
        run={"run_id": loop_cfg["run_id"], "tracking_uri": loop_cfg["tracking_uri"]},
    )


def train_loop(loop_cfg: dict) -> None:
    """Ray Train's worker function of :func:`raysseg.runtime.driver.train`."""
    train_worker(config_from_dict(loop_cfg["config"]), worker_env(loop_cfg), loop_cfg["n_images"],
                 loop_cfg.get("plan", {}))


def pretrain_loop(loop_cfg: dict) -> None:
    """Ray Train's worker function of :func:`raysseg.runtime.pretrain.pretrain`."""
    pretrain_worker(config_from_dict(loop_cfg["config"]), worker_env(loop_cfg), loop_cfg["n_images"])
