"""PiCIE + PGG + CAE core: losses, heads and pooling in plain PyTorch.

Implements METHODS.md section 2 / pgg-cae-fully-self-supervised.txt (sections 3, 4.2,
4.3). Notation: B images, D feature dims, K pixel clusters (PiCIE), G global clusters
(PGG), V pyramid views per image, n = h*w cells of a map.

Readings of details the paper leaves open:

- PiCIE loss. Logits are plain cosine similarities between the L2-normalised pixel
  features and the normalised frozen centroids (no temperature), every cross-entropy
  is an unweighted mean over labelled pixels (PiCIE's released code weights classes by
  their frequency; that fault is not copied). Centroids are detached: they are the
  k-means result of the previous epoch, not parameters.
- CAE, Eq. 7-9 are missing from the text (only "Inspired by [15]" and the roles of
  the terms survive). They are read as the dense-CRF kernels of Kraehenbuehl & Koltun:
      k_ij = w1 exp(-|p_i-p_j|^2 / (2 ta^2) - |I_i-I_j|^2 / (2 tb^2))   (appearance)
           + w2 exp(-|p_i-p_j|^2 / (2 tg^2))                               (smoothness)
  with ta, tb, tg, w1, w2 learnable (the paper: "we set these parameters as
  differentiable variables").
- Combination of the cosine and the kernels ("the non-local factor ... is calculated
  as", formula missing): a product, normalised over j,
      A_ij = exp(cos(f_i, f_j) / tau) k_ij / sum_l exp(cos(f_i, f_l) / tau) k_il,
  so the kernels act as a multiplicative prior on a softmax attention. tau is learnable
  too. Ablation modes of section 5.3: "feature" (A = softmax(cos / tau), CNN features
  only) and "raw" (A proportional to k, raw information only). Computed in log space
  (log k by log-sum-exp of the two log-kernels, then a row softmax); nothing is divided.
- Positions p are cell centres ((x + 0.5), (y + 0.5)) divided by max(h, w), so the
  longer side spans [0, 1] and bandwidths mean the same whatever the aspect ratio;
  colours I are cell-mean RGB in [0, 1] (un-normalised image, not ImageNet-standardised).
- All positive CAE parameters are stored as logs (init tau 0.1, ta 0.3, tb 0.1,
  tg 0.05, w1 = w2 = 1). Only the parameters the affinity mode uses are created, so
  DistributedDataParallel sees no unused parameter.
- The attention is computed in float32 with autocast disabled (a B x n x n softmax of
  logits scaled by 1/tau and by 1/theta^2 is not safe in half precision).
- PGG head. The embedding at 1/8 is proj8(avgpool2(f4)) + upsample(CAE(avgpool4(f4),
  rgb pooled to the same 1/16 grid)); proj8 is the "linear process on the FPN feature"
  (a 1x1 conv). The rgb is pooled adaptively to the grid of avgpool4(f4), which equals
  avgpool16 when H and W are multiples of 16 and keeps the two grids aligned otherwise.
  ``pgg.output_stride = 4`` (not the paper's) keeps PiCIE's 1/4 grid for small images: proj8(f4) +
  upsample(CAE(avgpool2(f4))), CAE at 1/8 (at 128 px a 1/8 map is 16 x 16, which caps a perfect
  labeller of CamVid at about 61 mIoU against 73 at 1/4).
- Pyramid views: the whole image, four half-width half-height corner crops, and the
  centre crop of half size. Global guidance pools the embedding over each view's box
  (cells whose centre lies in the closed box) instead of re-running the network on the
  crop; "modified CAM" is GAP -> Linear(D, D) -> ReLU -> Linear(D, G).
- Active selection keeps ceil(keep_fraction * N) views with the smallest distance to
  their centre, over all N views of the data set (not per image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysseg.core.precision import exact_fp32


class PiCIEInputError(ValueError):
    """Bad input to a PiCIE/PGG/CAE function; the message names the function and field."""


def _fail(where: str, message: str) -> None:
    raise PiCIEInputError(f"picie_core.{where}: {message}")


def _check_map(where: str, name: str, x: Tensor) -> None:
    if x.dim() != 4:
        _fail(where, f"{name} must be 4-D [B, D, h, w], got shape {tuple(x.shape)}")


def _check_centroids(where: str, name: str, c: Tensor, dim: int) -> None:
    if c.dim() != 2 or c.shape[1] != dim:
        _fail(where, f"{name} must be [K, {dim}] (same dims as the features), got shape {tuple(c.shape)}")


def _check_labels(where: str, name: str, y: Tensor, z: Tensor) -> None:
    if y.shape != (z.shape[0], *z.shape[2:]):
        _fail(where, f"{name} must be [B, h, w] = {(z.shape[0], *z.shape[2:])}, got {tuple(y.shape)}")
    if y.dtype != torch.int64:
        _fail(where, f"{name} must be int64 cluster labels, got {y.dtype}")


# ----------------------------------------------------------------------------- PiCIE


def _cosine_logits(z: Tensor, centroids: Tensor) -> Tensor:
    """z [B, D, h, w], centroids [K, D] -> [B, K, h, w] = z . normalised centroids."""
    c = F.normalize(centroids.detach().to(z.dtype), dim=1)
    return torch.einsum("bdhw,kd->bkhw", z, c)


@torch.no_grad()
def assign_labels(z: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid by cosine. z [B, D, h, w] L2-normalised, centroids [K, D] -> int64 [B, h, w]."""
    _check_map("assign_labels", "z", z)
    _check_centroids("assign_labels", "centroids", centroids, z.shape[1])
    with exact_fp32():  # a decision: fp32 whatever the run's precision
        return _cosine_logits(z.float(), centroids.float()).argmax(dim=1)


def _ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over pixels with label != -1; a zero with a grad path if there are none."""
    if not bool((labels != -1).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=-1)


def picie_loss(z1: Tensor, z2: Tensor, c1: Tensor, c2: Tensor, y1: Tensor,
               y2: Tensor) -> tuple[Tensor, dict[str, float]]:
    """PiCIE within-view + cross-view cross-entropy with frozen centroid classifiers.

    z1, z2 [B, D, h, w]: L2-normalised features of view 1 and of view 2 (view 2 already
    cropped/flipped to align with view 1). c1, c2 [K, D]: centroids of the view-1 and
    view-2 clusterings (normalised inside, no gradient). y1, y2 [B, h, w] int64 labels,
    -1 = ignore. Logits are cosines, no temperature, no class weights.
        within = CE(z1.c1, y1) + CE(z2.c2, y2);  cross = CE(z1.c2, y2) + CE(z2.c1, y1)
    Returns (within + cross, {"loss_within", "loss_cross"}).
    """
    for name, z in (("z1", z1), ("z2", z2)):
        _check_map("picie_loss", name, z)
    if z1.shape != z2.shape:
        _fail("picie_loss", f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must have the same shape "
                            "(align view 2 to view 1 before the loss)")
    for name, c in (("c1", c1), ("c2", c2)):
        _check_centroids("picie_loss", name, c, z1.shape[1])
    for name, y in (("y1", y1), ("y2", y2)):
        _check_labels("picie_loss", name, y, z1)
    l11, l12 = _cosine_logits(z1, c1), _cosine_logits(z1, c2)
    l22, l21 = _cosine_logits(z2, c2), _cosine_logits(z2, c1)
    within = _ce(l11, y1) + _ce(l22, y2)
    cross = _ce(l12, y2) + _ce(l21, y1)
    return within + cross, {"loss_within": float(within.detach()), "loss_cross": float(cross.detach())}


# ----------------------------------------------------------------------------- CAE


AFFINITIES = ("both", "feature", "raw")


def cell_positions(h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
    """Cell centres of an h x w grid as (x, y) / max(h, w) -> [h*w, 2], row-major."""
    s = float(max(h, w))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / s
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / s
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances [..., n, m] from a [..., n, c] and b [..., m, c] (clamped >= 0)."""
    d = (a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :] - 2 * a @ b.transpose(-1, -2)
    return d.clamp_min(0.0)


class CAE(nn.Module):
    """Context-aware embedding: f [B, D, h, w], rgb [B, 3, h, w] -> projector(A @ f) [B, D, h, w].

    A [B, n, n] (rows sum to 1), see the module docstring for the affinity. Positive
    parameters are stored as logs: log_tau, log_theta_alpha, log_theta_beta,
    log_theta_gamma, log_w1, log_w2 (only those the affinity mode uses).
    """

    def __init__(self, dim: int, affinity: str = "both", *, tau: float = 0.1, theta_alpha: float = 0.3,
                 theta_beta: float = 0.1, theta_gamma: float = 0.05, w1: float = 1.0, w2: float = 1.0):
        super().__init__()
        if affinity not in AFFINITIES:
            raise PiCIEInputError(f"picie_core.CAE: affinity must be one of {AFFINITIES}, got {affinity!r}")
        for name, v in (("tau", tau), ("theta_alpha", theta_alpha), ("theta_beta", theta_beta),
                        ("theta_gamma", theta_gamma), ("w1", w1), ("w2", w2)):
            if not v > 0:
                raise PiCIEInputError(f"picie_core.CAE: {name} must be > 0, got {v}")
        self.affinity = affinity
        if affinity in ("both", "feature"):
            self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        if affinity in ("both", "raw"):
            self.log_theta_alpha = nn.Parameter(torch.tensor(math.log(theta_alpha)))
            self.log_theta_beta = nn.Parameter(torch.tensor(math.log(theta_beta)))
            self.log_theta_gamma = nn.Parameter(torch.tensor(math.log(theta_gamma)))
            self.log_w1 = nn.Parameter(torch.tensor(math.log(w1)))
            self.log_w2 = nn.Parameter(torch.tensor(math.log(w2)))
        self.projector = nn.Conv2d(dim, dim, 1)

    def log_kernel(self, rgb: Tensor, h: int, w: int) -> Tensor:
        """log k_ij for colours rgb [B, 3, h, w] on an h x w grid -> [B, n, n] (float32)."""
        pos = cell_positions(h, w, rgb.device)
        dp = _sq_dist(pos, pos)[None]                                  # [1, n, n]
        col = rgb.float().flatten(2).transpose(1, 2)                   # [B, n, 3]
        dc = _sq_dist(col, col)                                        # [B, n, n]
        ta2 = torch.exp(2 * self.log_theta_alpha)
        tb2 = torch.exp(2 * self.log_theta_beta)
        tg2 = torch.exp(2 * self.log_theta_gamma)
        appearance = self.log_w1 - dp / (2 * ta2) - dc / (2 * tb2)
        smoothness = (self.log_w2 - dp / (2 * tg2)).expand_as(appearance)
        return torch.logaddexp(appearance, smoothness)

    def attention(self, f: Tensor, rgb: Tensor) -> Tensor:
        """Row-stochastic attention A [B, n, n] from f [B, D, h, w] and rgb [B, 3, h, w], n = h*w."""
        _check_map("CAE.attention", "f", f)
        _check_map("CAE.attention", "rgb", rgb)
        b, _, h, w = f.shape
        if rgb.shape != (b, 3, h, w):
            _fail("CAE.attention", f"rgb must be [B, 3, h, w] = {(b, 3, h, w)} (the image pooled to the "
                                   f"feature grid), got {tuple(rgb.shape)}")
        with torch.autocast(device_type=f.device.type, enabled=False):
            logits = None
            if self.affinity in ("both", "feature"):
                fn = F.normalize(f.float().flatten(2), dim=1)            # [B, D, n]
                logits = (fn.transpose(1, 2) @ fn) / torch.exp(self.log_tau)
            if self.affinity in ("both", "raw"):
                lk = self.log_kernel(rgb, h, w)
                logits = lk if logits is None else logits + lk
            return torch.softmax(logits, dim=-1)

    def forward(self, f: Tensor, rgb: Tensor) -> Tensor:
        b, d, h, w = f.shape
        a = self.attention(f, rgb)
        with torch.autocast(device_type=f.device.type, enabled=False):
            mixed = a @ f.float().flatten(2).transpose(1, 2)           # [B, n, D]
        mixed = mixed.transpose(1, 2).reshape(b, d, h, w).to(f.dtype)
        return self.projector(mixed)


# ----------------------------------------------------------------------------- PGG


# (x0, y0, x1, y1) fractions: whole image, corners TL, TR, BL, BR (half size), centre crop.
PYRAMID_BOXES = torch.tensor([
    [0.0, 0.0, 1.0, 1.0],
    [0.0, 0.0, 0.5, 0.5],
    [0.5, 0.0, 1.0, 0.5],
    [0.0, 0.5, 0.5, 1.0],
    [0.5, 0.5, 1.0, 1.0],
    [0.25, 0.25, 0.75, 0.75],
], dtype=torch.float32)


def box_masks(boxes: Tensor, h: int, w: int) -> Tensor:
    """Cells of an h x w map whose centre ((x+.5)/w, (y+.5)/h) lies in each closed box.

    boxes [V, 4] (x0, y0, x1, y1) fractions -> bool [V, h, w]. Raises PiCIEInputError
    (a ValueError) naming the first box that contains no cell centre.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        _fail("box_masks", f"boxes must be [V, 4] (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
    bx = boxes.detach().to("cpu", torch.float64)
    cy = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    cx = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    in_x = (cx[None] >= bx[:, 0:1]) & (cx[None] <= bx[:, 2:3])     # [V, w]
    in_y = (cy[None] >= bx[:, 1:2]) & (cy[None] <= bx[:, 3:4])     # [V, h]
    masks = in_y[:, :, None] & in_x[:, None, :]
    empty = (~masks.flatten(1).any(1)).nonzero().flatten()
    if empty.numel():
        v = int(empty[0])
        _fail("box_masks", f"box {v} {tuple(round(float(t), 4) for t in bx[v])} contains no cell centre of "
                           f"the {h}x{w} map; use a larger box or a finer map")
    return masks.to(boxes.device)


def region_pool(fmap: Tensor, boxes: Tensor) -> Tensor:
    """Mean of fmap [B, D, h, w] over the cells whose centres lie in each box [V, 4] -> [B, V, D]."""
    _check_map("region_pool", "fmap", fmap)
    masks = box_masks(boxes, fmap.shape[2], fmap.shape[3]).to(fmap.device, fmap.dtype)
    return torch.einsum("bdhw,vhw->bvd", fmap, masks) / masks.sum((1, 2))[None, :, None]


def active_selection(distance: Tensor, keep_fraction: float) -> Tensor:
    """Keep the ceil(keep_fraction * N) smallest distances [N] -> bool [N]; ties go to the lower index."""
    if distance.dim() != 1:
        _fail("active_selection", f"distance must be 1-D [N], got shape {tuple(distance.shape)}")
    if not 0.0 <= keep_fraction <= 1.0:
        _fail("active_selection", f"keep_fraction must be in [0, 1] (40% is 0.4), got {keep_fraction}")
    n = distance.shape[0]
    k = min(n, math.ceil(keep_fraction * n - 1e-9))  # 0.7 * 10 = 7.000000000000001 must keep 7
    order = torch.sort(distance, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool, device=distance.device)
    keep[order[:k]] = True
    return keep


def guidance_loss(logits: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
    """Mean cross-entropy of logits [B, V, G] against labels [B, V] over keep [B, V] (bool).

    A zero with a grad path (logits.sum() * 0) when nothing is kept.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or keep.shape != logits.shape[:2]:
        _fail("guidance_loss", f"need logits [B, V, G], labels and keep [B, V]; got {tuple(logits.shape)}, "
                               f"{tuple(labels.shape)}, {tuple(keep.shape)}")
    if keep.dtype != torch.bool:
        _fail("guidance_loss", f"keep must be a bool mask, got {keep.dtype}")
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep].float(), labels[keep])


class CAMHead(nn.Module):
    """Image-level classifier on pooled features [N, D] -> logits [N, G].

    classic: Linear(D, G); modified (the paper's "Mod."): Linear(D, D) -> ReLU -> Linear(D, G).
    """

    def __init__(self, dim: int, n_classes: int, modified: bool):
        super().__init__()
        self.modified = modified
        if modified:
            self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, n_classes))
        else:
            self.net = nn.Sequential(nn.Linear(dim, n_classes))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled)


class PGGHead(nn.Module):
    """Embedding head on the FPN map, with optional CAE and global-guidance classifier.

    forward(f4 [B, D, H/4, W/4], rgb [B, 3, H, W] in [0, 1]) -> emb [B, D, H/s, W/s], s = output_stride
        = proj8(avgpool_{s/4}(f4)) + upsample(CAE(avgpool_{s/2}(f4), rgb pooled to the same grid))
    (just the first term without CAE). s = 8, the paper's: output at 1/8, CAE at 1/16; s = 4: output at
    PiCIE's 1/4, CAE at 1/8 (the same 2x ratio), for small images (128 px: 32 x 32 instead of 16 x 16).
    `cam` is a CAMHead, or None without guidance.
    """

    def __init__(self, dim: int, *, cae: bool, affinity: str, n_global: int, guidance: bool,
                 modified_cam: bool, output_stride: int = 8):
        super().__init__()
        if output_stride not in (4, 8):
            raise PiCIEInputError(f"picie_core.PGGHead: output_stride must be 4 or 8, got {output_stride}")
        self.pool = output_stride // 4  # f4 cells per output cell (per side)
        self.proj8 = nn.Conv2d(dim, dim, 1)
        self.cae: CAE | None = CAE(dim, affinity) if cae else None
        self.cam: CAMHead | None = CAMHead(dim, n_global, modified_cam) if guidance else None

    def forward(self, f4: Tensor, rgb: Tensor) -> Tensor:
        _check_map("PGGHead.forward", "f4", f4)
        _check_map("PGGHead.forward", "rgb", rgb)
        if rgb.shape[0] != f4.shape[0] or rgb.shape[1] != 3:
            _fail("PGGHead.forward", f"rgb must be [B, 3, H, W] with B = {f4.shape[0]}, got {tuple(rgb.shape)}")
        emb = self.proj8(F.avg_pool2d(f4, self.pool))
        if self.cae is None:
            return emb
        f16 = F.avg_pool2d(f4, 2 * self.pool)
        if min(f16.shape[-2:]) < 1:
            _fail("PGGHead.forward", f"f4 {tuple(f4.shape[-2:])} is too small for the 1/16 CAE grid")
        rgb16 = F.adaptive_avg_pool2d(rgb.to(f16.dtype), f16.shape[-2:])
        ctx = self.cae(f16, rgb16)
        return emb + F.interpolate(ctx, size=emb.shape[-2:], mode="bilinear", align_corners=False)

    def embed(self, f4: Tensor, rgb: Tensor) -> Tensor:
        """The Segmenter's head interface: :meth:`forward`."""
        return self(f4, rgb)

    def global_logits(self, emb: Tensor, boxes: Tensor) -> Tensor:
        """cam(region_pool(emb, boxes)): emb [B, D, h, w], boxes [V, 4] -> logits [B, V, G]."""
        if self.cam is None:
            _fail("PGGHead.global_logits", "this head was built with guidance=False (no CAM head)")
        return self.cam(region_pool(emb, boxes))
