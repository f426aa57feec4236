"""The Ray Train worker functions: a :class:`raysseg.engine.loop.WorkerEnv` made of Ray Train's
context (rank, device, dataset shards, checkpoints, ``prepare_model``) and the run's concept bank.

Rank 0's printed lines go to the driver's console (:mod:`raysseg.runtime.logs`), which prints them once."""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from raysseg.config import config_from_dict
from raysseg.engine.loop import WorkerEnv, pretrain_worker, train_worker
from raysseg.runtime.bank import RaySharedState
from raysseg.runtime.logs import ConsoleWriter, LinesStartingWith


def _ray_checkpoint(name: str):
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / name, map_location="cpu", weights_only=False), checkpoint.path


def _restorer(folders: list[str]):
    """Restore from the newest of ``folders`` (newest first, listed by the driver) that loads, else from the
    checkpoint Ray Train hands over: a stop can leave a newer complete checkpoint that Ray never registered."""
    from raysseg.io import storage

    def restore(name: str):
        for folder in folders:
            try:
                data = storage.read_bytes(f"{folder}/{name}")
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False), folder
            except Exception:  # noqa: BLE001 - cut short by a stop: try the one before it
                continue
        return _ray_checkpoint(name)

    return restore


_kept: dict = {}  # the newest checkpoint this worker wrote: {"uri", "epoch", "step"}


def _report(metrics: dict, payload: dict | None, name: str) -> None:
    """Report ``metrics``; with ``payload`` (rank 0) also the checkpoint file ``name`` holding it.

    The file is written by the storage layer (atomic, riding out an S3 outage, one line naming the path on
    failure) to the folder Ray Train picked. When that fails, the line also names the checkpoint kept."""
    from raysseg.io import storage

    if payload is None:
        ray.train.report(metrics, checkpoint=None)
        return
    ctx = ray.train.get_context().get_storage()
    files = storage.guarded(ctx.storage_filesystem)

    def upload(checkpoint, dir_name: str):
        folder = f"{ctx.experiment_fs_path}/{dir_name}"
        _kept["writing"] = files.put_file(f"{folder}/{name}", str(Path(checkpoint.path) / name))
        return ray.train.Checkpoint(folder, filesystem=ctx.storage_filesystem)

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(payload, Path(tmp) / name)
        try:
            # rank 0's stdout is the driver's console: the storage layer's outage lines go there, Ray Train's own
            # log records to the worker's log
            with contextlib.redirect_stderr(LinesStartingWith("[storage]", sys.stdout, sys.stderr)):
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_upload_fn=upload if files is not None else None)
        except storage.StorageError as e:
            raise storage.StorageError(f"{str(e).replace('; ' + storage.RESUME_HINT, '')}; "
                                       f"{_kept_line(payload)}; run the same command again to resume") from None
    progress = payload.get("progress", {})
    _kept.update(uri=_kept.pop("writing", None), epoch=progress.get("epoch", 0), step=progress.get("step", 0))


def _kept_line(payload: dict) -> str:
    """Which checkpoint a failed write leaves as the newest: the last one written here, else the one this
    attempt resumed from (the lineage's previous entry), else none."""
    if _kept.get("uri"):
        return f"kept {_kept['uri']} (epoch {_kept['epoch']}, step {_kept['step']})"
    lineage = payload.get("progress", {}).get("lineage", [])
    if len(lineage) > 1:
        return f"kept the checkpoint this run resumed from (epoch {lineage[-2]['epoch']}, step {lineage[-2]['step']})"
    return "no checkpoint was written yet"


def worker_env(loop_cfg: dict) -> WorkerEnv:
    from raysseg.io import tracking

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    bank = loop_cfg.get("bank")
    return WorkerEnv(
        rank=rank, world=ctx.get_world_size(), local_world=ctx.get_local_world_size(),
        device=ray.train.torch.get_device(), get_shard=ray.train.get_dataset_shard,
        restore=_restorer(loop_cfg.get("checkpoints", [])),
        report=_report, shared=RaySharedState(bank) if bank is not None else None,
        wrap_model=ray.train.torch.prepare_model,
        start_epoch=(lambda epoch: ray.get(bank.set_epoch.remote(epoch))) if bank is not None and rank == 0
        else (lambda epoch: None),
        logger=tracking.RunLogger(loop_cfg["tracking_uri"], loop_cfg["run_id"]) if rank == 0 else None,
        run={"run_id": loop_cfg["run_id"], "tracking_uri": loop_cfg["tracking_uri"]},
    )


def _console(env: WorkerEnv, loop_cfg: dict):
    """Rank 0's stdout goes to the driver's console; other ranks' stays in Ray's log files."""
    console = loop_cfg.get("console")
    if env.rank != 0 or console is None:
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(ConsoleWriter(console))


def train_loop(loop_cfg: dict) -> None:
    """Ray Train's worker function of :func:`raysseg.runtime.driver.train`."""
    env = worker_env(loop_cfg)
    with _console(env, loop_cfg):
        train_worker(config_from_dict(loop_cfg["config"]), env, loop_cfg["n_images"], loop_cfg.get("plan", {}))


def pretrain_loop(loop_cfg: dict) -> None:
    """Ray Train's worker function of :func:`raysseg.runtime.pretrain.pretrain`."""
    env = worker_env(loop_cfg)
    with _console(env, loop_cfg):
        pretrain_worker(config_from_dict(loop_cfg["config"]), env, loop_cfg["n_images"])
