"""SegSort and visual concepts: one worker's side of training (the maths is in :mod:`raysseg.methods.segsort.core`).

Each training row carries its image and its pseudo segments (oversegmentation computed when
the row is read). The worker crops and augments on the fly; segment maps follow the
same boxes and flips with nearest sampling, straight to the embedding grid.

Shared state goes through the context's shared state (the concept bank under Ray), one version
per global step ``t``:
- ``memory``: the segment prototypes of the last ``segsort.memory_batches`` global batches
  (a ring table: every rank appends its batch's prototypes to version t + 2 after step t;
  all ranks read version t + 1 at step t, so all see the same memory);
- ``concepts`` and ``cooccurrence`` (visual concepts only): the dictionary and its
  co-occurrence counts, a reduced state owned by the shared state. After step t each rank
  sends the statistics of its prototypes' assignments; the shared state applies one EMA
  update when every rank has sent, and publishes version t + 2.
Reading version t + 1 at step t blocks until every rank has finished step t - 1, which
DDP's gradient all-reduce already requires, so the wait is short.
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysseg.core.augment import crop_resize, photometric_augment, random_boxes
from raysseg.core.device import Uploader, as_input, clock
from raysseg.core.distributed import optimizer_step
from raysseg.core.segments import batch_segment_ids, flat_pixels, merge_small_segments, pixel_sort, segment_prototypes
from raysseg.methods.base import (TrainContext, load_optimizer_state, make_optimizer, optimizer_state, scheduled_lr,
                                  set_lr)
from raysseg.methods.segsort import core


class _Net(nn.Module):
    """The trained part as one module, so DistributedDataParallel sees every parameter in ``forward``."""

    def __init__(self, seg):
        super().__init__()
        self.seg = seg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.seg.embed(x), dim=1)


class SegmentTrainer:
    def __init__(self, cfg, seg, ctx: TrainContext):
        self.cfg, self.seg, self.shared = cfg, seg, ctx.shared
        self.rank, self.world, self.device = ctx.rank, ctx.world, ctx.device
        self.total_steps = max(ctx.total_steps, 1)
        self.concepts = cfg.method == "concepts"
        self.tables = ["memory", "concepts", "cooccurrence"] if self.concepts else ["memory"]
        self.generator = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 1000 + ctx.rank)
        self.net = ctx.wrap_model(_Net(seg))
        self.optimizer = make_optimizer(seg, cfg)
        self.timers: dict[str, float] = defaultdict(float)
        self.versions: dict[str, int] = {}
        self.used: set[int] = set()  # concepts assigned to some segment this epoch
        self.precision, self.scaler = ctx.precision, ctx.precision.scaler()
        self.upload = Uploader(ctx.device)

    def state_dict(self) -> dict:
        return optimizer_state(self.optimizer, self.generator, self.scaler)

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(state, self.optimizer, self.generator, self.cfg.train.lr, self.scaler)

    def setup(self, get_shard) -> None:
        """Rank 0 publishes version 1 of the shared tables (an empty memory, a random dictionary)
        unless they were restored from a checkpoint."""
        if self.rank == 0:
            dim = self.seg.code_dim
            self.shared.publish("memory", 1, np.zeros((0, dim), np.float32))
            if self.concepts:
                state = core.init_dictionary(self.cfg.concepts.n_concepts, dim, self.cfg.train.seed)
                self.shared.init_reduced(state, self.cfg.train.seed)

    def before_epoch(self, get_shard, epoch: int) -> None:
        """Fresh timers and concept counts: the shared tables change every step, inside the epoch."""
        self.seg.train()
        self.timers.clear()
        self.used = set()

    def epoch_stats(self) -> dict[str, float]:
        return {"concepts_used": float(len(self.used))} if self.concepts else {}

    def _views(self, x: torch.Tensor, pseudo: torch.Tensor, grid: tuple[int, int]):
        """A random crop + flip + photometric view of each image and its pseudo segments on ``grid``."""
        g = self.generator
        b = len(x)
        boxes = random_boxes(b, g, scale=(self.cfg.data.crop_scale_min, 1.0))
        flips = torch.rand(b, generator=g, device=g.device).cpu() < 0.5
        view = crop_resize(photometric_augment(x, g), boxes, tuple(x.shape[-2:]), flips)
        seg_ids = crop_resize(pseudo[:, None].float(), boxes, grid, flips, mode="nearest")[:, 0].long()
        return view, seg_ids

    def train_step(self, batch: dict, step: int) -> dict[str, float]:
        """One iteration on this worker's batch: ``image`` uint8 (B, S, S, 3), ``segments`` (B, S, S)."""
        cfg, ss = self.cfg, self.cfg.segsort
        images, pseudo = batch["image"], batch["segments"]
        weight = 1.0
        if len(images) == 0:  # keep DDP and the bank in step with the other workers; contributes nothing
            size = cfg.data.image_size
            images, pseudo, weight = np.zeros((1, size, size, 3), np.uint8), np.zeros((1, size, size), np.int32), 0.0
        t0 = clock(self.device)
        version = step + 1
        shared = self.shared.get_many(self.tables, version, self.rank)
        self.versions = {name: v for name, (v, _) in shared.items()}
        memory = torch.from_numpy(shared["memory"][1]).to(self.device)
        t1 = clock(self.device)

        x = self.upload(images).permute(0, 3, 1, 2).float().div_(255)
        pseudo_t = self.upload(np.asarray(pseudo, np.int64))
        b = len(x)
        grid = (cfg.data.image_size // self.seg.stride,) * 2
        n_views = 2 if self.concepts else 1
        views, maps = zip(*(self._views(x, pseudo_t, grid) for _ in range(n_views)))
        t2 = clock(self.device)
        with self.precision.autocast():  # the network; segments, prototypes and losses in fp32 below
            emb = self.net(as_input(torch.cat(views), cfg.model.backbone))  # (V*B, D, h, w)
        emb = emb.float()
        maps = torch.cat(maps)  # (V*B, h, w)
        e = flat_pixels(emb)
        if self.concepts:  # segments = pseudo segments per view; label = (image, pseudo segment) across views
            ids, image = batch_segment_ids(maps)
            image = image % b
        else:  # segments = pixel-sorting clusters within pseudo segments; label = own segment
            ids, _ = batch_segment_ids(pixel_sort(emb, cfg.segments.grid, cfg.segments.iterations), maps)
            ids, image = batch_segment_ids(merge_small_segments(ids, ss.min_cells))
        t3 = clock(self.device)
        ids = ids.reshape(-1)
        n_seg = int(ids.max()) + 1
        protos, _ = segment_prototypes(e, ids, n_seg)
        if self.concepts:
            stride = int(maps.max()) + 1
            pixel_label = (torch.arange(n_views * b, device=self.device) % b).repeat_interleave(grid[0] * grid[1])
            pixel_label = pixel_label * stride + maps.reshape(-1)
            proto_label = torch.zeros(n_seg, dtype=torch.long, device=self.device).scatter_(0, ids, pixel_label)
        else:
            pixel_label, proto_label = ids, torch.arange(n_seg, device=self.device)
        all_protos = torch.cat([protos, memory])
        all_labels = torch.cat([proto_label, torch.full((len(memory),), -1, dtype=torch.long, device=self.device)])
        local = core.segment_sort_loss(e, pixel_label, all_protos, all_labels, ss.kappa)
        stats = {"loss_local": local.item(), "segments_per_image": n_seg / (n_views * b),
                 "memory_prototypes": float(len(memory))}
        loss = local
        concept_stats = None
        if self.concepts:
            c = self.cfg.concepts
            dictionary = torch.from_numpy(shared["concepts"][1]).to(self.device)
            weights = core.cooccurrence_weights(torch.from_numpy(shared["cooccurrence"][1]).to(self.device))
            index = core.quantize(protos.detach(), dictionary)
            self.used.update(index.tolist())
            vq, commitment = core.vq_loss(protos, dictionary, index, c.beta)
            pixel_concept = index[ids]
            pull = core.concept_pull_loss(e, pixel_concept, dictionary)
            memory_concept = core.quantize(memory, dictionary)
            co = core.cooccurrence_loss(e, pixel_concept, all_protos, torch.cat([index, memory_concept]), weights,
                                        ss.kappa)
            on = float(step >= c.warmup)  # global and co-occurrence terms after the warm-up
            loss = c.lambda_s * local + on * (c.lambda_v * (vq + pull) + c.lambda_c * co)
            stats.update({"loss_vq": vq.item(), "vq_commitment": commitment.item(), "loss_concept_pull": pull.item(),
                          "loss_cooccurrence": co.item(), "concepts_in_batch": float(index.unique().numel()),
                          "dictionary_version": float(self.versions["concepts"])})
            if weight > 0:
                concept_stats = core.concept_statistics(protos.detach().cpu().numpy(), index.cpu().numpy(),
                                                        image.cpu().numpy(), c.n_concepts)
        t4 = clock(self.device)
        set_lr(self.optimizer, scheduled_lr(cfg, step, self.total_steps))
        optimizer_step(loss, self.optimizer, step, "train.lr", cfg.train.lr, weight=weight, grad_clip=cfg.train.grad_clip,
                       scaler=self.scaler)
        t5 = clock(self.device)

        rows = protos.detach().cpu().numpy() if weight > 0 else np.zeros((0, protos.shape[1]), np.float32)
        self.shared.append("memory", version + 1, self.rank, rows, ss.memory_batches)
        if self.concepts:
            if concept_stats is None:
                concept_stats = core.concept_statistics(rows, np.zeros(0, np.int64), np.zeros(0, np.int64),
                                                        self.cfg.concepts.n_concepts)
            self.shared.reduce(version + 1, self.rank, concept_stats,
                               functools.partial(core.update_dictionary, decay=self.cfg.concepts.decay,
                                                 restart_after=self.cfg.concepts.restart_after))
        stats["loss_total"] = loss.item()
        stats["bank_version"] = float(self.versions["memory"])
        self.timers["bank"] += t1 - t0
        self.timers["augment"] += t2 - t1
        self.timers["forward_segments"] += t3 - t2
        self.timers["loss"] += t4 - t3
        self.timers["backward"] += t5 - t4
        self.timers["step"] += time.perf_counter() - t0
        return stats

    def before_checkpoint(self, progress: dict) -> None:
        """Wait for the tables after the last step (a resumed run reads them from the checkpoint's bank
        state) and put the dictionary as of now into the model."""
        shared = self.shared.get_many(self.tables, progress["step"] + 1, self.rank)
        if self.concepts:
            self.seg.concepts.copy_(torch.from_numpy(shared["concepts"][1]).to(self.seg.concepts.device))
