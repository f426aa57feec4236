"""Training on Ray Train: the driver side (``train``) and the worker loop.

The driver validates inputs, opens or resumes the MLflow run, builds the Ray datasets
and the concept bank, and starts a ``TorchTrainer`` whose run name and storage path
identify the run: starting the same run again resumes from its latest checkpoint
(Ray Train restores it; the bank's tables are restored from it too).

Every worker runs :func:`worker_loop`: the method's epochs (none for ``kmeans``), then
the offline k-means on the training split that every method ends with. Rank 0 logs to
MLflow and writes the checkpoint (``model.pt``) at the end of every epoch.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from raysseg.config import Config, ConfigError, config_from_dict
from raysseg.core.segmenter import CHECKPOINT_FILE, Segmenter, read_checkpoint, save_checkpoint
from raysseg.core.selection import SCORE_IMAGES, view_nmi


FINAL_FLAG = "final"  # in the report of the finished model (after the final clustering)


class RunFailed(RuntimeError):
    """Training stopped; the message is one line and says what to do."""


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------- driver side


def init_ray(busy_workers: int = 0) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray.

    A local Ray gets ``busy_workers`` logical CPUs on top of the machine's cores: Train
    workers and scoring actors hold a CPU slot each for their whole life, and without
    spare slots Ray Data could never schedule the decoding tasks that feed them (a
    deadlock on 2 cores).
    """
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines instead
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray's processes inherit this environment (credentials included): nothing secret goes into a
        # runtime env, which Ray shows in its dashboard and writes to its logs.
        os.environ.setdefault("FAISS_OPT_LEVEL", "generic")
        ray.init(address="local", num_cpus=(os.cpu_count() or 2) + busy_workers, include_dashboard=False,
                 log_to_driver=True)


@dataclass
class TrainResult:
    run_id: str
    run_name: str
    checkpoint: str  # URI of the final model.pt
    tracking_uri: str
    metrics: dict = field(default_factory=dict)
    bank_trace: list = field(default_factory=list)
    already_finished: bool = False


def check_inputs(cfg: Config) -> int:
    """Everything that can be checked before Ray starts; returns the training image count."""
    from raysseg.io.images import list_split

    files = list_split(cfg.data.train, with_labels=False).images
    n = min(len(files), cfg.data.limit) if cfg.data.limit else len(files)
    per_worker = n // cfg.train.num_workers
    if cfg.method != "kmeans" and per_worker < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} images per worker but only {per_worker} per worker "
            f"({n} images, {cfg.train.num_workers} workers); lower train.batch_size or train.num_workers"
        )
    if cfg.method == "hp" and cfg.hp.pool_size > n:
        raise ConfigError(
            f"hp.pool_size: M = {cfg.hp.pool_size} needs one patch from each of M different images but "
            f"{cfg.data.train} has {n}; set hp.pool_size <= {n}"
        )
    return n


def _storage(cfg: Config):
    """(storage_path, filesystem or None) for Ray Train's RunConfig."""
    from raysseg.io.storage import resolve

    if cfg.train.storage.startswith("s3://"):
        fs, path = resolve(cfg.train.storage)
        return path, fs
    return str(Path(cfg.train.storage).resolve()), None


def checkpoint_dir_uri(cfg: Config, checkpoint_path: str) -> str:
    """Ray's checkpoint path (filesystem-relative) as a URI our storage layer reads."""
    return f"s3://{checkpoint_path}" if cfg.train.storage.startswith("s3://") else checkpoint_path


def _pool_plan(cfg: Config, files: list[str], grid: int) -> dict[str, tuple[int, int]]:
    """HP's pool: M images drawn across the whole split, one random patch each: path -> (index, patch)."""
    rng = np.random.default_rng(cfg.train.seed)
    chosen = rng.choice(len(files), cfg.hp.pool_size, replace=False)
    patches = rng.integers(0, grid, cfg.hp.pool_size)
    return {files[i]: (k, int(p)) for k, (i, p) in enumerate(zip(chosen, patches))}


def train(cfg: Config, restart: bool = False, parent_run_id: str | None = None, callbacks: tuple = ()) -> TrainResult:
    """Train (or resume) the run ``cfg.run_name()`` and return where its results are.

    A sweep passes its MLflow run as ``parent_run_id`` (the new run is its child) and a
    callback that forwards the workers' reports to Ray Tune."""
    from ray.train import DataConfig

    from raysseg.io import tracking
    from raysseg.runtime.bank import ConceptBank
    from raysseg.runtime.datasets import make_dataset
    from raysseg.io.images import list_split
    from raysseg.core.segments import oversegment_kwargs
    from raysseg.io.storage import remove_tree

    n_images = check_inputs(cfg)
    run_name = cfg.run_name()
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    if restart:
        remove_tree(f"{cfg.train.storage.rstrip('/')}/{run_name}")
        previous = tracking.find_run(uri, cfg.mlflow.experiment, run_name)
        if previous is not None and previous.info.status != "FINISHED":
            tracking.RunLogger(uri, previous.info.run_id).finish("KILLED")
    else:
        previous = tracking.find_run(uri, cfg.mlflow.experiment, run_name)
        if previous is not None and previous.info.status == "FINISHED":
            ckpt = previous.data.tags.get(tracking.CHECKPOINT_TAG, "")
            done = read_checkpoint(ckpt)["progress"]["epoch"] if ckpt else 0
            if cfg.method == "kmeans" or done >= cfg.train.epochs:
                print(f"run {run_name} already finished (MLflow run {previous.info.run_id}); "
                      f"use --restart to train it again")
                return TrainResult(previous.info.run_id, run_name, ckpt, uri, dict(previous.data.metrics),
                                   already_finished=True)
            print(f"run {run_name} finished {done} epochs; continuing to train.epochs = {cfg.train.epochs}")
            tracking.RunLogger(uri, previous.info.run_id).client.update_run(previous.info.run_id, status="RUNNING")
    run_id, resumed = tracking.start_or_resume_run(
        uri, cfg.mlflow.experiment, run_name, cfg.flat(),
        tags={tracking.PARENT_TAG: parent_run_id} if parent_run_id else None)
    print(f"{'resuming' if resumed else 'starting'} run {run_name} (MLflow run {run_id} at {uri})")

    world = cfg.train.num_workers
    init_ray(world)
    datasets = {
        "cluster": make_dataset(cfg.data.train, image_size=cfg.data.image_size, train=False,
                                with_labels=False, limit=cfg.data.limit or None),
    }
    loop_cfg = {"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": uri, "n_images": n_images}
    files = list_split(cfg.data.train, with_labels=False).images
    files = files[: cfg.data.limit] if cfg.data.limit else files
    if cfg.method == "hp":
        datasets["train"] = make_dataset(cfg.data.train, image_size=cfg.data.image_size, train=True,
                                         with_labels=False, crop_scale=(cfg.data.crop_scale_min, 1.0),
                                         seed=None, limit=cfg.data.limit or None)
        grid = (cfg.data.image_size // Segmenter.stride_of(cfg)) ** 2
        plan = _pool_plan(cfg, files, grid)
        loop_cfg["pool_plan"] = plan
        datasets["pool"] = make_dataset(cfg.data.train, image_size=cfg.data.image_size, train=False,
                                        with_labels=False, files=sorted(plan))
    elif cfg.method != "kmeans":  # whole images: the worker crops and augments
        pseudo = oversegment_kwargs(cfg.segments) if cfg.method in ("segsort", "concepts") else None
        datasets["train"] = make_dataset(cfg.data.train, image_size=cfg.data.image_size, train=False,
                                         with_labels=False, limit=cfg.data.limit or None, shuffle=True,
                                         segments=pseudo)
        loop_cfg["files"] = files
    bank = None
    if cfg.method != "kmeans":  # every trained method shares its state through one bank
        bank = ConceptBank.options(name=f"bank-{run_name}-{run_id[:8]}").remote(world)
        loop_cfg["bank"] = bank

    def new_trainer():
        return make_trainer(cfg, worker_loop, loop_cfg, datasets, run_name, callbacks=callbacks,
                            dataset_config=DataConfig(datasets_to_split="all"))

    logger = tracking.RunLogger(uri, run_id)
    try:
        result = fit(new_trainer, logger, run_name, cfg.train.max_restarts)
        trace = ray.get(bank.get_trace.remote()) if bank is not None else []
    finally:
        if bank is not None:  # its state lives on in the checkpoints
            ray.kill(bank)
    ckpt_uri = checkpoint_dir_uri(cfg, result.checkpoint.path) + "/" + CHECKPOINT_FILE
    with result.checkpoint.as_directory() as local:
        logger.log_file(str(Path(local) / CHECKPOINT_FILE), "checkpoint")
    if trace:
        import json

        logger.log_bytes(json.dumps(trace).encode(), "bank_trace.json")
    logger.set_tag(tracking.CHECKPOINT_TAG, ckpt_uri)
    logger.finish("FINISHED")
    return TrainResult(run_id, run_name, ckpt_uri, uri, dict(result.metrics or {}), trace)


def make_trainer(cfg: Config, loop, loop_cfg: dict, datasets: dict, run_name: str, callbacks: tuple = (),
                 **kwargs):
    """A TorchTrainer whose (run name, storage) identify the run: the same pair again resumes it."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = _storage(cfg)
    return TorchTrainer(
        loop, train_loop_config=loop_cfg, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
                             callbacks=list(callbacks)),
        **kwargs,
    )


# A process died (a Train worker, the bank, a node): training again from the latest checkpoint helps.
# Anything else (bad data, a NaN loss, a storage outage past its retries) would fail the same way again.
LOST_PROCESS = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "WorkerCrashedError",
                "NodeDiedError", "OwnerDiedError", "BankLost", "worker process has died")
DETERMINISTIC = ("NonFiniteLoss", "ConfigError", "StorageError", "BackboneWeightsError", "DataError", "DatasetError")


def restartable(e: BaseException) -> bool:
    """True when a failed ``trainer.fit()`` lost a process rather than hit an error in the run itself.

    Looks at each failed worker's error (Ray Train's ``worker_failures``), else at ``e``."""
    failures = list(getattr(e, "worker_failures", {}).values()) or [e]
    texts = [f"{type(f).__name__}: {f}" for f in failures]
    if any(k + ":" in text for text in texts for k in DETERMINISTIC):
        return False
    return any(isinstance(f, ray.exceptions.RayActorError) or any(k in text for k in LOST_PROCESS)
               for f, text in zip(failures, texts))


def fit(new_trainer, logger, run_name: str, max_restarts: int = 0):
    """Run ``new_trainer()``; after a lost process, run a new one, which resumes from the latest
    checkpoint (at most ``max_restarts`` times; each is logged as the ``restarts`` metric). Any other
    failure marks the MLflow run FAILED and becomes one line (RunFailed)."""
    restarts = 0
    while True:
        try:
            result = new_trainer().fit()
            break
        except Exception as e:  # noqa: BLE001 - Ray wraps the worker's error; show its one line
            if restartable(e) and restarts < max_restarts:
                restarts += 1
                print(f"run {run_name}: a process died ({_root_message(e)[:200]}); restarting from the latest "
                      f"checkpoint ({restarts} of train.max_restarts = {max_restarts})", flush=True)
                logger.log_metrics({"restarts": restarts}, step=restarts)
                continue
            logger.finish("FAILED")
            raise RunFailed(_root_message(e)) from None
    if result.checkpoint is None:
        logger.finish("FAILED")
        raise RunFailed(f"run {run_name} reported no checkpoint")
    return result


def _root_message(e: BaseException) -> str:
    """The innermost useful line of a (Ray-wrapped) worker error, without secrets."""
    from raysseg.io.tracking import redact

    text = redact(str(e))
    failures = [redact(str(f)) for f in getattr(e, "worker_failures", {}).values()]  # each worker's full error
    for candidate in failures + [text]:
        for cls in DETERMINISTIC:
            if cls + ":" in candidate:
                return candidate.split(cls + ":", 1)[1].strip().splitlines()[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# ---------------------------------------------------------------- worker side


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def all_gather(obj):
    """Every rank's ``obj`` as a list (a one-element list without a process group)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def optimizer_step(loss: torch.Tensor, optimizer, step: int, lr_key: str, lr: float, *, weight: float = 1.0,
                   grad_clip: float = 0.0) -> None:
    """Backward of ``loss * weight``, optional gradient clipping, one optimizer step.

    First every worker checks its loss: if any is NaN or inf, all stop together before the
    weights change, with one line naming ``lr_key`` (the setting to lower)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)  # NCCL needs it on the GPU
    dist = _dist()
    if dist is not None:
        dist.all_reduce(bad)
    if bad.item() > 0:
        raise NonFiniteLoss(
            f"the loss became {float(loss.detach())} at step {step}; the checkpoints written so far are kept: "
            f"lower {lr_key} (now {lr}) and run again (training runs resume when train.run_name is set)"
        )
    optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    if grad_clip > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


class Progress:
    """Rank-0 progress lines: step, loss, speed and time left."""

    def __init__(self, total: int, label: str, every: int):
        self.total, self.label, self.every = total, label, every
        self.start = time.time()
        self.done = 0

    def update(self, n: int = 1, **values) -> None:
        self.done += n
        if self.done % self.every and self.done != self.total:
            return
        rate = self.done / max(time.time() - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        extra = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        print(f"[{self.label}] {self.done}/{self.total} {extra} {rate:.2f}/s, {left:.0f}s left", flush=True)


def run_epoch(shard, step_fn, cfg: Config, rank: int, progress: dict, logger, steps: int, label: str,
              timers: dict, checkpoint=None):
    """One pass over a worker's shard: ``step_fn(batch, step) -> stats`` on every batch of valid rows.

    ``progress["epoch_step"]`` batches of this epoch were trained before a mid-epoch restart: that
    many batches of the (freshly shuffled) pass are read but not trained on, so the epoch keeps its
    length. ``checkpoint()`` is called every ``train.checkpoint_every`` steps (on every rank).
    Logs per-step metrics and progress lines from rank 0. Returns (mean stats with
    ``iterations_per_s`` and per-step means of ``timers``, the last non-empty images, skipped
    files). Waiting for data is added to ``timers["data_wait"]``."""
    from collections import defaultdict

    from raysseg.io.images import valid_rows

    done_before = progress["epoch_step"]
    bar = Progress(steps - done_before, label, cfg.train.log_every) if rank == 0 else None
    sums: dict[str, float] = defaultdict(float)
    skipped, last, n = [], None, 0
    every = cfg.train.checkpoint_every
    t_epoch = wait = time.perf_counter()
    for i, batch in enumerate(shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy",
                                                 drop_last=True)):
        if i < done_before:
            wait = time.perf_counter()
            continue
        timers["data_wait"] += time.perf_counter() - wait
        batch, bad = valid_rows(batch)
        skipped += bad
        stats = step_fn(batch, progress["step"])
        progress["step"] += 1
        progress["epoch_step"] += 1
        n += 1
        for k, v in stats.items():
            sums[k] += v
        if len(batch["image"]):
            last = batch["image"]
        if rank == 0:
            if progress["step"] % cfg.train.log_every == 0:
                logger.log_metrics({f"train/{k}": v for k, v in stats.items()}, step=progress["step"])
            bar.update(loss=stats["loss_total"])
        if checkpoint is not None and every and progress["step"] % every == 0 and progress["epoch_step"] < steps:
            checkpoint()
        wait = time.perf_counter()
    stats = {k: v / max(n, 1) for k, v in sums.items()}
    stats["iterations_per_s"] = n / max(time.perf_counter() - t_epoch, 1e-9)
    stats.update({f"time_{k}_s": v / max(n, 1) for k, v in timers.items()})
    return stats, last, skipped


def fit_clusters(cfg: Config, seg: Segmenter, shard, rank: int, device):
    """Offline k-means of the codes of the training split; sets ``seg.centroids`` on every rank.

    Returns (skipped files, up to ``SCORE_IMAGES`` of the images seen, the label-free scores:
    ``cluster_mean_cosine``, the k-means objective, and ``view_nmi``; the scores on rank 0 only)."""
    from raysseg.core.kmeans import mean_max_cosine, sample_locations, spherical_kmeans
    from raysseg.io.images import valid_rows

    rng = np.random.default_rng(cfg.train.seed + rank)
    samples, skipped, seen = [], [], []
    seg.eval()
    for batch in shard.iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy"):
        batch, bad = valid_rows(batch)
        skipped += bad
        if len(batch["image"]) == 0:
            continue
        seen += list(batch["image"][: SCORE_IMAGES - len(seen)])
        codes = seg.codes(torch.from_numpy(batch["image"]).to(device)).cpu().numpy()
        samples.append(sample_locations(codes, cfg.kmeans.pixels_per_image, rng))
    gathered = all_gather(np.concatenate(samples) if samples else np.zeros((0, seg.code_dim), np.float32))
    scores = {}
    if rank == 0:
        x = np.concatenate(gathered)
        print(f"[k-means] {x.shape[0]} codes of dim {x.shape[1]} into {cfg.n_clusters} clusters", flush=True)
        centroids = spherical_kmeans(x, cfg.n_clusters, cfg.kmeans.iterations, cfg.kmeans.redo, cfg.train.seed)
        scores["cluster_mean_cosine"] = mean_max_cosine(x, centroids)
    else:
        centroids = None
    centroids = all_gather(centroids)[0]
    seg.centroids.copy_(torch.from_numpy(centroids).to(seg.centroids.device))
    seg.fitted.fill_(True)
    seen = np.stack(seen) if seen else None
    if rank == 0 and seen is not None:
        scores["view_nmi"] = view_nmi(seg, seen, cfg.train.seed)
    return skipped, seen, scores


def _log_overlays(cfg: Config, seg: Segmenter, images: np.ndarray, logger, name: str) -> None:
    """A picture of the current segmentation of a few training images (clusters of their codes)."""
    from raysseg.core.kmeans import spherical_kmeans
    from raysseg.core.pictures import overlay_grid

    images = images[:4]
    if bool(seg.fitted):
        maps = seg.cluster_map(torch.from_numpy(images)).cpu().numpy()
    else:  # mid-training: cluster these images' own codes
        codes = seg.codes(torch.from_numpy(images))
        b, d, h, w = codes.shape
        flat = codes.permute(0, 2, 3, 1).reshape(-1, d).cpu().numpy()
        k = min(cfg.n_clusters, flat.shape[0])
        cents = torch.from_numpy(spherical_kmeans(flat, k, 10))
        logits = torch.einsum("bdhw,kd->bkhw", codes.cpu(), cents)
        maps = torch.nn.functional.interpolate(logits, size=images.shape[1:3], mode="bilinear").argmax(1).numpy()
    grid = overlay_grid(list(images), list(maps), None, cfg.data.ignore_index)
    logger.log_image(grid, f"overlays/{name}.png")


def _save(seg, method, progress: dict, bank, rank: int, metrics: dict, finished: bool, run: dict) -> None:
    """Report metrics from every rank; rank 0 attaches the checkpoint.

    ``progress["lineage"]`` gains this checkpoint's (epoch, step, epoch_step, attempt): a
    checkpoint lists every checkpoint it descends from, and ``attempt`` goes up by one each time
    training restarts from a checkpoint, so a restart shows up as a change of attempt."""
    import ray.train

    if method is not None:
        method.before_checkpoint(progress)
    progress["lineage"] = progress.get("lineage", []) + [
        {k: progress.get(k, 0) for k in ("epoch", "step", "epoch_step", "attempt")}]
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    bank_state = ray.get(bank.state.remote()) if bank is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(
            str(Path(tmp) / CHECKPOINT_FILE), seg, progress=progress, finished=finished,
            method_state=method.state_dict() if method is not None else None, bank=bank_state, **run,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def worker_loop(loop_cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    from raysseg.io import tracking

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # batches are read-only
    cfg = config_from_dict(loop_cfg["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))  # share the node's cores
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()
    seg = Segmenter(cfg).to(device)
    bank = loop_cfg.get("bank")
    logger = tracking.RunLogger(loop_cfg["tracking_uri"], loop_cfg["run_id"]) if rank == 0 else None
    run = {"run_id": loop_cfg["run_id"], "tracking_uri": loop_cfg["tracking_uri"]}

    method = None
    total_steps = (loop_cfg["n_images"] // world) // cfg.train.batch_size * cfg.train.epochs
    if cfg.method == "hp":
        from raysseg.methods.hp.trainer import HPTrainer

        method = HPTrainer(cfg, seg, bank, rank, world, device, total_steps, loop_cfg["pool_plan"])
    elif cfg.method in ("picie", "pgg"):
        from raysseg.methods.picie.trainer import PiCIETrainer

        method = PiCIETrainer(cfg, seg, bank, rank, world, device, total_steps, loop_cfg["files"])
    elif cfg.method in ("segsort", "concepts"):
        from raysseg.methods.segsort.trainer import SegmentTrainer

        method = SegmentTrainer(cfg, seg, bank, rank, world, device, total_steps)

    progress = {"epoch": 0, "step": 0, "epoch_step": 0, "clustered": False, "lineage": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        seg.load_state_dict(state["state"])
        progress = state["progress"]
        if progress["epoch"] < cfg.train.epochs:  # a finished run given more epochs trains on, then re-clusters
            progress["clustered"] = False
        if method is not None and state.get("method_state"):
            method.load_state_dict(state["method_state"])
        progress = {"epoch_step": 0, "lineage": [], **progress}  # checkpoints written before these existed
        if rank == 0:
            print(f"resumed from {checkpoint.path} at epoch {progress['epoch']}, step {progress['step']}", flush=True)
    if rank == 0 and bank is not None:  # the checkpoint's tables, or none: never those of a failed attempt
        ray.get(bank.restore.remote((state.get("bank") if checkpoint is not None else None) or {}))
    progress["attempt"] = progress["lineage"][-1]["attempt"] + 1 if progress["lineage"] else 1
    barrier()

    skipped: set = set()
    last_epoch: dict = {}
    if method is not None:
        method.setup(ray.train.get_dataset_shard)
        shard = ray.train.get_dataset_shard("train")

        def mid_epoch_checkpoint() -> None:
            _save(seg, method, progress, bank, rank, {k: progress[k] for k in ("epoch", "step", "epoch_step")},
                  finished=False, run=run)

        for epoch in range(progress["epoch"], cfg.train.epochs):
            method.before_epoch(ray.train.get_dataset_shard, epoch)
            stats, last_images, bad = method.train_epoch(shard, epoch, progress, logger, mid_epoch_checkpoint)
            skipped.update(map(tuple, sum(all_gather(bad), [])))
            progress["epoch"], progress["epoch_step"] = epoch + 1, 0
            if rank == 0 and last_images is not None:  # label-free, per epoch: what ASHA can stop trials on
                stats["view_nmi"] = view_nmi(seg, last_images, cfg.train.seed)
            metrics = {**stats, "epoch": epoch + 1, "step": progress["step"], "skipped_files": len(skipped)}
            last_epoch = stats
            if rank == 0:
                logger.log_metrics({f"epoch/{k}": v for k, v in metrics.items()}, step=progress["step"])
                _log_skipped(logger, skipped)
                if last_images is not None:
                    _log_overlays(cfg, seg, last_images, logger, f"epoch_{epoch + 1:03d}")
            _save(seg, method, progress, bank, rank, metrics, finished=False, run=run)

    if not progress["clustered"]:
        bad, seen, scores = fit_clusters(cfg, seg, ray.train.get_dataset_shard("cluster"), rank, device)
        skipped.update(map(tuple, sum(all_gather(bad), [])))
        progress["clustered"] = True
        metrics = {**last_epoch, **scores, "epoch": progress["epoch"], "step": progress["step"],
                   "skipped_files": len(skipped), FINAL_FLAG: 1}
        if rank == 0:
            logger.log_metrics({"skipped_files": len(skipped), **scores}, step=progress["step"])
            _log_skipped(logger, skipped)
            if seen is not None:
                _log_overlays(cfg, seg, seen, logger, "final")
        _save(seg, method, progress, bank, rank, metrics, finished=True, run=run)


def _log_skipped(logger, skipped: set) -> None:
    if skipped:
        text = "".join(f"{path}\t{error}\n" for path, error in sorted(skipped))
        logger.log_bytes(text.encode(), "skipped_files.txt")
