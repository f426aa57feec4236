"""STEGO's trainer: one worker's side of training (the maths is in :mod:`raysseg.methods.stego.core`).

Each row of the training dataset carries its image and a KNN partner (``partner``), read by the data
pipeline from the KNN table (:mod:`raysseg.engine.tables`, built once per split before training). The
frozen backbone embeds both; the head's codes of both and the random draws (points, permutations, from the
trainer's generator, saved in every checkpoint) go into :func:`raysseg.methods.stego.core.stego_loss`.
The head is optimised with AdamW (``train.weight_decay`` 0 in the STEGO configs: Adam, as released).
Nothing is shared between workers but the gradients (DDP).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn

from raysseg.core.backbones import standardize
from raysseg.core.device import Uploader, clock
from raysseg.core.distributed import optimizer_step
from raysseg.methods.base import TrainContext, load_optimizer_state, optimizer_state
from raysseg.methods.stego.core import random_partner, random_points, stego_loss


class _StegoLoss(nn.Module):
    """The head and the loss as one module, so DistributedDataParallel syncs the head's gradients."""

    def __init__(self, head: nn.Module, cfg, generator: torch.Generator):
        super().__init__()
        self.head, self.cfg, self.generator = head, cfg, generator

    def forward(self, feats: torch.Tensor, feats_knn: torch.Tensor):
        """Backbone features of the images and their partners (B, C, h, w) -> (total, {kind: loss})."""
        c = self.cfg.stego
        b, device = feats.shape[0], feats.device
        codes, codes_knn = self.head(feats), self.head(feats_knn)
        signal, signal_knn = self.head.dropout(feats), self.head.dropout(feats_knn)  # the loss's own dropout
        coords1 = random_points(b, c.points, self.generator, device)
        coords2 = random_points(b, c.points, self.generator, device)
        partners = [random_partner(b, self.generator, device) for _ in range(c.n_random)]
        return stego_loss(signal, signal_knn, codes, codes_knn, coords1, coords2, partners,
                          shifts={"self": c.shift_self, "knn": c.shift_knn, "random": c.shift_random},
                          weights={"self": c.weight_self, "knn": c.weight_knn, "random": c.weight_random},
                          pointwise=c.pointwise, zero_clamp=c.zero_clamp)


class StegoTrainer:
    def __init__(self, cfg, seg, ctx: TrainContext):
        self.cfg, self.seg, self.device = cfg, seg, ctx.device
        self.generator = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 1000 + ctx.rank)
        self.loss_module = ctx.wrap_model(_StegoLoss(seg.head, cfg, self.generator))
        params = [p for p in seg.head.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.timers: dict[str, float] = defaultdict(float)
        self.precision, self.scaler = ctx.precision, ctx.precision.scaler()
        self.upload = Uploader(ctx.device)

    def state_dict(self) -> dict:
        return optimizer_state(self.optimizer, self.generator, self.scaler)

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(state, self.optimizer, self.generator, self.cfg.train.lr, self.scaler)

    def setup(self, get_shard) -> None:
        """Nothing: the KNN table was built before training and the data pipeline reads the partners."""

    def before_epoch(self, get_shard, epoch: int) -> None:
        self.timers.clear()

    def epoch_stats(self) -> dict[str, float]:
        return {}

    def before_checkpoint(self, progress: dict) -> None:
        """Nothing: the trainer's state is its optimizer and generator."""

    def _float_images(self, images: np.ndarray) -> torch.Tensor:
        return self.upload(images).permute(0, 3, 1, 2).float().div_(255)

    def train_step(self, batch: dict, step: int) -> dict[str, float]:
        """One iteration on this worker's batch (``image`` and ``partner`` uint8 (B, S, S, 3)); may be empty."""
        images, partners = batch["image"], batch.get("partner")
        if partners is None:
            raise ValueError("stego: the training rows have no `partner` column; read them with the spec's datasets")
        weight = 1.0
        if len(images) == 0:  # keep DDP in step with the other workers; contributes nothing
            s = self.cfg.data.image_size
            images = partners = np.zeros((2, s, s, 3), np.uint8)
            weight = 0.0
        t0 = clock(self.device)
        x = self._float_images(np.concatenate([images, partners]))
        with torch.no_grad(), self.precision.autocast():
            feats = self.seg.backbone(standardize(x)).features
        t1 = clock(self.device)
        with self.precision.autocast():
            loss, parts = self.loss_module(*feats.float().chunk(2))
        t2 = clock(self.device)
        optimizer_step(loss, self.optimizer, step, "train.lr", self.cfg.train.lr, weight=weight,
                       grad_clip=self.cfg.train.grad_clip, scaler=self.scaler)
        t3 = clock(self.device)
        self.timers["backbone"] += t1 - t0
        self.timers["loss"] += t2 - t1
        self.timers["backward"] += t3 - t2
        self.timers["step"] += t3 - t0
        return {"loss_total": float(loss.detach()), **{f"loss_{k}": float(v.detach()) for k, v in parts.items()}}
