"""PiCIE and PGG + CAE: one worker's side of training (the maths is in :mod:`raysseg.methods.picie.core`).

Before every epoch, offline clustering (PiCIE's "cluster, then train against frozen
centroids"):

1. Every worker takes a frozen snapshot of the model (identical on all ranks: DDP keeps
   the weights equal and the BatchNorm buffers are broadcast from rank 0 first) and
   embeds two photometric views of each image of its shard of the training split. It
   samples ``kmeans.pixels_per_image`` locations per image and view, stores them as blocks
   (the Ray object store under Ray) and hands the references to rank 0 through the shared state.
2. Rank 0 clusters each view separately with the shared state's k-means
   (:func:`raysseg.core.kmeans.blockwise_kmeans`: on ``kmeans.init_sample`` features, then every
   stored feature assigned block by block, in parallel Ray tasks under Ray, for
   ``kmeans.assign_passes`` Lloyd passes). It publishes both centroid sets as the shared
   table ``centroids``, version ``epoch + 1``.
3. Every worker waits for that version, so all of them train against identical centroids
   (the bank's trace records a checksum per rank and version).

Pixel labels are never written anywhere. Each worker recomputes the labels of exactly the
views in its batch from the snapshot and the centroids (one extra forward without
gradients). These are the labels the released code writes to one file per image each
epoch (same weights, same centroids), but with no per-image storage (millions of images
times two views), and the augmentation stays fresh every epoch.

PGG's image-level pseudo labels are computed once, before the first epoch: pooled
features of the backbone as loaded (the self-supervised model) for 6 views of every image,
k-means into ``pgg.global_clusters``, active selection of the ``pgg.keep_fraction`` views
closest to their centre. They live in the bank (table ``pgg_labels``) and in every
checkpoint, so a resumed run uses the same labels.
"""
from __future__ import annotations

import copy
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysseg.core.augment import crop_resize, photometric_augment, random_boxes
from raysseg.core.backbones import standardize
from raysseg.core.batches import valid_rows
from raysseg.core.device import Uploader, as_input, clock
from raysseg.core.distributed import broadcast_buffers, optimizer_step
from raysseg.core.kmeans import sample_locations, spherical_kmeans
from raysseg.methods.base import (TrainContext, load_optimizer_state, make_optimizer, optimizer_state, scheduled_lr,
                                  set_lr)
from raysseg.methods.picie.core import PYRAMID_BOXES, active_selection, assign_labels, guidance_loss, picie_loss


class _Net(nn.Module):
    """The trained part as one module, so DistributedDataParallel sees every parameter in ``forward``."""

    def __init__(self, seg):
        super().__init__()
        self.seg = seg

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None):
        """x (2B, 3, S, S): view 1 then view 2 -> (embeddings (2B, D, h, w), view-2 global logits (B, V, G) or None)."""
        emb = self.seg.embed(x)
        logits = None
        if boxes is not None:
            logits = self.seg.head.global_logits(emb[len(x) // 2:], boxes)
        return emb, logits


class PiCIETrainer:
    def __init__(self, cfg, seg, ctx: TrainContext):
        self.cfg, self.seg, self.shared = cfg, seg, ctx.shared
        self.rank, self.world, self.device = ctx.rank, ctx.world, ctx.device
        self.total_steps = max(ctx.total_steps, 1)
        self.index = {path: i for i, path in enumerate(ctx.plan["files"])}
        self.generator = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 1000 + ctx.rank)
        self.net = ctx.wrap_model(_Net(seg))
        self.optimizer = make_optimizer(seg, cfg)
        self.guided = cfg.method == "pgg" and cfg.pgg.guidance != "none"
        self.boxes = (PYRAMID_BOXES if cfg.pgg.guidance == "pyramid" else PYRAMID_BOXES[:1]).to(ctx.device)
        self.pseudo: np.ndarray | None = None  # (N, V, 2): global label, kept
        self.snapshot = None
        self.centroids: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cluster_stats: dict[str, float] = {}
        self.timers: dict[str, float] = defaultdict(float)
        self.once: dict[str, float] = {}  # seconds of the work before the epoch's steps
        self.precision, self.scaler = ctx.precision, ctx.precision.scaler()
        self.upload = Uploader(ctx.device)

    def state_dict(self) -> dict:
        return optimizer_state(self.optimizer, self.generator, self.scaler)

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(state, self.optimizer, self.generator, self.cfg.train.lr, self.scaler)

    def before_checkpoint(self, progress: dict) -> None:
        """Nothing: the pseudo labels and centroids are in the shared state, which every checkpoint holds."""

    def _float(self, images: np.ndarray) -> torch.Tensor:
        x = self.upload(images).permute(0, 3, 1, 2).float().div_(255)
        return as_input(x, self.cfg.model.backbone)

    # ---------------------------------------------------------- PGG pseudo labels (once per run)

    @torch.no_grad()
    def setup(self, get_shard) -> None:
        """Build (or fetch the restored) image-level pseudo labels; a no-op for plain PiCIE."""
        if not self.guided:
            return
        shard = get_shard("cluster")
        t0 = time.perf_counter()
        if self.shared.version("pgg_labels") == 0:
            backbone = self.seg.backbone.eval()
            size = (self.cfg.data.image_size,) * 2
            index, feats = [], []
            for batch in shard.iter_batches(batch_size=self.cfg.eval.batch_size, batch_format="numpy"):
                batch, _ = valid_rows(batch)
                if len(batch["image"]) == 0:
                    continue
                x = self._float(batch["image"])
                with self.precision.autocast():
                    views = [backbone.pooled(standardize(crop_resize(x, box.expand(len(x), 4), size)))
                             for box in self.boxes]
                feats.append(F.normalize(torch.stack(views, 1).float(), dim=-1).cpu().numpy())  # (B, V, C)
                index += [self.index[str(p)] for p in batch["path"]]
            dim, v = backbone.pooled_dim, len(self.boxes)
            part = (np.asarray(index, np.int64), np.concatenate(feats) if feats else np.zeros((0, v, dim), np.float32))
            part_ref = self.shared.put_block(part)  # stays alive (owned here) until the labels are published
            self.shared.share("pgg_feats", self.rank, [part_ref])  # nested: Ray passes the ref, not the value
            if self.rank == 0:
                parts = self.shared.get_blocks([refs[0] for refs in self.shared.collect("pgg_feats")])
                idx = np.concatenate([p[0] for p in parts])
                x = np.concatenate([p[1] for p in parts])  # (n, V, C), rows of images idx
                flat = x.reshape(-1, x.shape[-1])
                k = self.cfg.pgg.global_clusters
                centres = spherical_kmeans(flat, k, self.cfg.kmeans.iterations, seed=self.cfg.train.seed)
                sims = flat @ centres.T
                labels = sims.argmax(1)
                keep = active_selection(torch.from_numpy(1 - sims.max(1)), self.cfg.pgg.keep_fraction).numpy()
                # one row per training file; an image no worker read (unreadable, or dropped by the
                # equal split of an odd count) keeps no view, so it gets no image-level loss
                table = np.zeros((len(self.index), v, 2), np.int64)
                table[idx] = np.stack([labels, keep.astype(np.int64)], 1).reshape(x.shape[0], v, 2)
                self.shared.publish("pgg_labels", 1, table)
                print(f"[pgg] pseudo labels: {x.shape[0]} images x {v} views -> {k} global clusters, "
                      f"{int(keep.sum())} views kept, {len(np.unique(labels[keep]))} clusters used", flush=True)
        _, self.pseudo = self.shared.get("pgg_labels", 1, self.rank)
        self.once["pseudo_labels"] = time.perf_counter() - t0

    # ---------------------------------------------------------- offline clustering (every epoch)

    @torch.no_grad()
    def before_epoch(self, get_shard, epoch: int) -> None:
        """Snapshot the model, cluster both views' embeddings, fetch the centroids of this epoch."""
        shard = get_shard("cluster")
        self.timers.clear()
        t0 = time.perf_counter()
        broadcast_buffers(self.seg)  # BatchNorm statistics drift apart after the last step: snapshots must be equal
        self.snapshot = copy.deepcopy(self.seg).eval()
        for p in self.snapshot.parameters():
            p.requires_grad_(False)
        version = epoch + 1
        if self.shared.version("centroids") < version:
            rng = np.random.default_rng(self.cfg.train.seed * 7919 + epoch * 31 + self.rank)
            samples: tuple[list, list] = ([], [])
            for batch in shard.iter_batches(batch_size=self.cfg.eval.batch_size, batch_format="numpy"):
                batch, _ = valid_rows(batch)
                if len(batch["image"]) == 0:
                    continue
                x = self._float(batch["image"])
                for view in (0, 1):
                    with self.precision.autocast():
                        z = self.snapshot.embed(photometric_augment(x, self.generator))
                    z = F.normalize(z.float(), dim=1)
                    samples[view].append(sample_locations(z.cpu().numpy(), self.cfg.kmeans.pixels_per_image, rng))
            refs = [[self.shared.put_block(np.concatenate(s))] if s else [] for s in samples]
            self.shared.share(f"features-{version}", self.rank, refs)
            t1 = time.perf_counter()
            if self.rank == 0:
                shared = self.shared.collect(f"features-{version}")
                km = self.cfg.kmeans
                results = [
                    self.shared.kmeans(sum((r[view] for r in shared), []), self.cfg.n_clusters,
                                       init_sample=km.init_sample, assign_passes=km.assign_passes,
                                       iterations=km.iterations, redo=km.redo, seed=self.cfg.train.seed + epoch)
                    for view in (0, 1)
                ]
                self.shared.publish("centroids", version, np.stack([r.centroids for r in results]))
                stats = {"cluster_points": results[0].n_points, "cluster_mean_cosine": results[0].mean_cosine,
                         "cluster_empty": int((results[0].counts == 0).sum()),
                         "time_cluster_init_s": sum(r.time_init_s for r in results),
                         "time_cluster_assign_s": sum(r.time_assign_s for r in results)}
                print(f"[{self.cfg.method}] epoch {version} clustering: {results[0].n_points} features per view, "
                      f"mean cosine {results[0].mean_cosine:.3f}, {stats['cluster_empty']} empty clusters", flush=True)
                self.cluster_stats = stats
            self.once["extract"] = t1 - t0
        _, table = self.shared.get("centroids", version, self.rank)
        cents = torch.from_numpy(table).to(self.device)
        self.centroids = (cents[0], cents[1])
        self.once["cluster_total"] = time.perf_counter() - t0
        self.seg.train()

    # ---------------------------------------------------------- training

    def train_step(self, batch: dict, step: int) -> dict[str, float]:
        """One iteration on this worker's batch (``image`` uint8 (B, S, S, 3) and ``path``; may be empty:
        all rows invalid)."""
        images, paths = batch["image"], batch["path"]
        weight = 1.0
        if len(images) == 0:  # keep DDP in step with the other workers; contributes nothing
            images, paths, weight = np.zeros((1, *([self.cfg.data.image_size] * 2), 3), np.uint8), None, 0.0
        t0 = clock(self.device)
        g = self.generator
        x = self._float(images)
        b, size = len(x), x.shape[-2:]
        boxes = random_boxes(b, g, scale=(self.cfg.data.crop_scale_min, 1.0))
        flips = torch.rand(b, generator=g, device=g.device).cpu() < 0.5
        view1 = crop_resize(photometric_augment(x, g), boxes, tuple(size), flips)  # crop/flip the image
        view2 = photometric_augment(x, g)  # crop/flip its features (equivariance)
        both = torch.cat([view1, view2])
        c1, c2 = self.centroids
        with torch.no_grad():
            with self.precision.autocast():
                snap = self.snapshot.embed(both).float()
            grid = tuple(snap.shape[-2:])
            y1 = assign_labels(F.normalize(snap[:b], dim=1), c1)
            y2 = assign_labels(F.normalize(crop_resize(snap[b:], boxes, grid, flips), dim=1), c2)
        t1 = clock(self.device)
        with self.precision.autocast():
            loss, stats, logits = self._loss(both, b, boxes, flips, grid, y1, y2)
        if self.guided:
            if paths is None:
                labels = torch.zeros(logits.shape[:2], dtype=torch.long, device=self.device)
                keep = torch.zeros_like(labels, dtype=torch.bool)
            else:
                rows = torch.from_numpy(self.pseudo[[self.index[str(p)] for p in paths]]).to(self.device)
                labels, keep = rows[..., 0], rows[..., 1].bool()
            g_loss = guidance_loss(logits.float(), labels, keep)
            loss = loss + self.cfg.pgg.weight * g_loss
            stats["loss_global"] = g_loss.item()
            stats["global_views_kept"] = float(keep.float().mean())
        t2 = clock(self.device)
        set_lr(self.optimizer, scheduled_lr(self.cfg, step, self.total_steps))
        optimizer_step(loss, self.optimizer, step, "train.lr", self.cfg.train.lr, weight=weight,
                       grad_clip=self.cfg.train.grad_clip, scaler=self.scaler)
        t3 = clock(self.device)
        stats["loss_total"] = loss.item()
        self.timers["labels"] += t1 - t0
        self.timers["forward_loss"] += t2 - t1
        self.timers["backward"] += t3 - t2
        self.timers["step"] += t3 - t0
        return stats

    def _loss(self, both, b, boxes, flips, grid, y1, y2):
        """(PiCIE loss, its stats, view 2's global logits or None) of the trained network on both views."""
        c1, c2 = self.centroids
        emb, logits = self.net(both, self.boxes if self.guided else None)
        z1 = F.normalize(emb[:b], dim=1)
        z2 = F.normalize(crop_resize(emb[b:], boxes, grid, flips), dim=1)
        loss, stats = picie_loss(z1, z2, c1, c2, y1, y2)
        return loss, stats, logits

    def epoch_stats(self) -> dict[str, float]:
        stats = {**self.cluster_stats, **{f"time_{k}_s": v for k, v in self.once.items()}}
        self.once = {}
        self.snapshot = None
        return stats
