"""MoCo v2 core (He et al. 2020; Chen et al. 2020, "Improved baselines"): loss, modules, views.

Plain PyTorch, no Ray; :mod:`raysseg.runtime.pretrain` runs it on Ray Train. Notation: N images
in a local batch, C = ``Backbone.pooled_dim``, P = projection size, L = queue length.

- An image's two views go through the query encoder (trained) and the key encoder (an
  EMA of the query encoder, no gradients). Both encoders are backbone -> global pool
  (``Backbone.pooled``) -> MLP projector -> L2 normalisation.
- The loss is InfoNCE over 1 + L logits per query: its own key (index 0) against the L
  keys of earlier batches held in the queue, divided by the temperature.
- After each step the step's keys (of every worker: the caller gathers them) are written
  into the queue as a ring buffer, oldest first out.
- Views follow the MoCo v2 recipe: random resized crop (area fraction in ``scale``),
  horizontal flip p 0.5, colour jitter (brightness/contrast/saturation 0.4, hue 0.1)
  with p 0.8, grayscale p 0.2, Gaussian blur sigma in [0.1, 2] with p 0.5.
- Optional dense term (``dense_weight`` > 0; DenseCL, Wang et al. 2021, with PixPro's geometric matching,
  Xie et al. 2021): the backbone's feature map (a ResNet's FPN output, a ViT's patch tokens) is read at a
  G x G grid of points of the query view and, through the known crops, at the same image points in the key
  view; a dense projector maps both to unit vectors, and each point whose image position lies in both views
  is pulled to its key and pushed from every key point of the other images (``dense_info_nce``). The loss is
  (1 - dense_weight) * global + dense_weight * dense. With it the FPN trains and is saved with the trunk.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysseg.core.backbones import Backbone, standardize
from raysseg.core.augment import crop_affine, crop_resize, photometric_augment, random_boxes
from raysseg.core.precision import at_least_fp32
from raysseg.methods.hp.core import ema_update

# MoCo v2 augmentation strengths (the "aug_plus" recipe of the reference code)
MOCO_V2_AUG = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p_jitter": 0.8,
               "p_gray": 0.2, "p_blur": 0.5, "blur_sigma": (0.1, 2.0)}


class MoCoInputError(ValueError):
    """Bad input to a MoCo function; the message names the function and the fix."""


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float, reduction: str = "mean") -> Tensor:
    """MoCo's InfoNCE loss.

    q, k: (N, P) L2-normalised queries and their positive keys; queue: (L, P) L2-normalised
    negative keys. Logits per query are [q.k, q.queue_1, ..., q.queue_L] / temperature, the
    positive at index 0; returns their cross-entropy: a scalar mean (``reduction="mean"``)
    or (N,) per query (``"none"``). No gradient flows into k or the queue.
    """
    if q.ndim != 2 or k.shape != q.shape:
        raise MoCoInputError(f"info_nce: q and k must both be (N, P), got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise MoCoInputError(f"info_nce: queue must be (L, {q.shape[1]}), got {tuple(queue.shape)}")
    if temperature <= 0:
        raise MoCoInputError(f"info_nce: temperature must be > 0, got {temperature}")
    logits = at_least_fp32(moco_logits(q, k, queue)) / temperature  # fp32 softmax under autocast
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels, reduction=reduction)


def moco_logits(q: Tensor, k: Tensor, queue: Tensor) -> Tensor:
    """(N, 1 + L) cosine similarities [q.k, q.queue^T] (not divided by the temperature)."""
    k, queue = k.detach(), queue.detach()
    return torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.t()], dim=1)


def dense_info_nce(q: Tensor, valid: Tensor, keys: Tensor, key_valid: Tensor, own: Tensor,
                   temperature: float) -> Tensor:
    """The dense term: InfoNCE of each matched point against every point of the other images.

    q: (N, M, P) unit query vectors at M points of each of N images; valid: (N, M) bool, the
    point lies in both views. keys: (K, M, P) unit key vectors at the matching points of K
    images (every worker's, so K >= N), key_valid: (K, M) bool; own: (N,) long, the row of keys
    holding each query image's keys. For a valid (n, m) the logits are its positive
    q[n, m].keys[own[n], m] first, then q[n, m].keys[j, m'] for every valid (j, m') with
    j != own[n] (other points of its own image are no negatives), all / temperature. Returns the
    scalar mean cross-entropy (positive at index 0) over valid points; 0 (with a graph) if none.
    """
    if q.ndim != 3 or keys.ndim != 3 or q.shape[1:] != keys.shape[1:]:
        raise MoCoInputError(f"dense_info_nce: q (N, M, P) and keys (K, M, P) must agree in M and P, "
                             f"got {tuple(q.shape)} and {tuple(keys.shape)}")
    if valid.shape != q.shape[:2] or key_valid.shape != keys.shape[:2] or own.shape != q.shape[:1]:
        raise MoCoInputError(f"dense_info_nce: valid must be (N, M), key_valid (K, M) and own (N,), got "
                             f"{tuple(valid.shape)}, {tuple(key_valid.shape)}, {tuple(own.shape)}")
    n_img, m, p = q.shape
    rows, points = valid.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return q.sum() * 0.0
    keys = keys.detach()
    qv = q[rows, points]  # (V, P)
    positive = (qv * keys[own[rows], points]).sum(dim=1, keepdim=True)
    others = qv @ keys.reshape(-1, p).t()  # (V, K*M)
    key_image = torch.arange(keys.shape[0], device=q.device).repeat_interleave(m)
    excluded = (key_image[None, :] == own[rows][:, None]) | ~key_valid.reshape(1, -1)
    logits = at_least_fp32(torch.cat([positive, others.masked_fill(excluded, float("-inf"))], dim=1))
    labels = torch.zeros(qv.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits / temperature, labels)


@dataclass
class ViewGeometry:
    """Where two views of each image came from: boxes (B, 4) as (x0, y0, x1, y1) image fractions and
    horizontal flips (B,) bool, of the query view and of the key view."""

    boxes_q: Tensor
    flips_q: Tensor
    boxes_k: Tensor
    flips_k: Tensor


def view_correspondence(geometry: ViewGeometry, grid: int) -> tuple[Tensor, Tensor, Tensor]:
    """Matching points of the two views of each image.

    The query points are the centres of a grid x grid lattice of the query view; each is mapped
    through its crop (:func:`crop_affine`, ``crop_resize``'s geometry) to the image and back into
    the key view. Returns (points_q (B, M, 2), points_k (B, M, 2), valid (B, M) bool) with
    M = grid**2, points as (x, y) in each view's [-1, 1] coordinates (``F.grid_sample``'s), and
    valid where the key point lies inside the key view.
    """
    b, device = geometry.boxes_q.shape[0], geometry.boxes_q.device
    centres = (torch.arange(grid, device=device, dtype=torch.float32) * 2 + 1) / grid - 1
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    points_q = torch.stack([gx, gy], -1).reshape(1, -1, 2).expand(b, -1, -1)
    scale_q, shift_q = crop_affine(geometry.boxes_q.float(), geometry.flips_q)
    scale_k, shift_k = crop_affine(geometry.boxes_k.float().to(device), geometry.flips_k)
    points_k = (points_q * scale_q[:, None] + shift_q[:, None] - shift_k[:, None]) / scale_k[:, None]
    valid = (points_k.abs() <= 1).all(dim=-1)
    return points_q.contiguous(), points_k, valid


def sample_points(features: Tensor, points: Tensor) -> Tensor:
    """Bilinear reads of features (B, C, h, w) at points (B, M, 2) in [-1, 1] -> (B, M, C)."""
    out = F.grid_sample(features, points[:, :, None, :].to(features.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)  # (B, C, M, 1)
    return out[..., 0].transpose(1, 2)


class Projector(nn.Module):
    """MoCo v2's MLP head: Linear(C, C) -> ReLU -> Linear(C, P). (N, C) -> (N, P)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """Backbone -> ``pooled`` -> projector -> L2 normalisation: (N, 3, H, W) -> (N, P) unit rows.

    With ``dense`` it also has a dense projector (the same MLP on the feature map's channels) and
    ``forward(x, points)`` returns (global (N, P), dense (N, M, P) unit vectors read at points (N, M, 2))."""

    def __init__(self, backbone: Backbone, proj_dim: int, dense: bool = False):
        super().__init__()
        self.backbone = backbone
        self.projector = Projector(backbone.pooled_dim, proj_dim)
        self.dense_projector = Projector(backbone.dim, proj_dim) if dense else None

    def forward(self, x: Tensor, points: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if points is None:
            return F.normalize(self.projector(self.backbone.pooled(x)), dim=1)
        if self.dense_projector is None:
            raise MoCoInputError("Encoder: points given but the encoder has no dense projector (dense=False)")
        pooled, features = self.backbone.pooled_and_features(x)
        dense = self.dense_projector(sample_points(features, points))
        return F.normalize(self.projector(pooled), dim=1), F.normalize(dense, dim=-1)


class MoCo(nn.Module):
    """Query encoder (trained), key encoder (EMA copy) and the queue of negative keys.

    ``encoder_q`` holds ``backbone`` (trainable, built with ``frozen=False``); ``encoder_k``
    is a deep copy without gradients. Buffers: ``queue`` (L, P) unit rows, initialised from
    ``seed`` alone (so every worker starts from the same queue), and ``queue_ptr`` (the
    next row to overwrite). Without the dense term (``dense_weight`` 0) a ResNet-FPN's FPN is
    not used: its parameters are excluded from training (``requires_grad=False``) so DDP does
    not wait for them; with it the FPN trains and both encoders get a dense projector.
    """

    def __init__(self, backbone: Backbone, proj_dim: int = 128, queue_size: int = 4096,
                 momentum: float = 0.99, temperature: float = 0.2, seed: int = 0, dense_weight: float = 0.0):
        super().__init__()
        if queue_size < 1:
            raise MoCoInputError(f"MoCo: queue_size must be >= 1, got {queue_size}")
        if not 0.0 <= dense_weight <= 1.0:
            raise MoCoInputError(f"MoCo: dense_weight must be in [0, 1], got {dense_weight}")
        self.momentum, self.temperature, self.dense_weight = momentum, temperature, dense_weight
        fpn = getattr(backbone, "fpn", None)
        if fpn is not None and dense_weight == 0:
            fpn.requires_grad_(False)
        self.encoder_q = Encoder(backbone, proj_dim, dense=dense_weight > 0)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> Backbone:
        return self.encoder_q.backbone

    @torch.no_grad()
    def momentum_update(self) -> None:
        """encoder_k <- m * encoder_k + (1 - m) * encoder_q (parameters; buffers copied)."""
        ema_update(self.encoder_k, self.encoder_q, self.momentum)

    @torch.no_grad()
    def sync_key_encoder(self) -> None:
        """encoder_k <- encoder_q exactly (at the start of training)."""
        ema_update(self.encoder_k, self.encoder_q, 0.0)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write keys (n, P) into the ring buffer at ``queue_ptr`` (wrapping), as if one at a time:
        with n > L only the last L survive. Advances the pointer by n (mod L)."""
        if keys.ndim != 2 or keys.shape[1] != self.queue.shape[1]:
            raise MoCoInputError(f"MoCo.enqueue: keys must be (n, {self.queue.shape[1]}), got {tuple(keys.shape)}")
        n, length = keys.shape[0], self.queue.shape[0]
        if n == 0:
            return
        start = max(0, n - length)
        ptr = int(self.queue_ptr)
        rows = (ptr + torch.arange(start, n, device=self.queue.device)) % length
        self.queue[rows] = keys[start:].detach().to(self.queue.device, self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % length)

    def loss(self, q: Tensor, k: Tensor, reduction: str = "mean") -> Tensor:
        """info_nce of queries and keys against the current queue (a snapshot: later enqueues don't matter)."""
        return info_nce(q, k, self.queue.clone(), self.temperature, reduction)

    def queue_checksum(self) -> tuple[str, float]:
        """(sha1 of the queue's bytes and pointer, a float summary for metrics)."""
        data = self.queue.detach().float().cpu().contiguous().numpy()
        digest = hashlib.sha1(data.tobytes() + np.int64(int(self.queue_ptr)).tobytes()).hexdigest()
        weights = np.arange(1, data.shape[0] + 1, dtype=np.float64)[:, None]
        return digest, float((data.astype(np.float64) * weights).sum())


def two_crops(images_uint8: Tensor | np.ndarray, generator: torch.Generator, size: int,
              scale: tuple[float, float] = (0.2, 1.0)) -> tuple[Tensor, Tensor]:
    """Two independent MoCo v2 views of each image.

    images_uint8: (B, H, W, 3) uint8 RGB (tensor or numpy; a tensor stays on its device).
    Each view: random resized crop (area fraction in ``scale``, aspect 3/4..4/3) resized to
    size x size, horizontal flip p 0.5, ``photometric_augment`` with MOCO_V2_AUG, ImageNet normalisation.
    Returns (query view, key view), each (B, 3, size, size) float32, and their ``ViewGeometry``.
    """
    images = torch.as_tensor(images_uint8)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise MoCoInputError(f"two_crops: expected uint8 images (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    b = x.shape[0]
    views, crops = [], []
    for _ in range(2):
        boxes = random_boxes(b, generator, scale)
        flips = torch.rand(b, generator=generator, device=generator.device) < 0.5
        view = crop_resize(x, boxes, (size, size), flips).clamp_(0, 1)
        views.append(standardize(photometric_augment(view, generator, **MOCO_V2_AUG)))
        crops += [boxes.to(x.device), flips.to(x.device)]
    return views[0], views[1], ViewGeometry(*crops)
