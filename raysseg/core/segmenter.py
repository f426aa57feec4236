"""The segmenter every method produces.

A :class:`Segmenter` is a backbone, an optional method head and the k-means centroids
fitted on the training split. ``codes`` gives L2-normalised per-location embeddings;
clustering them against the centroids gives the unsupervised segmentation. The same
object is used by training, evaluation and ``predict``. It knows no method: the method's
spec gives the head (``raysseg.methods.registry.build_segmenter``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raysseg.core.backbones import build_backbone, standardize
from raysseg.core.device import as_input
from raysseg.core.geometry import feature_stride, input_multiple
from raysseg.core.precision import Precision, exact_fp32


class Segmenter(nn.Module):
    def __init__(self, cfg, head: Callable | None = None, buffers: Callable | None = None, stride: int | None = None,
                 load_backbone_weights: bool = True, read_bytes=None):
        """``head(cfg, backbone_dim)`` builds the module between backbone and codes (``embed(feats, rgb)``,
        ``code_dim``); ``buffers(cfg, code_dim)`` names extra tensors to carry, {name: shape};
        ``stride``: pixels per code cell (default: the backbone's); ``read_bytes`` reads ``model.weights``
        when it is not a local path."""
        super().__init__()
        self.cfg = cfg
        weights = cfg.model.weights or None if load_backbone_weights else None
        fpn_dim = cfg.model.fpn_dim if cfg.model.backbone.endswith("_fpn") else None
        self.backbone = build_backbone(cfg.model.backbone, weights=weights, frozen=cfg.model.frozen, fpn_dim=fpn_dim,
                                       read_bytes=read_bytes)
        if not cfg.model.frozen and cfg.train.trunk_lr_scale == 0:
            self.backbone.freeze_trunk()
        if not cfg.model.frozen and cfg.model.freeze_bn:
            self.backbone.freeze_batchnorm()
        self.head: nn.Module | None = head(cfg, self.backbone.dim) if head is not None else None
        self.code_dim = self.head.code_dim if self.head is not None else self.backbone.dim
        self.stride = stride or feature_stride(cfg.model.backbone)
        for name, shape in (buffers(cfg, self.code_dim) if buffers is not None else {}).items():
            self.register_buffer(name, torch.zeros(*shape))
        self.register_buffer("centroids", torch.zeros(cfg.n_clusters, self.code_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.precision = cfg.train.precision  # of inference (codes); assignments are exact fp32 always

    def param_groups(self, lr: float) -> list[dict]:
        """The trainable parameters for an optimiser: a trainable trunk at ``lr x train.trunk_lr_scale``,
        everything else (FPN, head) at ``lr``; each group keeps its ``lr_scale``."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        scale = self.cfg.train.trunk_lr_scale
        if scale == 1.0:  # one group, as checkpoints written before trunk_lr_scale have
            return [{"params": trainable, "lr": lr}]
        trunk = {id(p) for p in self.backbone.trunk_module().parameters()}
        groups = [{"params": [p for p in trainable if id(p) in trunk], "lr": lr * scale, "lr_scale": scale},
                  {"params": [p for p in trainable if id(p) not in trunk], "lr": lr, "lr_scale": 1.0}]
        return [g for g in groups if g["params"]]

    @property
    def input_multiple(self) -> int:
        """Image sides must be multiples of this (ResNet trunks downsample by 32)."""
        return input_multiple(self.cfg.model.backbone)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (B, 3, H, W) -> unnormalised embedding (B, D, H/stride, W/stride).

        Differentiable: the methods that train the backbone call it inside their step."""
        feats = self.backbone(standardize(x)).features
        return self.head.embed(feats, x) if self.head is not None else feats

    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> L2-normalised codes (B, D, H/stride, W/stride)."""
        x = images.to(self.centroids.device).permute(0, 3, 1, 2).float().div_(255.0)
        with Precision(self.precision, x.device.type).autocast():
            emb = self.embed(as_input(x, self.cfg.model.backbone))
        return F.normalize(emb.float(), dim=1)

    def cluster_logits(self, codes: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to each centroid: codes (B, D, h, w) -> (B, K, h, w), in exact fp32."""
        with exact_fp32():
            return torch.einsum("bdhw,kd->bkhw", codes.float(), F.normalize(self.centroids.float(), dim=1))

    @torch.no_grad()
    def cluster_map(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> cluster ids (B, H', W') at ``size`` (default: image size)."""
        logits = self.cluster_logits(self.codes(images))
        size = size or tuple(images.shape[1:3])
        with exact_fp32():
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)


