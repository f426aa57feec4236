"""The worker loop every runtime runs: Ray Train workers (:mod:`raysseg.runtime.worker`) and the
in-process runner (:mod:`raysseg.engine.local`). No Ray here: the runtime hands in a
:class:`WorkerEnv` (rank, device, datasets, shared state, where checkpoints go).

:func:`train_worker` runs the method's epochs (none for ``kmeans``), then the offline k-means
on the training split that every method ends with. Rank 0 logs (when a logger is given) and
writes the checkpoint (``model.pt``) at the end of every epoch and every
``train.checkpoint_every`` steps. :func:`pretrain_worker` is MoCo v2's loop (``moco.pt``).
"""
from __future__ import annotations

import os
import resource
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from raysseg.core.batches import valid_rows
from raysseg.core.device import configure, prepare_model
from raysseg.core.distributed import all_gather, barrier
from raysseg.core.precision import precision_for
from raysseg.core.progress import Progress
from raysseg.core.selection import SCORE_IMAGES, view_nmi
from raysseg.io.weights import read_weights
from raysseg.methods.base import TrainContext
from raysseg.methods.registry import build_segmenter, build_trainer, spec

FINAL_FLAG = "final"  # in the report of the finished model (after the final clustering)
CHECKPOINT_FILE = "model.pt"
PRETRAIN_FILE = "moco.pt"


class RunStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; the message is one line saying which checkpoint was kept."""


@dataclass
class WorkerEnv:
    """What a runtime gives the worker loop."""

    rank: int
    world: int
    local_world: int  # workers on this machine (they share its cores)
    device: Any
    get_shard: Callable[[str], Any]  # dataset name -> an object with iter_batches(batch_size, batch_format, ...)
    restore: Callable[[str], tuple[dict, str] | None]  # file name -> (latest checkpoint's dict, where) or None
    report: Callable[[dict, dict | None, str], None]  # (metrics, checkpoint dict from rank 0 or None, file name)
    shared: Any = None  # SharedState (None: the run shares nothing)
    wrap_model: Callable = lambda module: module
    logger: Any = None  # tracking.RunLogger on rank 0, or None
    run: dict | None = None  # run_id and tracking_uri, stored in every checkpoint
    start_epoch: Callable[[int], None] = lambda epoch: None  # tells the data readers the epoch (their crops' seed)


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed torch's global generator (dropout, ...) from (seed, rank, epoch): an epoch a resumed run trains
    draws what it drew in an uninterrupted run. The methods' own generators are restored from the checkpoint."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0]))


def _setup_worker(env: WorkerEnv, seed: int) -> None:
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # batches are read-only
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world))  # share the machine's cores
    torch.manual_seed(seed)
    configure(env.device)


def _log_skipped(logger, skipped: set) -> None:
    if logger is not None and skipped:
        text = "".join(f"{path}\t{error}\n" for path, error in sorted(skipped))
        logger.log_bytes(text.encode(), "skipped_files.txt")


def _log_metrics(logger, metrics: dict, step: int) -> None:
    if logger is not None:
        logger.log_metrics(metrics, step=step)


def run_epoch(shard, step_fn, cfg, rank: int, progress: dict, logger, steps: int, label: str,
              timers: dict, checkpoint=None):
    """One pass over a worker's shard: ``step_fn(batch, step) -> stats`` on every batch of valid rows.

    ``progress["epoch_step"]`` batches of this epoch were trained before a mid-epoch restart: that
    many batches of the (freshly shuffled) pass are read but not trained on, so the epoch keeps its
    length. ``checkpoint()`` is called every ``train.checkpoint_every`` steps (on every rank).
    Logs per-step metrics and progress lines from rank 0. Returns (mean stats with
    ``iterations_per_s`` and per-step means of ``timers``, the last non-empty images, skipped
    files). Waiting for data is added to ``timers["data_wait"]``."""
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
                _log_metrics(logger, {f"train/{k}": v for k, v in stats.items()}, progress["step"])
            bar.update(loss=stats["loss_total"])
        if checkpoint is not None and every and progress["step"] % every == 0 and progress["epoch_step"] < steps:
            checkpoint()
        wait = time.perf_counter()
    stats = {k: v / max(n, 1) for k, v in sums.items()}
    stats["iterations_per_s"] = n / max(time.perf_counter() - t_epoch, 1e-9)
    stats.update({f"time_{k}_s": v / max(n, 1) for k, v in timers.items()})
    return stats, last, skipped


def fit_clusters(cfg, seg, shard, rank: int, device):
    """Offline k-means of the codes of the training split; sets ``seg.centroids`` on every rank.

    Returns (skipped files, up to ``SCORE_IMAGES`` of the images seen, the label-free scores:
    ``cluster_mean_cosine``, the k-means objective, and ``view_nmi``; the scores on rank 0 only)."""
    from raysseg.core.kmeans import mean_max_cosine, sample_locations, spherical_kmeans

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
        centroids = spherical_kmeans(x, cfg.n_clusters, cfg.kmeans.iterations, cfg.kmeans.redo, cfg.train.seed,
                                     device=str(device))
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


def _log_overlays(cfg, seg, images: np.ndarray, logger, name: str) -> None:
    """A picture of the current segmentation of a few training images (clusters of their codes)."""
    from raysseg.core.kmeans import spherical_kmeans
    from raysseg.core.pictures import overlay_grid

    if logger is None:
        return
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


def _save(env: WorkerEnv, seg, trainer, progress: dict, metrics: dict, finished: bool) -> None:
    """Report metrics from every rank; rank 0 attaches the checkpoint.

    ``progress["lineage"]`` gains this checkpoint's (epoch, step, epoch_step, attempt): a
    checkpoint lists every checkpoint it descends from, and ``attempt`` goes up by one each time
    training restarts from a checkpoint, so a restart shows up as a change of attempt."""
    if trainer is not None:
        trainer.before_checkpoint(progress)
    progress["lineage"] = progress.get("lineage", []) + [
        {k: progress.get(k, 0) for k in ("epoch", "step", "epoch_step", "attempt")}]
    if env.rank != 0:
        env.report(metrics, None, CHECKPOINT_FILE)
        return
    payload = {"config": seg.cfg.to_dict(), "state": seg.state_dict(), "progress": progress, "finished": finished,
               "method_state": trainer.state_dict() if trainer is not None else None,
               "bank": env.shared.state() if env.shared is not None else None, **(env.run or {})}
    env.report(metrics, payload, CHECKPOINT_FILE)


def _restore(env: WorkerEnv, cfg, seg, trainer) -> dict:
    """Load the latest checkpoint into the model, the trainer and the shared state; returns progress."""
    progress = {"epoch": 0, "step": 0, "epoch_step": 0, "clustered": False, "lineage": []}
    found = env.restore(CHECKPOINT_FILE)
    state = None
    if found is not None:
        state, where = found
        seg.load_state_dict(state["state"])
        progress = state["progress"]
        if progress["epoch"] < cfg.train.epochs:  # a finished run given more epochs trains on, then re-clusters
            progress["clustered"] = False
        if trainer is not None and state.get("method_state"):
            trainer.load_state_dict(state["method_state"])
        progress = {"epoch_step": 0, "lineage": [], **progress}  # checkpoints written before these existed
        if env.rank == 0:
            print(f"resumed from {where} at epoch {progress['epoch']}, step {progress['step']}", flush=True)
    if env.rank == 0 and env.shared is not None:  # the checkpoint's tables, or none: never those of a failed attempt
        env.shared.restore((state.get("bank") if state is not None else None) or {})
    progress["attempt"] = progress["lineage"][-1]["attempt"] + 1 if progress["lineage"] else 1
    return progress


def train_worker(cfg, env: WorkerEnv, n_images: int, plan: dict) -> None:
    """One worker's whole run: the method's epochs, then the offline k-means; checkpoints on the way."""
    _setup_worker(env, cfg.train.seed)
    seg = build_segmenter(cfg, read_bytes=read_weights).to(env.device)
    prepare_model(seg, env.device, cfg.model.backbone, cfg.train.compile)
    logger = env.logger if env.rank == 0 else None
    trainer = None
    total_steps = (n_images // env.world) // cfg.train.batch_size * cfg.train.epochs
    if spec(cfg.method).trainer:
        ctx = TrainContext(rank=env.rank, world=env.world, device=env.device, shared=env.shared,
                           total_steps=total_steps, plan=plan, wrap_model=env.wrap_model,
                           precision=precision_for(cfg, env.device))
        trainer = build_trainer(cfg, seg, ctx)
    progress = _restore(env, cfg, seg, trainer)
    barrier()

    skipped: set = set()
    last_epoch: dict = {}
    if trainer is not None:
        trainer.setup(env.get_shard)
        shard = env.get_shard("train")

        def mid_epoch_checkpoint() -> None:
            _save(env, seg, trainer, progress, {k: progress[k] for k in ("epoch", "step", "epoch_step")},
                  finished=False)

        for epoch in range(progress["epoch"], cfg.train.epochs):
            t_epoch = time.perf_counter()
            env.start_epoch(epoch)
            seed_epoch(cfg.train.seed, env.rank, epoch)
            barrier()  # every reader of this epoch sees its number
            trainer.before_epoch(env.get_shard, epoch)
            stats, last_images, bad = run_epoch(
                shard, trainer.train_step, cfg, env.rank, progress, logger, total_steps // cfg.train.epochs,
                f"{cfg.method} epoch {epoch + 1}/{cfg.train.epochs}", trainer.timers, mid_epoch_checkpoint)
            stats.update(trainer.epoch_stats())
            stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            skipped.update(map(tuple, sum(all_gather(bad), [])))
            progress["epoch"], progress["epoch_step"] = epoch + 1, 0
            if env.rank == 0 and last_images is not None:  # label-free, per epoch: what ASHA can stop trials on
                stats["view_nmi"] = view_nmi(seg, last_images, cfg.train.seed)
            metrics = {**stats, "epoch": epoch + 1, "step": progress["step"], "skipped_files": len(skipped)}
            last_epoch = stats
            if env.rank == 0:
                print(epoch_line(cfg, env.world, epoch, stats, time.perf_counter() - t_epoch), flush=True)
                _log_metrics(logger, {f"epoch/{k}": v for k, v in metrics.items()}, progress["step"])
                _log_skipped(logger, skipped)
                if last_images is not None:
                    _log_overlays(cfg, seg, last_images, logger, f"epoch_{epoch + 1:03d}")
            _save(env, seg, trainer, progress, metrics, finished=False)

    if not progress["clustered"]:
        bad, seen, scores = fit_clusters(cfg, seg, env.get_shard("cluster"), env.rank, env.device)
        skipped.update(map(tuple, sum(all_gather(bad), [])))
        progress["clustered"] = True
        metrics = {**last_epoch, **scores, "epoch": progress["epoch"], "step": progress["step"],
                   "skipped_files": len(skipped), FINAL_FLAG: 1}
        if env.rank == 0:
            _log_metrics(logger, {"skipped_files": len(skipped), **scores}, progress["step"])
            _log_skipped(logger, skipped)
            if seen is not None:
                _log_overlays(cfg, seg, seen, logger, "final")
        _save(env, seg, trainer, progress, metrics, finished=True)
    if logger is not None:
        logger.close()  # what an MLflow outage kept back, sent now (or one line after RAYSSEG_MLFLOW_RETRY_SECONDS)


def epoch_line(cfg, world: int, epoch: int, stats: dict, seconds: float) -> str:
    """One line per epoch: losses, the label-free score, images/s and the time the remaining epochs take."""
    losses = ", ".join(f"{k} {v:.4f}" for k, v in stats.items() if k.startswith("loss_"))
    score = f", view_nmi {stats['view_nmi']:.3f}" if "view_nmi" in stats else ""
    rate = stats.get("iterations_per_s", 0.0) * cfg.train.batch_size * world
    left = seconds * (cfg.train.epochs - epoch - 1)
    return (f"epoch {epoch + 1}/{cfg.train.epochs}: {losses}{score}, {rate:.1f} images/s, "
            f"{left:.0f} s left (then k-means)")


def checkpoint_position(progress: dict, epochs: int) -> str:
    """Where a checkpoint's ``progress`` stands, numbered as the progress lines number epochs (from 1):
    ``epoch 4/4, step 10`` inside epoch 4, ``end of epoch 3/4, step 9`` after it."""
    epoch, step = progress.get("epoch", 0), progress.get("step", 0)
    if progress.get("epoch_step", 0):
        return f"epoch {epoch + 1}/{epochs}, step {step}"
    return f"end of epoch {epoch}/{epochs}, step {step}" if epoch else f"step {step}"


# ---------------------------------------------------------------- MoCo v2 pretraining


def _save_pretrain(env: WorkerEnv, cfg, trainer, progress: dict, metrics: dict) -> None:
    """Report metrics from every rank; rank 0 attaches the checkpoint (all ranks' generator states in it)."""
    generators = all_gather(trainer.generator.get_state())
    payload = None
    if env.rank == 0:
        payload = {**trainer.state_dict(), "progress": dict(progress), "generators": generators,
                   "config": cfg.to_dict(), "backbone": cfg.model.backbone}
    env.report(metrics, payload, PRETRAIN_FILE)


def pretrain_worker(cfg, env: WorkerEnv, n_images: int) -> None:
    """One worker's MoCo v2 pretraining: DDP on the query encoder, checkpoints (``moco.pt``) every epoch."""
    from raysseg.methods.moco.trainer import MoCoTrainer, build_moco, cosine_lr, fill_batch

    _setup_worker(env, cfg.train.seed)
    pc = cfg.pretrain
    rank, world, logger = env.rank, env.world, env.logger if env.rank == 0 else None
    moco = build_moco(cfg, env.device, read_bytes=read_weights)
    steps_per_epoch = (n_images // world) // pc.batch_size
    ctx = TrainContext(rank=rank, world=world, device=env.device, shared=env.shared,
                       total_steps=steps_per_epoch * pc.epochs, wrap_model=env.wrap_model,
                       precision=precision_for(cfg, env.device))
    trainer = MoCoTrainer(cfg, moco, ctx)  # DDP on the query encoder when world > 1 (parameters from rank 0)

    progress = {"epoch": 0, "step": 0}
    found = env.restore(PRETRAIN_FILE)
    if found is not None:
        state, where = found
        trainer.load_state_dict(state)
        progress = state["progress"]
        if len(state.get("generators", [])) == world:
            trainer.generator.set_state(state["generators"][rank])
        if rank == 0:
            print(f"resumed from {where} at epoch {progress['epoch']}, step {progress['step']}", flush=True)
    else:
        moco.sync_key_encoder()  # the key encoder starts as the (rank-0 broadcast) query encoder
    barrier()

    shard = env.get_shard("train")
    skipped: set = set()
    if progress["epoch"] >= pc.epochs:  # finished before the driver wrote backbone.pt: report it again
        _save_pretrain(env, cfg, trainer, progress, {"epoch": progress["epoch"], "step": progress["step"]})
        return
    for epoch in range(progress["epoch"], pc.epochs):
        env.start_epoch(epoch)
        bar = Progress(steps_per_epoch, f"pretrain epoch {epoch + 1}/{pc.epochs}", cfg.train.log_every) if rank == 0 else None
        sums = {"loss": 0.0, "pos_logit": 0.0, "neg_logit": 0.0, "acc": 0.0}
        if pc.dense_weight:
            sums["dense_loss"] = 0.0
        n, bad_rows, t_epoch = 0, [], time.perf_counter()
        batches = shard.iter_batches(batch_size=pc.batch_size, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=max(4 * pc.batch_size, 64))
        for _, batch in zip(range(steps_per_epoch), batches):
            t0 = time.perf_counter()
            batch, bad = valid_rows(batch)
            bad_rows += bad
            images, weight = fill_batch(batch["image"], pc.batch_size, cfg.data.image_size)
            stats = trainer.step(images, weight, progress["step"])
            progress["step"] += 1
            n += 1
            for key in sums:
                sums[key] += stats[key]
            if rank == 0:
                stats["images_per_s"] = world * pc.batch_size / max(time.perf_counter() - t0, 1e-9)
                if progress["step"] % cfg.train.log_every == 0:
                    _log_metrics(logger, {f"train/{k}": v for k, v in stats.items()}, progress["step"])
                bar.update(loss=stats["loss"], acc=stats["acc"], lr=stats["lr"])
        elapsed = time.perf_counter() - t_epoch
        skipped.update(map(tuple, sum(all_gather(bad_rows), [])))
        digest, checksum = moco.queue_checksum()
        progress["epoch"] = epoch + 1
        metrics = {k: v / max(n, 1) for k, v in sums.items()}
        metrics.update({
            "epoch": epoch + 1, "step": progress["step"], "lr": cosine_lr(pc.lr, progress["step"], trainer.total_steps),
            "images_per_s": world * pc.batch_size * n / max(elapsed, 1e-9), "epoch_s": elapsed,
            "queue_checksum": checksum, "queue_sha1_by_rank": all_gather(digest), "skipped_files": len(skipped),
        })
        if rank == 0:
            _log_metrics(logger, {f"epoch/{k}": v for k, v in metrics.items() if not isinstance(v, list)},
                         progress["step"])
            _log_skipped(logger, skipped)
            dense = f" (dense term {metrics['dense_loss']:.4f})" if "dense_loss" in metrics else ""
            print(f"[pretrain] epoch {epoch + 1}/{pc.epochs}: loss {metrics['loss']:.4f}{dense}, "
                  f"top-1 {metrics['acc']:.3f}, {metrics['images_per_s']:.1f} images/s", flush=True)
        _save_pretrain(env, cfg, trainer, progress, metrics)
    if logger is not None:
        logger.close()
