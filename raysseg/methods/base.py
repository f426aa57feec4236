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
class MethodSpec:
    """Everything outside its own folder that needs to know about a method.

    ``trainer`` is ``"module:Class"``, imported only when training (None: nothing to train, the
    offline k-means alone). ``head(cfg, backbone_dim)`` builds the module between backbone and
    codes (its ``embed(feats, rgb)`` gives the codes, its ``code_dim`` their size); ``buffers(cfg,
    code_dim)`` names extra tensors the segmenter carries in its checkpoint. ``datasets(cfg, plan)``
    maps each training dataset the trainer reads to its reading options (``cluster``, the whole
    training split centre-cropped, always exists). ``plan(cfg, files, grid)`` is computed once by
    the driver and reaches every worker. ``check_config`` runs when a config is loaded,
    ``check_inputs(cfg, n_images)`` before training starts."""

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
    step_timers: tuple[tuple[str, str], ...] = ()  # (timer, column title) for `raysseg bench step`
    once_timers: tuple[tuple[str, str], ...] = ()
    bench_backbone: str = ""


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
    for group in optimizer.param_groups:
        group["lr"] = lr
    generator.set_state(state["generator"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
