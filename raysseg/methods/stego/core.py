"""STEGO (Hamilton et al., ICLR 2022) core: the feature correspondence loss, its head and the KNN table,
in plain PyTorch.

Notation: f = frozen backbone features (C dims), s = codes of the segmentation head (D dims). For a pair
of images (a, b) both are read at S x S points drawn uniformly in each image (bilinear, border padding),
and the loss of the pair is

    L(a, b) = - mean over (h, w, i, j) of  max(S_hwij, clamp) * (F_hwij - shift)

with S_hwij = cos(s_a[h, w], s_b[i, j]) (the code correspondence, with gradient) and F_hwij =
cos(f_a[h, w], f_b[i, j]) (the feature correspondence, no gradient). ``pointwise``: each row of F first
loses its mean over the second image's points (i, j), then gets back the mean of F over the whole batch
of pairs (one batch per pair kind and per random permutation).
STEGO adds three pair kinds, each with its own shift b and weight lambda:
  self  (a with itself, at the same points),
  knn   (a with one of its K nearest neighbours over the dataset, a new pick every epoch),
  random (a with another image of the batch, ``n_random`` permutations; L averaged over them),
  total = lambda_self L_self + lambda_knn L_knn + lambda_random L_random.

Readings of the released code (github mhamilton723/STEGO, src/modules.py and src/train_segmentation.py,
checked by ``benchmarks/parity/stego.py``):
- the clamp is at 0 (``zero_clamp``; released default), none when it is off;
- the sampled points of the second image of every kind are one draw (``coords2``), shared by the KNN
  partner and every random permutation; the first image's points are another draw (``coords1``);
- the sampled grid is read transposed: output cell (y, x) comes from the point ``coords[:, x, y]``
  (:func:`sample_points`); with uniform random points this changes nothing, but parity needs it;
- a random permutation moves every index that it would leave in place one step on (mod B), so an
  image is never its own random partner when B > 1 (:func:`random_partner`);
- the loss sees the backbone features after Dropout2d(0.1), and each of the two head branches draws its
  own Dropout2d mask (:class:`StegoHead`).
The online cluster and linear probes of the released trainer are the project's evaluation here: the
final spherical k-means of the codes (the cluster probe's objective, run once on the whole split) and
the linear probe of ``raysseg evaluate`` (training never reads labels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAIR_KINDS = ("self", "knn", "random")


class StegoInputError(ValueError):
    """A STEGO function got tensors of the wrong shape; the message names the function and the shapes."""


def _fail(where: str, message: str) -> None:
    raise StegoInputError(f"stego_core.{where}: {message}")


def normalize(t: Tensor) -> Tensor:
    """L2-normalise along dim 1 (channels), eps 1e-10 as released. (B, C, ...) -> same shape."""
    return F.normalize(t, dim=1, eps=1e-10)


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Dot products of every location of ``a`` with every location of ``b``, per image.

    a (B, C, H, W), b (B, C, I, J) -> (B, H, W, I, J); cosines when both are normalised."""
    if a.dim() != 4 or b.dim() != 4 or a.shape[:2] != b.shape[:2]:
        _fail("correlation", f"a and b must be (B, C, ., .) with equal B and C, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
    return torch.einsum("bchw,bcij->bhwij", a, b)


def sample_points(t: Tensor, coords: Tensor) -> Tensor:
    """Bilinear reads of ``t`` at ``coords`` (x, y in [-1, 1], corners aligned, border padding).

    t (B, C, H, W), coords (B, S, S, 2) -> (B, C, S, S) with out[:, :, y, x] read at coords[:, x, y]
    (the released grid is transposed; see the module docstring)."""
    if coords.dim() != 4 or coords.shape[-1] != 2 or coords.shape[0] != t.shape[0]:
        _fail("sample_points", f"coords must be (B, S, S, 2) with B = {t.shape[0]}, got {tuple(coords.shape)}")
    return F.grid_sample(t, coords.transpose(1, 2), padding_mode="border", align_corners=True)


def feature_correspondence(f1: Tensor, f2: Tensor, pointwise: bool = True) -> Tensor:
    """F: cosine correlation of backbone features, no gradient. f1 (B, C, H, W), f2 (B, C, I, J) ->
    (B, H, W, I, J). ``pointwise``: minus each (h, w) row's mean over (i, j), plus the mean over everything
    (the batch included)."""
    with torch.no_grad():
        fd = correlation(normalize(f1), normalize(f2))
        if pointwise:
            fd = fd - fd.mean(dim=(3, 4), keepdim=True) + fd.mean()
    return fd


def correspondence_loss(f1: Tensor, f2: Tensor, c1: Tensor, c2: Tensor, shift: float, *, pointwise: bool = True,
                        zero_clamp: bool = True) -> tuple[Tensor, Tensor]:
    """The shifted correspondence loss of one pair kind, per element (not reduced).

    f1 (B, C, H, W), f2 (B, C, I, J) features; c1 (B, D, H, W), c2 (B, D, I, J) codes at the same
    points -> (loss (B, H, W, I, J) = -max(S, clamp) * (F - shift), S (B, H, W, I, J) the code
    correlation). clamp = 0 with ``zero_clamp``, else none."""
    fd = feature_correspondence(f1, f2, pointwise)
    cd = correlation(normalize(c1), normalize(c2))
    clamped = cd.clamp(min=0.0) if zero_clamp else cd
    return -clamped * (fd - shift), cd


def random_points(batch: int, points: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Tensor:
    """Uniform sampling points: (batch, points, points, 2) in [-1, 1)."""
    return torch.rand(batch, points, points, 2, generator=generator, device=device) * 2 - 1


def random_partner(batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """A random permutation of range(batch) whose fixed points are moved one on (mod batch): (batch,) long.
    No image is its own partner when batch > 1 (the permutation may map two images to one partner)."""
    perm = torch.randperm(batch, generator=generator, device=device)
    idx = torch.arange(batch, device=device)
    return (perm + (perm == idx).long()) % batch


def stego_loss(feats: Tensor, feats_knn: Tensor, codes: Tensor, codes_knn: Tensor, coords1: Tensor,
               coords2: Tensor, partners: list[Tensor], *, shifts: dict[str, float], weights: dict[str, float],
               pointwise: bool = True, zero_clamp: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """STEGO's total correspondence loss for one batch.

    feats, feats_knn (B, C, h, w): backbone features of the images and of their KNN partners;
    codes, codes_knn (B, D, h, w): head codes of the same; coords1, coords2 (B, S, S, 2): the points
    read in the first and second image of each pair (:func:`random_points`); partners: n_random
    (B,) long permutations (:func:`random_partner`), image b's random partner is image partners[r][b].
    shifts, weights: b and lambda per pair kind ("self", "knn", "random").
    Returns (total, {kind: mean loss of that kind}), each a 0-d tensor."""
    if feats.dim() != 4 or feats_knn.shape != feats.shape or codes.dim() != 4 or codes_knn.shape != codes.shape:
        _fail("stego_loss", f"feats/feats_knn must be equal (B, C, h, w) and codes/codes_knn equal (B, D, h, w), "
                            f"got {tuple(feats.shape)}, {tuple(feats_knn.shape)}, {tuple(codes.shape)}, "
                            f"{tuple(codes_knn.shape)}")
    if codes.shape[0] != feats.shape[0] or codes.shape[2:] != feats.shape[2:]:
        _fail("stego_loss", f"codes {tuple(codes.shape)} must share B, h, w with feats {tuple(feats.shape)}")
    if not partners:
        _fail("stego_loss", "partners must hold at least one random permutation")
    f1, c1 = sample_points(feats, coords1), sample_points(codes, coords1)
    opts = {"pointwise": pointwise, "zero_clamp": zero_clamp}
    parts = {
        "self": correspondence_loss(f1, f1, c1, c1, shifts["self"], **opts)[0].mean(),
        "knn": correspondence_loss(f1, sample_points(feats_knn, coords2), c1, sample_points(codes_knn, coords2),
                                   shifts["knn"], **opts)[0].mean(),
    }
    random = [correspondence_loss(f1, sample_points(feats[p], coords2), c1, sample_points(codes[p], coords2),
                                  shifts["random"], **opts)[0].mean() for p in partners]
    parts["random"] = torch.stack(random).mean()
    total = sum(weights[k] * parts[k] for k in PAIR_KINDS)
    return total, parts


class StegoHead(nn.Module):
    """STEGO's segmentation head: a linear 1x1 convolution plus a two-layer ReLU MLP of 1x1 convolutions,
    summed. In training each branch reads the features through its own Dropout2d(0.1) mask."""

    def __init__(self, in_dim: int, code_dim: int, dropout: float = 0.1):
        super().__init__()
        self.linear = nn.Conv2d(in_dim, code_dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, code_dim, 1))
        self.dropout = nn.Dropout2d(dropout)
        self.code_dim = code_dim

    def forward(self, feats: Tensor) -> Tensor:
        """(B, C, h, w) -> codes (B, D, h, w); dropout only in training mode."""
        return self.linear(self.dropout(feats)) + self.nonlinear(self.dropout(feats))

    def embed(self, feats: Tensor, rgb: Tensor) -> Tensor:
        """The Segmenter's head interface (``rgb`` unused)."""
        return self(feats)


# ---------------------------------------------------------------- the KNN table


def pooled_features(feats: Tensor) -> Tensor:
    """Each image's global descriptor: the spatial mean of its features, L2-normalised. (B, C, h, w) -> (B, C)."""
    return F.normalize(feats.float().mean(dim=(2, 3)), dim=1)


def nearest_neighbours(vectors: Tensor, start: int, stop: int, k: int) -> Tensor:
    """Rows ``start:stop`` of the KNN table: for each of those images, the indices of the ``k`` largest
    dot products with every image (itself included, usually first), in decreasing order.
    vectors (N, C) normalised -> (stop - start, min(k, N)) long."""
    sims = vectors[start:stop] @ vectors.T
    return torch.topk(sims, min(k, vectors.shape[0]), dim=1).indices
