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
  (:func:`raysseg.methods.moco.core.two_crops`), at ``pretrain.crop_size`` (0 = data.image_size).
- The learning rate follows a per-step cosine (the reference steps it per epoch) and is
  not scaled with the number of workers.
- For a ResNet-FPN only the trunk is trained and saved: the FPN is not on the path of the
  global pool, and leaving it out of backbone.pt lets any ``model.fpn_dim`` load the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raysseg.config import Config, ConfigError
from raysseg.core.geometry import patch_size
from raysseg.engine.loop import PRETRAIN_FILE as STATE_FILE
from raysseg.methods.moco.spec import ADDED_PRETRAIN_SETTINGS
from raysseg.methods.moco.trainer import crop_size

BACKBONE_FILE = "backbone.pt"
BACKBONE_TAG = "raysseg.backbone"
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
    if settings["pretrain.dense_weight"] == 0:
        settings.pop("pretrain.dense_grid")  # unused without the dense term
    for key, default in ADDED_PRETRAIN_SETTINGS.items():  # older runs keep their names
        if settings.get(key) == default:
            settings.pop(key)
    return settings


def pretrain_run_name(cfg: Config) -> str:
    """``<config name>-pretrain-<hash of pretrain_settings>``: the same settings resume the same run."""
    digest = hashlib.sha1(json.dumps(pretrain_settings(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.name}-pretrain-{digest}"


def check_pretrain_inputs(cfg: Config) -> int:
    """Everything that can be checked before Ray starts; returns the training image count."""
    from raysseg.io.images import DatasetError, list_split
    from raysseg.io.weights import ensure

    ensure(cfg.model.weights)  # a weights name is fetched (and checked) now, or one line says where to put it
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
    stride = patch_size(name)
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


def backbone_state(moco_state: dict, backbone_name: str, with_fpn: bool = False) -> dict:
    """The query encoder's backbone as a plain state dict (``trunk.*`` for ResNets, ``vit.*`` for ViTs),
    loadable by :func:`raysseg.core.backbones.build_backbone` ``(name, weights=...)``. A ResNet's FPN
    (``fpn.*``) is kept only ``with_fpn`` (trained by the dense term; then it loads into the same
    ``model.fpn_dim`` only); without it any fpn_dim loads the trunk."""
    prefix = "encoder_q.backbone."
    state = {k[len(prefix):]: v.detach().cpu().clone() for k, v in moco_state.items() if k.startswith(prefix)}
    if not backbone_name.startswith("vit") and not with_fpn:
        state = {k: v for k, v in state.items() if not k.startswith("fpn.")}
    return state


def _use_line(uri: str) -> None:
    print(f"use it with: --set model.weights={uri}", flush=True)


def pretrain(cfg: Config, restart: bool = False) -> PretrainResult:
    """Pretrain (or resume) the run ``pretrain_run_name(cfg)``; returns where its backbone is. Holds the
    run's lease; Ctrl-C or SIGTERM stops it with one line naming the checkpoint kept (as ``train`` does)."""
    from raysseg.io import tracking
    from raysseg.io.lease import RunLease
    from raysseg.runtime.driver import stop_signals

    n_images = check_pretrain_inputs(cfg)
    run_name = pretrain_run_name(cfg)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    tracking.check_reachable(uri)
    with RunLease(cfg.train.storage, run_name), stop_signals():
        return _pretrain(cfg, n_images, run_name, uri, restart)


def _pretrain(cfg: Config, n_images: int, run_name: str, uri: str, restart: bool) -> PretrainResult:
    from raysseg.io import storage
    from raysseg.io import tracking
    from raysseg.engine.inputs import prepared_split
    from raysseg.runtime import logs
    from raysseg.runtime.datasets import make_dataset, run_tasks
    from raysseg.runtime.driver import complete_checkpoints, fit, init_ray, make_trainer, prune_checkpoints, stopped
    from raysseg.runtime.worker import pretrain_loop

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
    prepared = prepared_split(cfg, run=run_tasks)  # data.cache: decoded once, by Ray tasks
    dataset = make_dataset(cfg.data.train, image_size=cfg.data.image_size, train=False, with_labels=False,
                           limit=cfg.data.limit or None, prepared=prepared)
    if n_images * cfg.data.image_size ** 2 * 3 <= MATERIALIZE_BYTES:
        dataset = dataset.materialize()  # decode once, not every epoch
    loop_cfg = {"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": uri, "n_images": n_images}
    logger = tracking.RunLogger(uri, run_id)
    print(logs.where_logs_go(), flush=True)

    def new_trainer():
        loop_cfg["checkpoints"] = complete_checkpoints(cfg, run_name, STATE_FILE)  # newest first
        return make_trainer(cfg, pretrain_loop, loop_cfg, {"train": dataset}, run_name)

    try:
        with logs.ConsolePrinter() as console:
            loop_cfg["console"] = console.actor
            result = fit(new_trainer, logger, run_name, cfg.train.max_restarts)
    except KeyboardInterrupt:
        raise stopped(cfg, run_name, logger, STATE_FILE) from None
    with result.checkpoint.as_directory() as local:
        state = torch.load(Path(local) / STATE_FILE, map_location="cpu", weights_only=False)
    buf = io.BytesIO()
    torch.save(backbone_state(state["moco"], cfg.model.backbone, with_fpn=cfg.pretrain.dense_weight > 0), buf)
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
    prune_checkpoints(cfg, run_name, STATE_FILE)
    print(f"pretraining run {run_name} finished: backbone {out_uri}", flush=True)
    _use_line(out_uri)
    return PretrainResult(run_id, run_name, out_uri, uri, dict(result.metrics or {}))
