"""PiCIE and PGG + CAE training on one Ray Train worker (the maths is in :mod:`picie_core`).

Before every epoch, offline clustering (PiCIE's "cluster, then train against frozen
centroids"):

1. Every worker takes a frozen snapshot of the model (identical on all ranks: DDP keeps
   the weights equal and the BatchNorm buffers are broadcast from rank 0 first) and
   embeds two photometric views of each image of its shard of the training split. It
   samples ``kmeans.pixels_per_image`` locations per image and view, puts them into the
   Ray object store as blocks and hands the references to rank 0 through the bank.
2. Rank 0 clusters each view separately with :func:`raysseg.core.kmeans.kmeans_ray`: faiss
   on ``kmeans.init_sample`` features, then every stored feature assigned in parallel Ray
   tasks (``kmeans.assign_passes`` Lloyd passes). It publishes both centroid sets as the
   bank table ``centroids``, version ``epoch + 1``.
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
import resource
import time
from collections import defaultdict

import numpy as np
import ray
import torch
import torch.nn.functional as F
from torch import nn

from raysseg.core.backbones import standardize
from raysseg.config import Config
from raysseg.core.augment import crop_resize, photometric_augment, random_boxes
from raysseg.io.images import valid_rows
from raysseg.methods.picie.core import PYRAMID_BOXES, active_selection, assign_labels, guidance_loss, picie_loss
from raysseg.methods.base import ResumableTrainer


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


class PiCIETrainer(ResumableTrainer):
    def __init__(self, cfg: Config, seg, bank, rank: int, world: int, device, total_steps: int, files: list[str]):
        import ray.train.torch

        self.cfg, self.seg, self.bank = cfg, seg, bank
        self.rank, self.world, self.device = rank, world, device
        self.total_steps = max(total_steps, 1)
        self.index = {path: i for i, path in enumerate(files)}
        self.generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank)
        self.net = ray.train.torch.prepare_model(_Net(seg))
        params = [p for p in seg.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.guided = cfg.method == "pgg" and cfg.pgg.guidance != "none"
        self.boxes = (PYRAMID_BOXES if cfg.pgg.guidance == "pyramid" else PYRAMID_BOXES[:1]).to(device)
        self.pseudo: np.ndarray | None = None  # (N, V, 2): global label, kept
        self.snapshot = None
        self.centroids: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cluster_stats: dict[str, float] = {}
        self.timers: dict[str, float] = defaultdict(float)


    def _float(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div_(255)

    # ---------------------------------------------------------- PGG pseudo labels (once per run)

    @torch.no_grad()
    def setup(self, get_shard) -> None:
        """Build (or fetch the restored) image-level pseudo labels; a no-op for plain PiCIE."""
        if not self.guided:
            return
        shard = get_shard("cluster")
        from raysseg.core.kmeans import spherical_kmeans

        t0 = time.perf_counter()
        if ray.get(self.bank.version.remote("pgg_labels")) == 0:
            backbone = self.seg.backbone.eval()
            size = (self.cfg.data.image_size,) * 2
            index, feats = [], []
            for batch in shard.iter_batches(batch_size=self.cfg.eval.batch_size, batch_format="numpy"):
                batch, _ = valid_rows(batch)
                if len(batch["image"]) == 0:
                    continue
                x = self._float(batch["image"])
                views = [backbone.pooled(standardize(crop_resize(x, box.expand(len(x), 4), size)))
                         for box in self.boxes]
                feats.append(F.normalize(torch.stack(views, 1), dim=-1).cpu().numpy())  # (B, V, C)
                index += [self.index[str(p)] for p in batch["path"]]
            dim, v = backbone.pooled_dim, len(self.boxes)
            part = (np.asarray(index, np.int64), np.concatenate(feats) if feats else np.zeros((0, v, dim), np.float32))
            part_ref = ray.put(part)  # stays alive (owned here) until the labels are published
            self.bank.share.remote("pgg_feats", self.rank, [part_ref])  # nested: Ray passes the ref, not the value
            if self.rank == 0:
                parts = ray.get([refs[0] for refs in ray.get(self.bank.collect.remote("pgg_feats"))])
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
                self.bank.publish.remote("pgg_labels", 1, table)
                print(f"[pgg] pseudo labels: {x.shape[0]} images x {v} views -> {k} global clusters, "
                      f"{int(keep.sum())} views kept, {len(np.unique(labels[keep]))} clusters used", flush=True)
        _, self.pseudo = ray.get(self.bank.get.remote("pgg_labels", 1, self.rank))
        self.timers["pseudo_labels"] = time.perf_counter() - t0

    # ---------------------------------------------------------- offline clustering (every epoch)

    def _sync_buffers(self) -> None:
        """BatchNorm statistics drift apart after the last step; take rank 0's so snapshots are identical."""
        from raysseg.runtime.driver import _dist

        dist = _dist()
        if dist is not None:
            for buf in self.seg.buffers():
                dist.broadcast(buf, 0)

    @torch.no_grad()
    def before_epoch(self, get_shard, epoch: int) -> None:
        """Snapshot the model, cluster both views' embeddings on Ray, fetch the centroids of this epoch."""
        shard = get_shard("cluster")
        from raysseg.core.kmeans import kmeans_ray, sample_locations

        t0 = time.perf_counter()
        self._sync_buffers()
        self.snapshot = copy.deepcopy(self.seg).eval()
        for p in self.snapshot.parameters():
            p.requires_grad_(False)
        version = epoch + 1
        if ray.get(self.bank.version.remote("centroids")) < version:
            rng = np.random.default_rng(self.cfg.train.seed * 7919 + epoch * 31 + self.rank)
            samples: tuple[list, list] = ([], [])
            for batch in shard.iter_batches(batch_size=self.cfg.eval.batch_size, batch_format="numpy"):
                batch, _ = valid_rows(batch)
                if len(batch["image"]) == 0:
                    continue
                x = self._float(batch["image"])
                for view in (0, 1):
                    z = F.normalize(self.snapshot.embed(photometric_augment(x, self.generator)), dim=1)
                    samples[view].append(sample_locations(z.cpu().numpy(), self.cfg.kmeans.pixels_per_image, rng))
            refs = [[ray.put(np.concatenate(s))] if s else [] for s in samples]
            self.bank.share.remote(f"features-{version}", self.rank, refs)
            t1 = time.perf_counter()
            if self.rank == 0:
                shared = ray.get(self.bank.collect.remote(f"features-{version}"))
                km = self.cfg.kmeans
                results = [
                    kmeans_ray(sum((r[view] for r in shared), []), self.cfg.n_clusters, init_sample=km.init_sample,
                               assign_passes=km.assign_passes, iterations=km.iterations, redo=km.redo,
                               seed=self.cfg.train.seed + epoch)
                    for view in (0, 1)
                ]
                self.bank.publish.remote("centroids", version, np.stack([r.centroids for r in results]))
                stats = {"cluster_points": results[0].n_points, "cluster_mean_cosine": results[0].mean_cosine,
                         "cluster_empty": int((results[0].counts == 0).sum()),
                         "time_cluster_init_s": sum(r.time_init_s for r in results),
                         "time_cluster_assign_s": sum(r.time_assign_s for r in results)}
                print(f"[{self.cfg.method}] epoch {version} clustering: {results[0].n_points} features per view, "
                      f"mean cosine {results[0].mean_cosine:.3f}, {stats['cluster_empty']} empty clusters", flush=True)
                self.cluster_stats = stats
            self.timers["extract"] = t1 - t0
        _, table = ray.get(self.bank.get.remote("centroids", version, self.rank))
        cents = torch.from_numpy(table).to(self.device)
        self.centroids = (cents[0], cents[1])
        self.timers["cluster_total"] = time.perf_counter() - t0

    # ---------------------------------------------------------- training

    def train_step(self, images: np.ndarray, paths, step: int) -> dict[str, float]:
        """One iteration on this worker's batch (uint8 (B, S, S, 3), may be empty: all rows invalid)."""
        from raysseg.runtime.driver import optimizer_step

        weight = 1.0
        if len(images) == 0:  # keep DDP in step with the other workers; contributes nothing
            images, paths, weight = np.zeros((1, *([self.cfg.data.image_size] * 2), 3), np.uint8), None, 0.0
        t0 = time.perf_counter()
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
            snap = self.snapshot.embed(both)
            grid = tuple(snap.shape[-2:])
            y1 = assign_labels(F.normalize(snap[:b], dim=1), c1)
            y2 = assign_labels(F.normalize(crop_resize(snap[b:], boxes, grid, flips), dim=1), c2)
        t1 = time.perf_counter()
        emb, logits = self.net(both, self.boxes if self.guided else None)
        z1 = F.normalize(emb[:b], dim=1)
        z2 = F.normalize(crop_resize(emb[b:], boxes, grid, flips), dim=1)
        loss, stats = picie_loss(z1, z2, c1, c2, y1, y2)
        if self.guided:
            if paths is None:
                labels = torch.zeros(logits.shape[:2], dtype=torch.long, device=self.device)
                keep = torch.zeros_like(labels, dtype=torch.bool)
            else:
                rows = torch.from_numpy(self.pseudo[[self.index[str(p)] for p in paths]]).to(self.device)
                labels, keep = rows[..., 0], rows[..., 1].bool()
            g_loss = guidance_loss(logits, labels, keep)
            loss = loss + self.cfg.pgg.weight * g_loss
            stats["loss_global"] = g_loss.item()
            stats["global_views_kept"] = float(keep.float().mean())
        t2 = time.perf_counter()
        optimizer_step(loss, self.optimizer, step, "train.lr", self.cfg.train.lr, weight=weight,
                       grad_clip=self.cfg.train.grad_clip)
        t3 = time.perf_counter()
        stats["loss_total"] = loss.item()
        self.timers["labels"] += t1 - t0
        self.timers["forward_loss"] += t2 - t1
        self.timers["backward"] += t3 - t2
        self.timers["step"] += t3 - t0
        return stats

    def train_epoch(self, shard, epoch: int, progress: dict, logger, checkpoint=None):
        """One pass over this worker's shard. Returns (epoch stats, last images, skipped files)."""
        from raysseg.runtime.driver import run_epoch

        cfg = self.cfg
        once = {k: self.timers.pop(k) for k in ("pseudo_labels", "extract", "cluster_total") if k in self.timers}
        self.seg.train()
        stats, last, skipped = run_epoch(
            shard, lambda batch, step: self.train_step(batch["image"], batch["path"], step), cfg, self.rank,
            progress, logger, self.total_steps // cfg.train.epochs,
            f"{cfg.method} epoch {epoch + 1}/{cfg.train.epochs}", self.timers, checkpoint)
        stats.update(self.cluster_stats)
        stats.update({f"time_{k}_s": v for k, v in once.items()})
        stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.timers.clear()
        self.snapshot = None
        return stats, last, skipped
