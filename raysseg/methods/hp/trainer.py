"""HP's trainer: one worker's side of training (the maths is in :mod:`raysseg.methods.hp.core`).

Shared state goes through the :class:`raysseg.methods.base.SharedState` of the context:
- ``pool`` (version 1, built once): the backbone features of M patches, one random
  patch from each of M images drawn by the driver across the whole training split.
  Each worker computes the features of its shard of those images. Q_ag is this table
  (L2-normalised inside the loss). The backbone is frozen, so it never goes stale.
- ``sp`` (version v = step // N + 1): the EMA-head codes of the same pool patches,
  renewed every N iterations; worker r computes rows r, r + W, r + 2W, ... Since the
  EMA head is identical on every worker (DDP keeps the trained head in sync and the
  EMA update is deterministic), the table equals what one worker would compute.

``hp.loss_form: released`` (points 5-7 of :mod:`raysseg.methods.hp.core`) changes these things
here: lambda follows :func:`lambda_released`, Q_sp versions follow :func:`released_sp_version`
(renewed every N iterations within each epoch, not at its iteration 0), and the projection
head is a parameter group without weight decay (AdamW with weight decay 0 is Adam) that
gradient clipping leaves out (6); Q_ag's rows are dropped out once, and every Q_sp version is
computed from a new random patch of each pool image (the backbone runs over the pool images
again), through the EMA head's dropped-out branches (5): the patches come from (train.seed,
version) and the dropout samples from (train.seed, version, rank) in a forked generator, so
renewals leave the training's random stream alone; the EMA head is updated with the weights
before the optimiser step (7).
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from raysseg.core.augment import photometric_augment
from raysseg.core.backbones import normalize, standardize
from raysseg.core.batches import valid_rows
from raysseg.core.device import Uploader, clock
from raysseg.core.distributed import optimizer_step
from raysseg.core.precision import exact_fp32
from raysseg.methods.base import TrainContext, load_optimizer_state, optimizer_state
from raysseg.methods.hp.core import ema_update, lambda_at, lambda_released, released_sp_version


class _HPLoss(nn.Module):
    """Wraps ``HPModel.loss`` as ``forward`` so DistributedDataParallel syncs its gradients."""

    def __init__(self, head: nn.Module, cfg, generator: torch.Generator):
        super().__init__()
        self.head, self.cfg, self.generator = head, cfg, generator

    def forward(self, feats, feats_aug, attn, q_ag, q_sp, lam):
        hp = self.cfg.hp
        return self.head.loss(feats, feats_aug, attn, q_ag, q_sp, lam, tau=hp.tau, rho=hp.rho, alpha=hp.alpha,
                              sigma=hp.sigma, chunk=hp.chunk, generator=self.generator, loss_form=hp.loss_form)


def param_groups(head: nn.Module, weight_decay: float, loss_form: str) -> tuple[list[dict], list]:
    """(optimizer parameter groups, parameters to clip) of the HP head. paper: one group, all clipped.
    released (6): the projection head in its own group without weight decay, and not clipped."""
    trainable = [p for p in head.parameters() if p.requires_grad]
    if loss_form != "released":
        return [{"params": trainable, "weight_decay": weight_decay}], trainable
    proj = {id(p) for p in head.proj.parameters()}
    rest = [p for p in trainable if id(p) not in proj]
    return ([{"params": rest, "weight_decay": weight_decay},
             {"params": [p for p in trainable if id(p) in proj], "weight_decay": 0.0}], rest)


class HPTrainer:
    def __init__(self, cfg, seg, ctx: TrainContext):
        self.cfg, self.seg, self.shared = cfg, seg, ctx.shared
        self.rank, self.world, self.device = ctx.rank, ctx.world, ctx.device
        self.total_steps, self.pool_plan = max(ctx.total_steps, 1), ctx.plan["pool"]
        self.generator = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 1000 + ctx.rank)
        self.loss_module = ctx.wrap_model(_HPLoss(seg.head, cfg, self.generator))
        groups, self.clip_params = param_groups(seg.head, cfg.train.weight_decay, cfg.hp.loss_form)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr)
        self.steps_per_epoch = max(self.total_steps // cfg.train.epochs, 1)
        self.q_ag: torch.Tensor | None = None
        self.q_sp: torch.Tensor | None = None
        self.sp_version = 0
        self.pool_build_s = 0.0
        self.timers: dict[str, float] = defaultdict(float)
        self.precision, self.scaler = ctx.precision, ctx.precision.scaler()
        self.upload = Uploader(ctx.device)

    def state_dict(self) -> dict:
        return optimizer_state(self.optimizer, self.generator, self.scaler)

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(state, self.optimizer, self.generator, self.cfg.train.lr, self.scaler)

    def before_checkpoint(self, progress: dict) -> None:
        """Nothing: the pools are in the shared state, which every checkpoint holds."""

    # ---------------------------------------------------------- shared pools

    @torch.no_grad()
    def setup(self, get_shard) -> None:
        """Build Q_ag once (all workers contribute, from their ``get_shard("pool")``), then fetch it."""
        self.pool_shard = get_shard("pool")
        t0 = time.perf_counter()
        if self.shared.version("pool") == 0:
            index, rows = self._pool_patches(lambda entry, grid: entry[1])
            if self.cfg.hp.loss_form == "released":
                with self._pool_rng(0):
                    rows = self.seg.head.released_pool_rows(rows, None)[0]  # released (5)
            self.shared.put_part("pool", 1, self.rank, index, rows.cpu().numpy())
        _, table = self.shared.get("pool", 1, self.rank)
        self.q_ag = torch.from_numpy(table).to(self.device)
        self.pool_build_s = time.perf_counter() - t0
        if self.rank == 0:
            print(f"[hp] task-agnostic pool: {len(table)} patches from {len(table)} images", flush=True)

    @torch.no_grad()
    def _pool_patches(self, pick) -> tuple[np.ndarray, torch.Tensor]:
        """Backbone features of one patch of each image of this worker's pool shard: (pool indices [m],
        fp32 rows [m, C]); ``pick((k, plan patch), grid)`` gives image k's patch among its ``grid`` patches."""
        index, rows = [], []
        for batch in self.pool_shard.iter_batches(batch_size=self.cfg.eval.batch_size, batch_format="numpy"):
            batch, _ = valid_rows(batch)
            if len(batch["image"]) == 0:
                continue
            with self.precision.autocast():
                feats = self.seg.backbone(normalize(self.upload(batch["image"]))).features
            flat = feats.flatten(2).transpose(1, 2).float()  # (B, h*w, C)
            for b, path in enumerate(batch["path"]):
                entry = self.pool_plan[str(path)]
                index.append(entry[0])
                rows.append(flat[b, pick(entry, flat.shape[1])])
        dim = self.seg.backbone.dim
        return (np.asarray(index, dtype=np.int64),
                torch.stack(rows) if rows else torch.zeros((0, dim), device=self.device))

    @contextmanager
    def _pool_rng(self, version: int):
        """A forked global generator seeded from (train.seed, version, rank): the released pools' dropout."""
        cuda = torch.device(self.device).type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            seed = np.random.SeedSequence([self.cfg.train.seed, version, self.rank]).generate_state(1)[0]
            torch.manual_seed(int(seed))
            yield

    def before_epoch(self, get_shard, epoch: int) -> None:
        """Only the timers restart: HP's pools are renewed by step count, inside the epoch."""
        self.timers.clear()

    def epoch_stats(self) -> dict[str, float]:
        return {"time_pool_build_s": self.pool_build_s}

    @torch.no_grad()
    def _refresh_sp(self, step: int) -> None:
        """Q_sp version step // N + 1 (released: :func:`released_sp_version`): contribute this rank's rows
        if it is not published yet, then fetch."""
        hp = self.cfg.hp
        if hp.loss_form == "released":
            needed = released_sp_version(step, self.steps_per_epoch, hp.renew_every)
        else:
            needed = step // hp.renew_every + 1
        if self.sp_version >= needed:
            return
        t0 = time.perf_counter()
        if self.shared.version("sp") < needed:
            if hp.loss_form == "released":  # released (5): a new random patch of each pool image
                u = np.random.default_rng([self.cfg.train.seed, needed]).random(len(self.q_ag))
                index, feats = self._pool_patches(lambda entry, grid: int(u[entry[0]] * grid))
                with self._pool_rng(needed), exact_fp32():
                    codes = self.seg.head.released_pool_rows(None, feats)[1].cpu().numpy()
            else:
                index = np.arange(self.rank, len(self.q_ag), self.world)
                pool = self.q_ag[torch.from_numpy(index).to(self.device)][:, :, None, None]
                with exact_fp32():  # the pool the task-specific positives are selected against
                    codes = self.seg.head.ema_codes(pool.float())[:, :, 0, 0].cpu().numpy()
            self.shared.put_part("sp", needed, self.rank, index, codes)
        self.sp_version, table = self.shared.get("sp", needed, self.rank)
        self.q_sp = torch.from_numpy(table).to(self.device)
        self.timers["bank"] += time.perf_counter() - t0

    # ---------------------------------------------------------- training

    def _float_images(self, images: np.ndarray) -> torch.Tensor:
        return self.upload(images).permute(0, 3, 1, 2).float().div_(255)

    def train_step(self, batch: dict, step: int) -> dict[str, float]:
        """One iteration on this worker's batch (``image`` uint8 (B, S, S, 3)); may be empty (all rows invalid)."""
        images = batch["image"]
        weight = 1.0
        if len(images) == 0:  # keep DDP in step with the other workers; contributes nothing
            images, weight = np.zeros((1, self.cfg.data.image_size, self.cfg.data.image_size, 3), np.uint8), 0.0
        t0 = clock(self.device)
        x = self._float_images(images)
        with torch.no_grad(), self.precision.autocast():
            x_aug = photometric_augment(x, self.generator)
        return self.step_on(x, x_aug, step, weight, t0)

    def step_on(self, x: torch.Tensor, x_aug: torch.Tensor, step: int, weight: float = 1.0,
                t0: float | None = None) -> dict[str, float]:
        """The iteration after the photometric augmentation: images ``x`` and their augmented copy
        ``x_aug`` (float (B, 3, S, S) in [0, 1]) through the backbone, Q_sp, loss, optimiser and EMA.
        ``t0``: the clock when the iteration began (default now; the backbone timer starts there)."""
        hp, seg = self.cfg.hp, self.seg
        t0 = clock(self.device) if t0 is None else t0
        with torch.no_grad(), self.precision.autocast():
            out = seg.backbone(standardize(x), with_attention=hp.local)
            aug = seg.backbone(standardize(x_aug)).features
        t1 = clock(self.device)
        self._refresh_sp(step)
        t2 = clock(self.device)
        lam = (lambda_released if hp.loss_form == "released" else lambda_at)(step, hp.warmup, self.total_steps)
        with self.precision.autocast():
            loss, stats = self.loss_module(out.features, aug, out.attn_logits, self.q_ag, self.q_sp, lam)
        t3 = clock(self.device)
        if hp.loss_form == "released":
            ema_update(seg.head.ema_seg, seg.head.seg, hp.ema)  # released (7): the weights before the step
        optimizer_step(loss, self.optimizer, step, "train.lr", self.cfg.train.lr, weight=weight,
                       grad_clip=self.cfg.train.grad_clip, scaler=self.scaler, clip_params=self.clip_params)
        if hp.loss_form != "released":
            ema_update(seg.head.ema_seg, seg.head.seg, hp.ema)
        t4 = clock(self.device)
        self.timers["backbone"] += t1 - t0
        self.timers["selection"] += stats.pop("time_selection_s")
        self.timers["loss"] += stats.pop("time_loss_s")
        self.timers["head_forward"] += t3 - t2  # selection + contrastive + consistency
        self.timers["backward"] += t4 - t3  # backward, clipping, optimizer and EMA
        self.timers["step"] += t4 - t0
        stats["sp_version"] = self.sp_version
        return stats
