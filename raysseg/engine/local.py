"""The in-process runner: ``raysseg train --local`` and :func:`train_local`.

Trains any method in this one process, with no Ray, and MLflow only when a tracking URI is
given: for debugging, fast tests and a GPU machine without Ray. It runs the same worker loop
as Ray Train (:func:`raysseg.engine.loop.train_worker`) with one worker, an in-process shared
state and datasets read here (:func:`raysseg.io.images.read_plan`, the decoding Ray Data runs; with
``data.cache`` from the prepared-data cache, built first on a thread per core).
Checkpoints go to ``<train.storage>/<run name>/local_<step>/model.pt`` (written atomically,
the newest ``train.checkpoints_to_keep`` kept); running the same config again resumes.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from raysseg.core.batches import rebatch, valid_rows
from raysseg.engine.inputs import check_training, prepared_split, run_plan
from raysseg.engine.loop import CHECKPOINT_FILE, RunStopped, WorkerEnv, checkpoint_position, train_worker
from raysseg.io import storage, tracking
from raysseg.io.images import EPOCH_SEED, list_split, read_plan
from raysseg.methods.shared import LocalSharedState

DECODE_ROWS = 16  # rows decoded at a time, as Ray Data's map_batches does


class LocalShard:
    """Rows read and decoded in this process, with the ``iter_batches`` of a Ray Data shard.

    ``shuffle``: a new order each epoch, drawn from (seed, epoch); ``epoch_seeded``: the crops of each epoch
    drawn from (seed, epoch) (the EPOCH_SEED option). ``epoch`` is set by the worker loop as each epoch starts,
    so a resumed run reads what an uninterrupted one read."""

    def __init__(self, items: list[dict], decode, shuffle: bool = False, seed: int = 0, epoch_seeded: bool = False):
        self.items, self.decode, self.shuffle, self.seed, self.epoch_seeded = items, decode, shuffle, seed, epoch_seeded
        self.epoch = 0
        self.skipped: set[tuple[str, str]] = set()  # (path, reason) of the rows that did not decode

    def _decoded(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.items)) if self.shuffle else np.arange(len(self.items))
        seeds = {"seed": (self.seed, self.epoch)} if self.epoch_seeded else {}
        for start in range(0, len(order), DECODE_ROWS):
            chunk = [self.items[i] for i in order[start:start + DECODE_ROWS]]
            batch = self.decode({k: np.array([item[k] for item in chunk], dtype=object) for k in chunk[0]}, **seeds)
            self.skipped.update(valid_rows(batch)[1])
            yield batch

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", drop_last: bool = False, **_):
        return rebatch(self._decoded(), batch_size, drop_last)


def local_shards(cfg, reads: dict[str, dict]) -> dict[str, LocalShard]:
    """In-process readers of a run's datasets (the reads of :func:`raysseg.engine.inputs.run_plan`)."""
    shards = {}
    for name, options in reads.items():
        options = dict(options)
        shuffle = options.pop("shuffle", False)
        epoch_seeded = options.get("seed") == EPOCH_SEED
        if epoch_seeded:
            options["seed"] = None  # LocalShard passes (seed, epoch)
        shards[name] = LocalShard(*read_plan(cfg.data.train, **options), shuffle=shuffle, seed=cfg.train.seed,
                                  epoch_seeded=epoch_seeded)
    return shards


def _epoch_setter(datasets: dict):
    return lambda epoch: [setattr(d, "epoch", epoch) for d in datasets.values() if hasattr(d, "epoch")]


@dataclass
class LocalResult:
    run_name: str
    checkpoint: str  # URI of the final model.pt
    metrics: dict = field(default_factory=dict)  # the last report (the final clustering's)
    trace: list = field(default_factory=list)  # the shared state's reads (rank, table, version, checksum)


class LocalCheckpoints:
    """Checkpoints of an in-process run under ``<root>/local_<step>/``: the newest is restored."""

    def __init__(self, root: str, keep: int):
        self.root, self.keep = root.rstrip("/"), keep
        self.metrics: dict = {}
        self.latest: str = ""
        self.progress: dict = {}  # of the newest checkpoint restored or written

    def _steps(self, name: str) -> list[int]:
        if not storage.exists(self.root):
            return []
        found = []
        for uri in storage.list_files(self.root, suffixes=(name,), recursive=True):
            folder = uri.rstrip("/").rsplit("/", 2)[-2]
            if folder.startswith("local_") and folder[6:].isdigit():
                found.append(int(folder[6:]))
        return sorted(set(found))

    def restore(self, name: str):
        steps = self._steps(name)
        if not steps:
            return None
        uri = f"{self.root}/local_{steps[-1]:09d}/{name}"
        state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=False)
        self.progress = dict(state.get("progress", {}))
        return state, uri

    def report(self, metrics: dict, payload: dict | None, name: str) -> None:
        self.metrics = dict(metrics)
        if payload is None:
            return
        buf = io.BytesIO()
        torch.save(payload, buf)
        step = int(payload.get("progress", {}).get("step", 0))
        self.latest = f"{self.root}/local_{step:09d}/{name}"
        storage.write_bytes_atomic(self.latest, buf.getvalue())
        self.progress = dict(payload.get("progress", {}))
        for old in self._steps(name)[:-self.keep]:
            storage.remove_tree(f"{self.root}/local_{old:09d}")


def _device(cfg) -> torch.device:
    return torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")


def train_local(cfg, tracking_uri: str = "", datasets: dict | None = None, device=None) -> LocalResult:
    """Train ``cfg`` (or resume it) in this process; log to MLflow only when ``tracking_uri`` is set.

    Holds the run's lease (:mod:`raysseg.io.lease`) throughout. Ctrl-C (or SIGTERM, which the CLI turns
    into one) marks the MLflow run KILLED and raises a one-line :class:`RunStopped` naming the checkpoint
    the same command resumes from. ``datasets`` (name -> shard with ``iter_batches``) replaces the ones
    read from ``cfg.data.train``."""
    from raysseg.io.lease import RunLease

    n_images, listing = check_training(cfg)  # the training split's one listing, used by everything below
    if tracking_uri:
        tracking.check_reachable(tracking_uri)
    with RunLease(cfg.train.storage, cfg.run_name()):
        return _train_local(cfg, n_images, tracking_uri, datasets, device, listing)


def _train_local(cfg, n_images: int, tracking_uri: str, datasets: dict | None, device, listing=None) -> LocalResult:
    prepared = None if datasets is not None else prepared_split(cfg, listing=listing)
    plan, reads = run_plan(cfg, prepared, listing=listing)
    if datasets is None:
        datasets = local_shards(cfg, reads)
    run_name = cfg.run_name()
    checkpoints = LocalCheckpoints(f"{cfg.train.storage.rstrip('/')}/{run_name}", cfg.train.checkpoints_to_keep)
    logger = None
    if tracking_uri:
        run_id, resumed = tracking.start_or_resume_run(tracking_uri, cfg.mlflow.experiment, run_name, cfg.flat())
        logger = tracking.RunLogger(tracking_uri, run_id)
        print(f"{'resuming' if resumed else 'starting'} run {run_name} in process (MLflow run {run_id} at "
              f"{tracking_uri})", flush=True)
    shared = LocalSharedState()
    env = WorkerEnv(rank=0, world=1, local_world=1, device=device or _device(cfg), get_shard=datasets.__getitem__,
                    restore=checkpoints.restore, report=checkpoints.report, shared=shared, logger=logger,
                    run={"run_id": getattr(logger, "run_id", ""), "tracking_uri": tracking_uri},
                    start_epoch=_epoch_setter(datasets))
    t0 = time.perf_counter()
    try:
        train_worker(cfg, env, n_images, plan)
    except KeyboardInterrupt:
        _finish(logger, "KILLED")
        steps = checkpoints._steps(CHECKPOINT_FILE)
        kept = (f"kept {checkpoints.root}/local_{steps[-1]:09d}/{CHECKPOINT_FILE} "
                f"({checkpoint_position(checkpoints.progress, cfg.train.epochs)})" if steps
                else "no checkpoint was written yet")
        killed = f"; MLflow run {logger.run_id} marked KILLED" if logger is not None else ""
        raise RunStopped(f"run {run_name} stopped: {kept}{killed}; run the same command again to resume") from None
    except BaseException:
        _finish(logger, "FAILED")
        raise
    if logger is not None:
        logger.set_tag(tracking.CHECKPOINT_TAG, checkpoints.latest)
        logger.finish("FINISHED")
    print(f"run {run_name} finished in process in {time.perf_counter() - t0:.1f}s: {checkpoints.latest}", flush=True)
    _report_skipped(datasets, checkpoints.latest)
    return LocalResult(run_name, checkpoints.latest, checkpoints.metrics, shared.trace())


def _report_skipped(datasets: dict, checkpoint: str) -> None:
    """The summary's ``skipped_files`` line (as a Ray run prints it) and, when files were skipped, their list with
    reasons in ``skipped_files.txt`` beside the checkpoint (also without MLflow)."""
    skipped = sorted(set().union(*(getattr(d, "skipped", set()) for d in datasets.values())))
    where = ""
    if skipped and checkpoint:
        listing = f"{checkpoint.rsplit('/', 1)[0]}/skipped_files.txt"
        storage.write_bytes_atomic(listing, "".join(f"{path}\t{error}\n" for path, error in skipped).encode())
        where = f" (listed in {listing})"
    print(f"  {'skipped_files':<22}{len(skipped):>12}{where}", flush=True)


def _finish(logger, status: str) -> None:
    """Mark the MLflow run ``status`` without hiding why the run ended behind an MLflow outage."""
    if logger is None:
        return
    try:
        logger.finish(status, seconds=5)
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not mark MLflow run {logger.run_id} {status} ({e})", flush=True)


def pretrain_local(cfg, datasets: dict | None = None, device=None) -> LocalResult:
    """MoCo v2 pretraining of ``cfg`` in this process (resumes like :func:`train_local`); the checkpoint
    is ``moco.pt`` (query and key encoders, queue, optimizer), without MLflow."""
    from raysseg.engine.loop import pretrain_worker

    listing = list_split(cfg.data.train)
    n_images = len(listing)
    n_images = min(n_images, cfg.data.limit) if cfg.data.limit else n_images
    if datasets is None:
        items, decode = read_plan(cfg.data.train, image_size=cfg.data.image_size, train=False, with_labels=False,
                                  limit=cfg.data.limit or None, prepared=prepared_split(cfg, listing=listing),
                                  listing=listing)
        datasets = {"train": LocalShard(items, decode, shuffle=True, seed=cfg.train.seed)}
    run_name = f"{cfg.run_name()}-pretrain"
    checkpoints = LocalCheckpoints(f"{cfg.train.storage.rstrip('/')}/{run_name}", cfg.train.checkpoints_to_keep)
    env = WorkerEnv(rank=0, world=1, local_world=1, device=device or _device(cfg), get_shard=datasets.__getitem__,
                    restore=checkpoints.restore, report=checkpoints.report, start_epoch=_epoch_setter(datasets))
    from raysseg.io.lease import RunLease

    with RunLease(cfg.train.storage, run_name):
        pretrain_worker(cfg, env, n_images)
    return LocalResult(run_name, checkpoints.latest, checkpoints.metrics)
