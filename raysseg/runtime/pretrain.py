"""Self-supervised backbone pretraining with MoCo v2 on Ray Train: ``raysseg pretrain``.

The driver (:func:`pretrain`) validates inputs, opens or resumes the MLflow run and starts a
``TorchTrainer`` whose run name and storage path identify the run, so running the same
command again resumes from the latest checkpoint (Ray Train restores it). At the end it
writes the query backbone's weights as a plain state dict, ``<train.storage>/<run>/backbone.pt``,
that every method loads with ``--set model.weights=<uri>``.

Every worker runs :func:`pretrain_loop`: DDP on the query encoder, SGD (momentum 0.9) with a
cosine learning rate over ``pretrain.epochs``, the key encoder as an EMA of the query encoder.
Keys of every worker are all-gathered (in rank order) before they enter the queue, so all
workers hold the same queue (the epoch metrics carry each rank's queue hash to show it).
With more than one worker the key encoder's BatchNorm sees a batch shuffled across workers
(MoCo's shuffle-BN: all-gather the key views, rank 0 draws a permutation and broadcasts it,
each worker encodes its slice, the keys are gathered back and un-shuffled), so a query cannot
match its key through the statistics of its own worker's batch. With one worker there is
nothing to shuffle across and the key encoder uses that worker's batch statistics, as
single-GPU MoCo does.

Differences from the MoCo v2 reference, on purpose:
- The dataset is the eval-style pipeline (short side resized to data.image_size, centre
  crop); the random resized crops are taken from that square on the worker
  (:func:`moco_core.two_crops`), at ``pretrain.crop_size`` (0 = data.image_size).
- The learning rate follows a per-step cosine (the reference steps it per epoch) and is
  not scaled with the number of workers.
- For a ResNet-FPN only the trunk is trained and saved: the FPN is not on the path of the
  global pool, and leaving it out of backbone.pt lets any ``model.fpn_dim`` load the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raysseg.config import Config, ConfigError, config_from_dict
from raysseg.methods.moco.core import moco_logits, two_crops

BACKBONE_FILE = "backbone.pt"
STATE_FILE = "moco.pt"
BACKBONE_TAG = "raysseg.backbone"
SGD_MOMENTUM = 0.9
MATERIALIZE_BYTES = 256 << 20  # decoded datasets up to this size are kept in the object store across epochs


@dataclass
class PretrainResult:
    run_id: str
    run_name: str
    backbone: str  # URI of backbone.pt: use it as model.weights
    tracking_uri: str
    metrics: dict = field(default_factory=dict)
    already_finished: bool = False


# ---------------------------------------------------------------- driver side


def pretrain_settings(cfg: Config) -> dict:
    """The settings that identify a pretraining run (and are logged as its MLflow params)."""
    flat = cfg.flat()
    keys = ["data.train", "data.limit", "data.image_size", "model.backbone", "model.weights",
            "train.seed", "train.num_workers", "train.use_gpu"]
    settings = {k: flat[k] for k in keys}
    settings.update({k: v for k, v in flat.items() if k.startswith("pretrain.")})
    return settings


def pretrain_run_name(cfg: Config) -> str:
    """``<config name>-pretrain-<hash of pretrain_settings>``: the same settings resume the same run."""
    digest = hashlib.sha1(json.dumps(pretrain_settings(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.name}-pretrain-{digest}"


def crop_size(cfg: Config) -> int:
    return cfg.pretrain.crop_size or cfg.data.image_size


def check_pretrain_inputs(cfg: Config) -> int:
    """Everything that can be checked before Ray starts; returns the training image count."""
    from raysseg.io.images import DatasetError, list_split

    try:
        files = list_split(cfg.data.train, with_labels=False).images
    except DatasetError as e:
        raise ConfigError(f"data.train: {e}") from None
    n = min(len(files), cfg.data.limit) if cfg.data.limit else len(files)
    per_worker = n // cfg.train.num_workers
    if per_worker < cfg.pretrain.batch_size:
        raise ConfigError(
            f"pretrain.batch_size: {cfg.pretrain.batch_size} images per worker but only {per_worker} per worker "
            f"({n} images, {cfg.train.num_workers} workers); lower pretrain.batch_size or train.num_workers"
        )
    name = cfg.model.backbone
    stride = 8 if "patch8" in name else 16 if "patch16" in name else 1
    if crop_size(cfg) % stride:
        raise ConfigError(
            f"pretrain.crop_size: {crop_size(cfg)} is not a multiple of {stride}, the patch size of {name}"
        )
    return n


def backbone_uri(cfg: Config, run_name: str) -> str:
    """Where the run's backbone.pt goes: next to Ray's checkpoints of the run (absolute for a folder)."""
    if cfg.train.storage.startswith("s3://"):
        return f"{cfg.train.storage.rstrip('/')}/{run_name}/{BACKBONE_FILE}"
    return str(Path(cfg.train.storage).resolve() / run_name / BACKBONE_FILE)


def backbone_state(moco_state: dict, backbone_name: str) -> dict:
    """The query encoder's backbone as a plain state dict (``trunk.*`` for ResNets, ``vit.*`` for ViTs),
    loadable by :func:`raysseg.core.backbones.build_backbone` ``(name, weights=...)``."""
    prefix = "encoder_q.backbone."
    state = {k[len(prefix):]: v.detach().cpu().clone() for k, v in moco_state.items() if k.startswith(prefix)}
    if not backbone_name.startswith("vit"):
        state = {k: v for k, v in state.items() if not k.startswith("fpn.")}  # untrained by MoCo; any fpn_dim loads
    return state


def _use_line(uri: str) -> None:
    print(f"use it with: --set model.weights={uri}", flush=True)


def pretrain(cfg: Config, restart: bool = False) -> PretrainResult:
    """Pretrain (or resume) the run ``pretrain_run_name(cfg)``; returns where its backbone is."""
    from raysseg.io import storage
    from raysseg.io import tracking
    from raysseg.runtime.datasets import make_dataset
    from raysseg.runtime.driver import fit, init_ray, make_trainer

    n_images = check_pretrain_inputs(cfg)
    run_name = pretrain_run_name(cfg)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    out_uri = backbone_uri(cfg, run_name)
    previous = tracking.find_run(uri, cfg.mlflow.experiment, run_name)
    if restart:
        storage.remove_tree(f"{cfg.train.storage.rstrip('/')}/{run_name}")
        if previous is not None and previous.info.status != "FINISHED":
            tracking.RunLogger(uri, previous.info.run_id).finish("KILLED")
    elif previous is not None and previous.info.status == "FINISHED" and previous.data.tags.get(BACKBONE_TAG):
        done = previous.data.tags[BACKBONE_TAG]
        print(f"pretraining run {run_name} already finished (MLflow run {previous.info.run_id}); "
              f"its backbone: {done}; use --restart to pretrain again")
        _use_line(done)
        return PretrainResult(previous.info.run_id, run_name, done, uri, dict(previous.data.metrics),
                              already_finished=True)
    params = {**pretrain_settings(cfg), "name": cfg.name, "method": "moco_v2"}
    run_id, resumed = tracking.start_or_resume_run(uri, cfg.mlflow.experiment, run_name, params)
    print(f"{'resuming' if resumed else 'starting'} pretraining run {run_name} (MLflow run {run_id} at {uri})")
    if cfg.pretrain.queue > n_images:
        print(f"note: pretrain.queue = {cfg.pretrain.queue} is more than the {n_images} training images: "
              f"the queue will hold older keys of each image as its own negatives", flush=True)

    world = cfg.train.num_workers
    init_ray(world)
    dataset = make_dataset(cfg.data.train, image_size=cfg.data.image_size, train=False, with_labels=False,
                           limit=cfg.data.limit or None)
    if n_images * cfg.data.image_size ** 2 * 3 <= MATERIALIZE_BYTES:
        dataset = dataset.materialize()  # decode once, not every epoch
    loop_cfg = {"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": uri, "n_images": n_images}
    logger = tracking.RunLogger(uri, run_id)
    result = fit(lambda: make_trainer(cfg, pretrain_loop, loop_cfg, {"train": dataset}, run_name), logger, run_name,
                 cfg.train.max_restarts)
    with result.checkpoint.as_directory() as local:
        state = torch.load(Path(local) / STATE_FILE, map_location="cpu", weights_only=False)
    buf = io.BytesIO()
    torch.save(backbone_state(state["moco"], cfg.model.backbone), buf)
    try:
        storage.write_bytes_atomic(out_uri, buf.getvalue())
        with tempfile.TemporaryDirectory() as tmp:
            local_file = Path(tmp) / BACKBONE_FILE
            local_file.write_bytes(buf.getvalue())
            logger.log_file(str(local_file))
    except Exception:
        logger.finish("FAILED")
        raise
    logger.set_tag(BACKBONE_TAG, out_uri)
    logger.finish("FINISHED")
    print(f"pretraining run {run_name} finished: backbone {out_uri}", flush=True)
    _use_line(out_uri)
    return PretrainResult(run_id, run_name, out_uri, uri, dict(result.metrics or {}))


# ---------------------------------------------------------------- worker side


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` (same shape on every rank) in rank order along dim 0."""
    from raysseg.runtime.driver import _dist

    dist = _dist()
    if dist is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def cosine_lr(base: float, step: int, total: int) -> float:
    """base * (1 + cos(pi * step / total)) / 2."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


class MoCoTrainer:
    """One worker's MoCo v2 optimisation: views, query/key encoding, loss, SGD, EMA, queue.

    ``query`` is ``moco.encoder_q`` itself or its DDP wrapper. Works without a process group
    (one worker, or a unit test): then there is no key shuffle and nothing to gather."""

    def __init__(self, cfg: Config, moco, query, device, rank: int, world: int, total_steps: int):
        self.cfg, self.moco, self.query, self.device = cfg, moco, query, device
        self.rank, self.world, self.total_steps = rank, world, max(total_steps, 1)
        params = [p for p in moco.encoder_q.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.pretrain.lr, momentum=SGD_MOMENTUM,
                                         weight_decay=cfg.pretrain.weight_decay)
        self.generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank)
        self.size = crop_size(cfg)
        self.scale = (cfg.pretrain.crop_scale_min, 1.0)

    def state_dict(self) -> dict:
        return {"moco": self.moco.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.moco.load_state_dict(state["moco"])
        self.optimizer.load_state_dict(state["optimizer"])

    @torch.no_grad()
    def _keys(self, x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's keys (B, P), every rank's keys in rank order (W*B, P)); shuffle-BN when W > 1."""
        from raysseg.runtime.driver import _dist

        dist = _dist()
        encoder = self.moco.encoder_k
        if dist is None or self.world == 1:
            k = encoder(x_k)
            return k, k
        b = x_k.shape[0]
        everything = _gather(x_k)  # (W*B, 3, S, S)
        perm = torch.randperm(everything.shape[0], generator=self.generator, device=self.generator.device)
        perm = perm.to(x_k.device)
        dist.broadcast(perm, src=0)  # rank 0's permutation for everyone
        mine = perm[self.rank * b:(self.rank + 1) * b]
        shuffled = _gather(encoder(everything[mine]))  # row j: key of image perm[j]
        keys = torch.empty_like(shuffled)
        keys[perm] = shuffled
        return keys[self.rank * b:(self.rank + 1) * b], keys

    def step(self, images: np.ndarray, weight: np.ndarray, step: int) -> dict[str, float]:
        """One iteration. images: uint8 (B, S, S, 3), B the same on every rank; weight: (B,) 1 for
        real rows, 0 for fillers (left out of the loss and the queue)."""
        lr = cosine_lr(self.cfg.pretrain.lr, step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        w = torch.from_numpy(np.asarray(weight, np.float32)).to(self.device)
        x_q, x_k = two_crops(torch.from_numpy(images).to(self.device), self.generator, self.size, self.scale)
        q = self.query(x_q)
        with torch.no_grad():
            self.moco.momentum_update()
            k, all_keys = self._keys(x_k)
            all_w = _gather(w)
        per_row = self.moco.loss(q, k, reduction="none")
        loss = (per_row * w).sum() / w.sum().clamp(min=1.0)
        from raysseg.runtime.driver import optimizer_step

        optimizer_step(loss, self.optimizer, step, "pretrain.lr", self.cfg.pretrain.lr)
        with torch.no_grad():
            logits = moco_logits(q.detach(), k, self.moco.queue)
            real = w > 0
            n_real = max(int(real.sum()), 1)
            stats = {
                "loss": float(loss),
                "pos_logit": float(logits[real, 0].sum()) / n_real / self.moco.temperature,
                "neg_logit": float(logits[real, 1:].mean(dim=1).sum()) / n_real / self.moco.temperature,
                "acc": float((logits[real].argmax(dim=1) == 0).float().sum()) / n_real,
                "lr": lr,
            }
            self.moco.enqueue(all_keys[all_w > 0])
        return stats


def fill_batch(images: np.ndarray, batch_size: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad a batch whose unreadable rows were dropped back to ``batch_size`` rows (every rank must
    contribute the same number of keys): repeat its readable rows, or zeros if none. Returns
    (images (batch_size, ...), weight (batch_size,) with 0 for the filler rows)."""
    m = len(images)
    weight = (np.arange(batch_size) < m).astype(np.float32)
    if m == batch_size:
        return images, weight
    if m == 0:
        return np.zeros((batch_size, size, size, 3), np.uint8), weight
    return images[np.arange(batch_size) % m], weight


def _save(trainer: MoCoTrainer, progress: dict, metrics: dict, rank: int, cfg: Config) -> None:
    """Report metrics from every rank; rank 0 attaches the checkpoint (all ranks' generator states in it)."""
    import ray.train

    from raysseg.runtime.driver import all_gather

    generators = all_gather(trainer.generator.get_state())
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({**trainer.state_dict(), "progress": dict(progress), "generators": generators,
                    "config": cfg.to_dict(), "backbone": cfg.model.backbone}, Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def pretrain_loop(loop_cfg: dict) -> None:
    """The Ray Train worker function of :func:`pretrain`."""
    import ray.train
    import ray.train.torch

    from raysseg.io import tracking
    from raysseg.core.backbones import build_backbone
    from raysseg.io.images import valid_rows
    from raysseg.methods.moco.core import MoCo
    from raysseg.runtime.driver import Progress, all_gather, barrier

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # batches are read-only
    cfg = config_from_dict(loop_cfg["config"])
    pc = cfg.pretrain
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))  # share the node's cores
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()
    resnet = not cfg.model.backbone.startswith("vit")
    backbone = build_backbone(cfg.model.backbone, weights=cfg.model.weights or None, frozen=False,
                              fpn_dim=cfg.model.fpn_dim if resnet else None)
    moco = MoCo(backbone, pc.proj_dim, pc.queue, pc.momentum, pc.temperature, seed=cfg.train.seed).to(device)
    moco.train()
    query = ray.train.torch.prepare_model(moco.encoder_q)  # DDP when world > 1 (parameters from rank 0)
    steps_per_epoch = (loop_cfg["n_images"] // world) // pc.batch_size
    trainer = MoCoTrainer(cfg, moco, query, device, rank, world, steps_per_epoch * pc.epochs)
    logger = tracking.RunLogger(loop_cfg["tracking_uri"], loop_cfg["run_id"]) if rank == 0 else None

    progress = {"epoch": 0, "step": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        trainer.load_state_dict(state)
        progress = state["progress"]
        if len(state.get("generators", [])) == world:
            trainer.generator.set_state(state["generators"][rank])
        if rank == 0:
            print(f"resumed from {checkpoint.path} at epoch {progress['epoch']}, step {progress['step']}", flush=True)
    else:
        moco.sync_key_encoder()  # the key encoder starts as the (rank-0 broadcast) query encoder
    barrier()

    shard = ray.train.get_dataset_shard("train")
    skipped: set = set()
    if progress["epoch"] >= pc.epochs:  # finished before the driver wrote backbone.pt: report it again
        _save(trainer, progress, {"epoch": progress["epoch"], "step": progress["step"]}, rank, cfg)
        return
    for epoch in range(progress["epoch"], pc.epochs):
        bar = Progress(steps_per_epoch, f"pretrain epoch {epoch + 1}/{pc.epochs}", cfg.train.log_every) if rank == 0 else None
        sums = {"loss": 0.0, "pos_logit": 0.0, "neg_logit": 0.0, "acc": 0.0}
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
                    logger.log_metrics({f"train/{k}": v for k, v in stats.items()}, step=progress["step"])
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
            logger.log_metrics({f"epoch/{k}": v for k, v in metrics.items() if not isinstance(v, list)},
                               step=progress["step"])
            if skipped:
                logger.log_bytes("".join(f"{p}\t{e}\n" for p, e in sorted(skipped)).encode(), "skipped_files.txt")
            print(f"[pretrain] epoch {epoch + 1}/{pc.epochs}: loss {metrics['loss']:.4f}, "
                  f"top-1 {metrics['acc']:.3f}, {metrics['images_per_s']:.1f} images/s", flush=True)
        _save(trainer, progress, metrics, rank, cfg)
