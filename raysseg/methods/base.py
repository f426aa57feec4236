"""What a method is (:class:`MethodSpec`), what its trainer gets (:class:`TrainContext`) and must
provide (:class:`Trainer`), and the shared state every trainer talks to (:class:`SharedState`).

A trainer is plain PyTorch: it never imports Ray. Whichever runtime runs it (Ray Train
workers, or one process with :func:`raysseg.engine.local.train_local`) hands it a
:class:`TrainContext`: its rank, the world size, the device, a ``wrap_model`` that makes a
module data-parallel (DDP under Ray Train, nothing in one process), the shared state and the
precision (forward passes and losses under ``ctx.precision.autocast()``, decisions in
:func:`raysseg.core.precision.exact_fp32`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from raysseg.core.precision import Precision


class SharedState(Protocol):
    """Named, versioned tables every worker sees identically (see :mod:`raysseg.methods.shared`).

    Implemented by :class:`raysseg.methods.shared.LocalSharedState` (one process) and by the Ray
    actor behind :class:`raysseg.runtime.bank.RaySharedState` (every worker of a run). Writes return at
    once; reads wait until the version asked for is published."""

    def version(self, name: str) -> int: ...
    def get(self, name: str, version: int, rank: int = -1) -> tuple[int, np.ndarray]: ...
    def get_many(self, names: list[str], version: int, rank: int = -1) -> dict[str, tuple[int, np.ndarray]]: ...
    def put_part(self, name: str, version: int, rank: int, index: np.ndarray, values: np.ndarray) -> None: ...
    def append(self, name: str, version: int, rank: int, values: np.ndarray, keep: int) -> None: ...
    def publish(self, name: str, version: int, values: np.ndarray) -> None: ...
    def init_reduced(self, state: dict[str, np.ndarray], seed: int) -> None: ...
    def reduce(self, version: int, rank: int, contribution: Any, reducer: Callable) -> None: ...
    def share(self, key: str, rank: int, obj: Any) -> None: ...
    def collect(self, key: str) -> list: ...
    def put_block(self, array: np.ndarray) -> Any: ...
    def get_blocks(self, handles: list) -> list[np.ndarray]: ...
    def kmeans(self, blocks: list, k: int, **options) -> Any: ...


@dataclass
class TrainContext:
    """What the runtime gives a trainer."""

    rank: int
    world: int
    device: Any  # torch.device
    shared: SharedState
    total_steps: int  # optimisation steps of the whole run (every epoch)
    plan: dict = field(default_factory=dict)  # the method's driver-side plan (MethodSpec.plan)
    wrap_model: Callable = lambda module: module  # DistributedDataParallel under Ray Train
    precision: Precision = field(default_factory=Precision)  # autocast and loss scaling (train.precision)


class Trainer(Protocol):
    """One worker's side of a method. The engine (:mod:`raysseg.engine.loop`) calls, in order:
    ``setup`` once, then per epoch ``before_epoch``, ``train_step`` per batch and ``epoch_stats``;
    ``before_checkpoint`` and ``state_dict`` whenever a checkpoint is written."""

    timers: dict[str, float]  # seconds per part of the step, summed over the epoch's steps

    def setup(self, get_shard: Callable) -> None: ...
    def before_epoch(self, get_shard: Callable, epoch: int) -> None: ...
    def train_step(self, batch: dict, step: int) -> dict[str, float]: ...
    def epoch_stats(self) -> dict[str, float]: ...
    def before_checkpoint(self, progress: dict) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class PrecomputedTable:
    """A table over the training split's images, computed once before training by parallel jobs and stored
    beside the prepared data (:mod:`raysseg.engine.tables`), e.g. STEGO's nearest neighbours.

    ``vectors(seg, images)``: uint8 centre crops (B, S, S, 3) -> (B, D) float tensor, computed with the run's
    segmenter over chunks of the split; ``rows(vectors, start, stop)``: every image's vector (N, D) -> rows
    ``start:stop`` of the table (an array with one row per image). ``settings``: what the table depends on
    besides the split, ``data.image_size``, the backbone and its weights (a change gives a new table)."""

    vectors: Callable
    rows: Callable
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """Everything outside its own folder that needs to know about a method.

    ``trainer`` is ``"module:Class"``, imported only when training (None: nothing to train, the
    offline k-means alone). ``head(cfg, backbone_dim)`` builds the module between backbone and
    codes (its ``embed(feats, rgb)`` gives the codes, its ``code_dim`` their size); ``buffers(cfg,
    code_dim)`` names extra tensors the segmenter carries in its checkpoint. ``datasets(cfg, plan)``
    maps each training dataset the trainer reads to its reading options (``cluster``, the whole
    training split centre-cropped, always exists). ``plan(cfg, files, grid)`` is computed once by
    the driver and reaches every worker. ``check_config`` runs when a config is loaded,
    ``check_inputs(cfg, n_images)`` before training starts. ``tables(cfg)`` names the method's
    :class:`PrecomputedTable` s; the runtime builds them before ``plan`` and hands them to ``datasets`` as
    ``plan["tables"][name]`` = {"paths": image URIs, "rows": one table row per path}."""

    name: str
    summary: str
    sections: tuple[tuple[str, type], ...] = ()
    trainer: str | None = None
    head: Callable | None = None
    buffers: Callable | None = None
    output_stride: int | Callable | None = None  # pixels per code cell (or cfg -> it) when the head changes the backbone's
    datasets: Callable = lambda cfg, plan: {}
    plan: Callable | None = None
    check_config: Callable = lambda cfg: None
    check_inputs: Callable = lambda cfg, n_images: None
    tables: Callable = lambda cfg: {}
    step_timers: tuple[tuple[str, str], ...] = ()  # (timer, column title) for `raysseg bench step`
    once_timers: tuple[tuple[str, str], ...] = ()
    bench_backbone: str = ""
    trains_trunk: bool = False  # its trainer uses make_optimizer: train.optimizer, lr_schedule, trunk_lr_scale


SGD_MOMENTUM = 0.9
POLY_POWER = 0.9


def make_optimizer(seg, cfg):
    """The optimiser of a method that trains its backbone: Adam, or SGD with momentum 0.9
    (``train.optimizer``), over ``seg.param_groups`` (the trunk at ``train.trunk_lr_scale`` of the rate)."""
    groups, t = seg.param_groups(cfg.train.lr), cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=SGD_MOMENTUM, weight_decay=t.weight_decay)
    return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)


def scheduled_lr(cfg, step: int, total_steps: int) -> float:
    """``train.lr`` at ``step`` (0-based) of ``total_steps``: constant, or poly: lr x (1 - step/total)^0.9."""
    if cfg.train.lr_schedule == "poly":
        return cfg.train.lr * max(0.0, 1.0 - step / max(total_steps, 1)) ** POLY_POWER
    return cfg.train.lr


def set_lr(optimizer, lr: float) -> None:
    """Every group at ``lr`` times its ``lr_scale`` (a trunk's group learns at a fraction of it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_state(optimizer, generator, scaler=None) -> dict:
    """A trainer's checkpointed state: the optimizer, the augmentation generator and fp16's loss scaler."""
    state = {"optimizer": optimizer.state_dict(), "generator": generator.get_state()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def load_optimizer_state(state: dict, optimizer, generator, lr: float, scaler=None) -> None:
    """Restore :func:`optimizer_state`; the config's learning rate wins (e.g. lowered after a NaN). A run
    resumed in fp16 from a checkpoint of another precision starts a fresh loss scale."""
    optimizer.load_state_dict(state["optimizer"])
    set_lr(optimizer, lr)
    generator.set_state(state["generator"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
