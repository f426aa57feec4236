"""MoCo v2: one worker's side of backbone pretraining (the maths is in :mod:`raysseg.methods.moco.core`)."""
from __future__ import annotations

import math

import numpy as np
import torch

from raysseg.core.device import Uploader, as_input
from raysseg.core.distributed import gather_tensor, optimizer_step, process_group
from raysseg.methods.base import TrainContext
from raysseg.methods.moco.core import dense_info_nce, moco_logits, two_crops, view_correspondence

SGD_MOMENTUM = 0.9


def build_moco(cfg, device, read_bytes=None):
    """``cfg``'s MoCo v2 model on ``device`` in training mode: the backbone (``model.weights`` when set,
    read with ``read_bytes``; an FPN on ResNets), projector, key encoder and queue."""
    from raysseg.core.backbones import build_backbone
    from raysseg.core.device import prepare_model
    from raysseg.methods.moco.core import MoCo

    pc = cfg.pretrain
    resnet = not cfg.model.backbone.startswith("vit")
    backbone = build_backbone(cfg.model.backbone, weights=cfg.model.weights or None, frozen=False,
                              fpn_dim=cfg.model.fpn_dim if resnet else None, read_bytes=read_bytes)
    moco = MoCo(backbone, pc.proj_dim, pc.queue, pc.momentum, pc.temperature, seed=cfg.train.seed,
                dense_weight=pc.dense_weight).to(device)
    prepare_model(moco, device, cfg.model.backbone, compile_model=False)
    return moco.train()


def crop_size(cfg) -> int:
    return cfg.pretrain.crop_size or cfg.data.image_size


def cosine_lr(base: float, step: int, total: int) -> float:
    """base * (1 + cos(pi * step / total)) / 2."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


class MoCoTrainer:
    """One worker's MoCo v2 optimisation: views, query/key encoding, loss, SGD, EMA, queue.

    ``query`` is ``moco.encoder_q`` made data-parallel by ``ctx.wrap_model``. Works without a process group
    (one worker, or a unit test): then there is no key shuffle and nothing to gather."""

    def __init__(self, cfg, moco, ctx: TrainContext):
        self.cfg, self.moco, self.query, self.device = cfg, moco, ctx.wrap_model(moco.encoder_q), ctx.device
        self.rank, self.world, self.total_steps = ctx.rank, ctx.world, max(ctx.total_steps, 1)
        params = [p for p in moco.encoder_q.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.pretrain.lr, momentum=SGD_MOMENTUM,
                                         weight_decay=cfg.pretrain.weight_decay)
        self.generator = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 1000 + ctx.rank)
        self.size = crop_size(cfg)
        self.scale = (cfg.pretrain.crop_scale_min, 1.0)
        self.precision, self.scaler = ctx.precision, ctx.precision.scaler()
        self.upload = Uploader(ctx.device)

    def state_dict(self) -> dict:
        state = {"moco": self.moco.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.moco.load_state_dict(state["moco"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @torch.no_grad()
    def _keys(self, x_k: torch.Tensor, points: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every rank's keys in rank order, shuffle-BN when W > 1: [global keys (W*B, P)] and, given this
        rank's key-view points (B, M, 2), [..., dense keys at them (W*B, M, P)]."""
        dist = process_group()
        encoder = self.moco.encoder_k
        if dist is None or self.world == 1:
            out = encoder(x_k, points)
            return list(out) if points is not None else [out]
        everything = gather_tensor(x_k)  # (W*B, 3, S, S)
        perm = torch.randperm(everything.shape[0], generator=self.generator, device=self.generator.device)
        perm = perm.to(x_k.device)
        dist.broadcast(perm, src=0)  # rank 0's permutation for everyone
        b = x_k.shape[0]
        mine = perm[self.rank * b:(self.rank + 1) * b]
        if points is None:
            outs = [encoder(everything[mine])]
        else:
            outs = list(encoder(everything[mine], gather_tensor(points)[mine]))
        keys = []
        for out in outs:
            shuffled = gather_tensor(out)  # row j: key of image perm[j]
            unshuffled = torch.empty_like(shuffled)
            unshuffled[perm] = shuffled
            keys.append(unshuffled)
        return keys

    def step(self, images: np.ndarray, weight: np.ndarray, step: int) -> dict[str, float]:
        """One iteration. images: uint8 (B, S, S, 3), B the same on every rank; weight: (B,) 1 for
        real rows, 0 for fillers (left out of the loss and the queue)."""
        lr = cosine_lr(self.cfg.pretrain.lr, step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        w = torch.from_numpy(np.asarray(weight, np.float32)).to(self.device)
        x_q, x_k, geometry = two_crops(self.upload(images), self.generator, self.size, self.scale)
        backbone, dense = self.cfg.model.backbone, self.moco.dense_weight > 0
        points_q, points_k, valid = view_correspondence(geometry, self.cfg.pretrain.dense_grid) if dense else (None,) * 3
        mine = slice(self.rank * len(w), (self.rank + 1) * len(w))
        with self.precision.autocast():
            out = self.query(as_input(x_q, backbone), points_q)
            q, q_dense = out if dense else (out, None)
            with torch.no_grad():
                self.moco.momentum_update()
                keys = self._keys(as_input(x_k, backbone), points_k)
                all_keys, k = keys[0], keys[0][mine]
                all_w = gather_tensor(w)
            per_row = self.moco.loss(q, k, reduction="none")
        loss = (per_row.float() * w).sum() / w.sum().clamp(min=1.0)
        stats = {}
        if dense:
            real_points = valid & (w[:, None] > 0)
            key_valid = gather_tensor(real_points.float()) > 0
            own = torch.arange(mine.start, mine.stop, device=self.device)
            dense_loss = dense_info_nce(q_dense, real_points, keys[1], key_valid, own, self.moco.temperature)
            loss = (1 - self.moco.dense_weight) * loss + self.moco.dense_weight * dense_loss
            stats = {"dense_loss": float(dense_loss), "dense_points": float(real_points.float().mean())}
        optimizer_step(loss, self.optimizer, step, "pretrain.lr", self.cfg.pretrain.lr, scaler=self.scaler)
        with torch.no_grad():
            logits = moco_logits(q.detach().float(), k.float(), self.moco.queue)
            real = w > 0
            n_real = max(int(real.sum()), 1)
            stats |= {
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
