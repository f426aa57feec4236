"""Label-free model selection: a score sweeps can rank trials by without evaluation labels.

``view_nmi`` asks whether the segmentation is a property of the image rather than of its
pixels' colours: the same images are seen twice, once as they are and once with a colour
jitter and a horizontal flip; both code maps are assigned to the same centroids (the
model's fitted ones, or mid-training a k-means of the first view's codes), the second map
is flipped back, and the score is the normalised mutual information between the two maps.

It is 1 when both views give the same partition and 0 when the maps are independent —
and also 0 for a collapsed model that puts every pixel in one cluster (no entropy), which
the k-means objective (``cluster_mean_cosine``, near 1 for collapse) would reward. Unlike
the training loss, it does not change scale when a sweep changes the loss's weights.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SCORE_IMAGES = 32  # images per score: enough for a stable NMI, cheap next to an epoch


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information 2 I(a; b) / (H(a) + H(b)) of two label arrays of equal shape.

    Natural logarithms; 0 when both labelings are constant (nothing to agree on)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in size: {a.shape} vs {b.shape}")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1), np.float64)
    np.add.at(joint, (ai, bi), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha = float(-(pa * np.log(pa)).sum())
    hb = float(-(pb * np.log(pb)).sum())
    return 2.0 * mutual / (ha + hb) if ha + hb > 0 else 0.0


def jitter_view(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 images (B, H, W, 3) -> brightness/contrast/saturation-jittered, horizontally flipped copies."""
    x = images.astype(np.float32)
    b = len(x)
    brightness = rng.uniform(0.7, 1.3, (b, 1, 1, 1))
    contrast = rng.uniform(0.7, 1.3, (b, 1, 1, 1))
    saturation = rng.uniform(0.7, 1.3, (b, 1, 1, 1))
    x = x * brightness
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * contrast + mean
    gray = x.mean(axis=3, keepdims=True)
    x = (x - gray) * saturation + gray
    return np.ascontiguousarray(np.clip(x, 0, 255).astype(np.uint8)[:, :, ::-1])


def assign(codes: torch.Tensor, centroids: torch.Tensor) -> np.ndarray:
    """codes (B, D, h, w), centroids (K, D) -> nearest centroid by cosine (B, h, w)."""
    logits = torch.einsum("bdhw,kd->bkhw", F.normalize(codes.float(), dim=1), F.normalize(centroids.float(), dim=1))
    return logits.argmax(1).cpu().numpy()


def view_nmi(seg, images: np.ndarray, seed: int, centroids: torch.Tensor | None = None) -> float:
    """The score of module docstring for ``seg`` (a Segmenter) on uint8 images (B, H, W, 3).

    ``centroids`` (K, D) default to the model's if fitted, else a k-means of the plain view's
    codes into ``cfg.n_clusters``. The jitter is drawn from ``seed``: give every trial of a
    sweep the same seed so their scores see the same views."""
    from raysseg.core.kmeans import spherical_kmeans

    images = np.ascontiguousarray(images[:SCORE_IMAGES])
    rng = np.random.default_rng(seed)
    was_training = seg.training
    seg.eval()
    try:
        plain = seg.codes(torch.from_numpy(images))
        jittered = seg.codes(torch.from_numpy(jitter_view(images, rng))).flip(-1)  # flipped back
    finally:
        seg.train(was_training)
    if centroids is None:
        if bool(seg.fitted):
            centroids = seg.centroids
        else:
            flat = plain.permute(0, 2, 3, 1).reshape(-1, plain.shape[1]).cpu().numpy()
            k = min(seg.cfg.n_clusters, flat.shape[0])
            centroids = torch.from_numpy(spherical_kmeans(flat, k, 20, seed=seed))
    centroids = centroids.to(plain.device)
    return nmi(assign(plain, centroids), assign(jittered, centroids))
