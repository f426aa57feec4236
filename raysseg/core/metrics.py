"""Evaluation maths shared by every method: confusion matrices, Hungarian-matched
cluster scores, direct (linear-probe) scores, the linear probe itself and soft
cluster assignments for the CRF.

Convention: a confusion matrix ``conf[p, c]`` counts pixels predicted as ``p``
whose ground-truth class is ``c`` (rows = predictions, columns = classes).

Classes absent from the split (no ground-truth pixel) get IoU ``nan`` in
``per_class_iou`` and are left out of the mean IoU, even if some pixels were
predicted as them. Bad input raises EvalInputError (a ValueError) with a one-line message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn


class EvalInputError(ValueError):
    """Bad input to the evaluation code (metrics, CRF, pictures)."""


def confusion_matrix(
    pred: np.ndarray, target: np.ndarray, n_pred: int, n_classes: int, ignore_index: int
) -> np.ndarray:
    """Count (prediction, class) pairs over pixels.

    pred, target: integer arrays of the same shape (any shape).
    Pixels whose target equals ``ignore_index`` or lies outside [0, n_classes) never
    count. Counted pixels must have ``0 <= pred < n_pred``.
    Returns int64 (n_pred, n_classes).
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise EvalInputError(f"confusion_matrix: pred shape {pred.shape} != target shape {target.shape}")
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(target.dtype, np.integer)):
        raise EvalInputError(
            f"confusion_matrix: pred ({pred.dtype}) and target ({target.dtype}) must be integer arrays"
        )
    pred = pred.reshape(-1).astype(np.int64)
    target = target.reshape(-1).astype(np.int64)
    keep = (target != ignore_index) & (target >= 0) & (target < n_classes)
    pred, target = pred[keep], target[keep]
    if pred.size and (pred.min() < 0 or pred.max() >= n_pred):
        raise EvalInputError(
            f"confusion_matrix: predictions span [{pred.min()}, {pred.max()}] but must lie in "
            f"[0, {n_pred}); pass the right n_pred (number of clusters/classes predicted)"
        )
    counts = np.bincount(pred * n_classes + target, minlength=n_pred * n_classes)
    return counts.reshape(n_pred, n_classes).astype(np.int64)


@dataclass
class Scores:
    """Segmentation scores over a split.

    mapping[p] is the class assigned to predicted id p (-1 if unmatched);
    per_class_iou has nan for classes absent from the split.
    """

    accuracy: float
    miou: float
    per_class_iou: list[float]
    mapping: list[int]
    n_pixels: int

    def to_dict(self) -> dict:
        """JSON-friendly dict (nan becomes None)."""

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "accuracy": clean(self.accuracy),
            "miou": clean(self.miou),
            "per_class_iou": [clean(x) for x in self.per_class_iou],
            "mapping": list(self.mapping),
            "n_pixels": self.n_pixels,
        }


def matched_confusion(conf: np.ndarray, mapping: list[int] | np.ndarray) -> np.ndarray:
    """Merge prediction rows into class rows: (n_pred, n_classes) -> (n_classes, n_classes).

    Row ``mapping[p]`` receives row ``p``; rows of unmatched predictions (-1) are dropped.
    """
    conf = np.asarray(conf)
    mapping = np.asarray(mapping, dtype=np.int64)
    if mapping.shape != (conf.shape[0],):
        raise EvalInputError(f"matched_confusion: mapping has {mapping.size} entries for {conf.shape[0]} predicted ids")
    n_classes = conf.shape[1]
    out = np.zeros((n_classes, n_classes), dtype=conf.dtype)
    matched = mapping >= 0
    np.add.at(out, mapping[matched], conf[matched])
    return out


def apply_mapping(pred: np.ndarray, mapping: list[int] | np.ndarray, unmatched: int) -> np.ndarray:
    """Relabel predicted ids to classes: pred (any shape, ids in [0, len(mapping))) ->
    same shape int64, with ``unmatched`` where mapping is -1."""
    table = np.asarray(mapping, dtype=np.int64).copy()
    pred = np.asarray(pred)
    if pred.size and (pred.min() < 0 or pred.max() >= table.size):
        raise EvalInputError(f"apply_mapping: predicted ids span [{pred.min()}, {pred.max()}] but mapping has {table.size} entries")
    table[table < 0] = unmatched
    return table[pred]


def _check_conf(conf: np.ndarray, name: str) -> np.ndarray:
    conf = np.asarray(conf)
    if conf.ndim != 2:
        raise EvalInputError(f"{name}: confusion matrix must be 2-D (n_pred, n_classes), got shape {conf.shape}")
    if conf.sum() <= 0:
        raise EvalInputError(f"{name}: confusion matrix counts no labelled pixel; is the split empty or all ignore?")
    return conf.astype(np.int64)


def _scores(class_conf: np.ndarray, class_pixels: np.ndarray, mapping: list[int]) -> Scores:
    """Scores from a (n_classes, n_classes) class-by-class matrix; class_pixels are the
    ground-truth pixel counts per class (including pixels of unmatched predictions)."""
    tp = np.diag(class_conf).astype(np.float64)
    fp = class_conf.sum(axis=1) - tp
    fn = class_pixels - tp
    n_pixels = int(class_pixels.sum())
    present = class_pixels > 0
    iou = np.full(len(tp), np.nan)
    iou[present] = tp[present] / (tp[present] + fp[present] + fn[present])
    return Scores(
        accuracy=float(tp.sum() / n_pixels),
        miou=float(iou[present].mean()),
        per_class_iou=[float(x) for x in iou],
        mapping=[int(m) for m in mapping],
        n_pixels=n_pixels,
    )


def hungarian_scores(conf: np.ndarray) -> Scores:
    """Unsupervised scores: match predicted ids to classes one-to-one maximising the
    matched pixels (Hungarian), then pixel accuracy and mean IoU over classes.

    conf: (n_pred, n_classes). With n_pred > n_classes the unmatched clusters' pixels
    count as wrong; with n_pred < n_classes unmatched classes get IoU 0 (if present).
    """
    conf = _check_conf(conf, "hungarian_scores")
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(conf.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return _scores(matched_confusion(conf, mapping), conf.sum(axis=0), mapping.tolist())


def direct_scores(conf: np.ndarray) -> Scores:
    """Scores with the identity mapping (linear probe). conf: (n_classes, n_classes)."""
    conf = _check_conf(conf, "direct_scores")
    if conf.shape[0] != conf.shape[1]:
        raise EvalInputError(f"direct_scores: confusion matrix must be square, got shape {conf.shape}")
    return _scores(conf, conf.sum(axis=0), list(range(conf.shape[0])))


class LinearProbe(nn.Module):
    """1x1 linear classifier on standardised codes: (B, C, h, w) -> (B, n_classes, h, w)."""

    def __init__(self, in_channels: int, n_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_channels, n_classes)
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("std", torch.ones(in_channels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, C) -> logits (N, n_classes)."""
        return self.linear((features - self.mean) / self.std)

    def predict_logits(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, C, h, w) -> logits (B, n_classes, h, w)."""
        if codes.ndim != 4 or codes.shape[1] != self.mean.numel():
            raise EvalInputError(
                f"LinearProbe.predict_logits: expected codes (B, {self.mean.numel()}, h, w), got {tuple(codes.shape)}"
            )
        flat = codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
        logits = self(flat.to(self.mean.dtype))
        b, _, h, w = codes.shape
        return logits.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    ignore_index: int,
    epochs: int = 30,
    lr: float = 1e-2,
    batch_size: int = 8192,
    seed: int = 0,
) -> LinearProbe:
    """Train a LinearProbe with minibatch Adam and cross-entropy.

    features: (N, C) float; labels: (N,) long, values in [0, n_classes) or ignore_index.
    Ignore pixels are dropped before anything else. Weights start at zero and batches
    are shuffled with a generator seeded by ``seed``, so the result is deterministic.
    """
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise EvalInputError(
            f"fit_linear_probe: need features (N, C) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    keep = labels != ignore_index
    x = features[keep].float()
    y = labels[keep].long()
    if y.numel() == 0:
        raise EvalInputError("fit_linear_probe: every label is ignore_index; no pixel to train on")
    if y.min() < 0 or y.max() >= n_classes:
        raise EvalInputError(
            f"fit_linear_probe: labels span [{int(y.min())}, {int(y.max())}] but must be in [0, {n_classes}) "
            f"or equal ignore_index={ignore_index}"
        )
    probe = LinearProbe(x.shape[1], n_classes).to(x.device)
    nn.init.zeros_(probe.linear.weight)
    nn.init.zeros_(probe.linear.bias)
    probe.mean.copy_(x.mean(dim=0))
    probe.std.copy_(x.std(dim=0, unbiased=False).clamp_min(1e-6))
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(y.numel(), generator=generator).to(x.device)
        for start in range(0, y.numel(), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe.eval()


def cluster_probs(codes: torch.Tensor, centroids: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Soft cluster assignment: softmax over clusters of cos(code, centroid) / temperature.

    codes (B, C, H, W), centroids (K, C) -> probabilities (B, K, H, W) summing to 1 over K.
    """
    if codes.ndim != 4 or centroids.ndim != 2 or codes.shape[1] != centroids.shape[1]:
        raise EvalInputError(
            f"cluster_probs: need codes (B, C, H, W) and centroids (K, C) with the same C, "
            f"got {tuple(codes.shape)} and {tuple(centroids.shape)}"
        )
    if temperature <= 0:
        raise EvalInputError(f"cluster_probs: temperature must be > 0, got {temperature}")
    cos = torch.einsum(
        "bchw,kc->bkhw", F.normalize(codes, dim=1), F.normalize(centroids.to(codes.dtype), dim=1)
    )
    return torch.softmax(cos / temperature, dim=1)


# --------------------------------------------------------------------------- retrieval (k-means segments + kNN vote)


def upsample_nearest(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of an id map (..., h, w) -> (..., H, W) by pixel centres:
    output pixel (y, x) reads input (floor((y + 0.5) h / H), floor((x + 0.5) w / W)).
    Exact integer arithmetic; equal to ``F.interpolate(mode="nearest-exact")``."""
    ids = np.asarray(ids)
    h, w = ids.shape[-2:]
    big_h, big_w = size
    rows = ((2 * np.arange(big_h) + 1) * h) // (2 * big_h)
    cols = ((2 * np.arange(big_w) + 1) * w) // (2 * big_w)
    return ids[..., rows[:, None], cols[None, :]]


def segment_majority_labels(
    segment_ids, label, n_segments: int, n_classes: int, ignore_index: int
) -> np.ndarray:
    """Majority class of the labelled pixels of each segment.

    segment_ids: integer (h, w) in [0, n_segments), at feature resolution or already at the
    label's resolution; label: integer (H, W). Both may carry the same leading batch dims,
    e.g. (B, h, w) and (B, H, W) with ids numbered across the batch (``batch_segment_ids``).
    The id map is brought to (H, W) with :func:`upsample_nearest` (pixel centres) before counting.
    Pixels whose label equals ``ignore_index`` or lies outside [0, n_classes) never count.
    Returns int64 (n_segments,): the most frequent class (ties: the lowest class), or -1 where
    a segment has no valid labelled pixel.
    """
    ids = np.asarray(segment_ids)
    label = np.asarray(label)
    if ids.ndim < 2 or ids.shape[:-2] != label.shape[:-2] or label.ndim != ids.ndim:
        raise EvalInputError(
            f"segment_majority_labels: segment_ids {ids.shape} and label {label.shape} must both be (..., h, w) "
            "with the same leading dims"
        )
    if ids.shape[-2:] != label.shape[-2:]:
        ids = upsample_nearest(ids, label.shape[-2:])
    ids = ids.reshape(-1).astype(np.int64)
    target = label.reshape(-1).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_segments):
        raise EvalInputError(f"segment_majority_labels: ids span [{ids.min()}, {ids.max()}] outside [0, {n_segments})")
    keep = (target != ignore_index) & (target >= 0) & (target < n_classes)
    counts = np.bincount(ids[keep] * n_classes + target[keep], minlength=n_segments * n_classes)
    counts = counts.reshape(n_segments, n_classes)
    majority = counts.argmax(1).astype(np.int64)
    majority[counts.sum(1) == 0] = -1
    return majority


def knn_vote(
    query, keys, key_labels, k: int, n_classes: int, max_elements: int = 1 << 24
) -> torch.Tensor:
    """k-nearest-neighbour class vote by cosine similarity.

    query: (Q, D) unit vectors; keys: (P, D) unit vectors; key_labels: (P,) ints in [0, n_classes).
    Returns float32 (Q, n_classes): for each query, the fraction of its k nearest keys (largest
    dot product) in each class; rows sum to 1. k is capped at P; P must be > 0.

    Exact brute force: queries go in chunks of about ``max_elements / P`` rows (at least one), so
    the similarity block in memory is chunk x P (64 MiB by default), one matmul + topk per chunk.
    That is fine for the ~1e5-1e6 prototypes of a training split (cost Q x P x D multiply-adds);
    far larger indexes would want an approximate index (faiss) instead.
    """
    query = torch.as_tensor(query).float()
    keys = torch.as_tensor(keys).float()
    key_labels = torch.as_tensor(key_labels).long()
    if query.ndim != 2 or keys.ndim != 2 or query.shape[1] != keys.shape[1] or key_labels.shape != keys.shape[:1]:
        raise EvalInputError(
            f"knn_vote: need query (Q, D), keys (P, D) and key_labels (P,), got {tuple(query.shape)}, "
            f"{tuple(keys.shape)} and {tuple(key_labels.shape)}"
        )
    if keys.shape[0] == 0:
        raise EvalInputError("knn_vote: the index has no keys (no labelled prototype to vote)")
    if k < 1:
        raise EvalInputError(f"knn_vote: k must be >= 1, got {k}")
    if key_labels.min() < 0 or key_labels.max() >= n_classes:
        raise EvalInputError(
            f"knn_vote: key labels span [{int(key_labels.min())}, {int(key_labels.max())}] outside [0, {n_classes})"
        )
    n_keys = keys.shape[0]
    k = min(k, n_keys)
    chunk = max(1, max_elements // n_keys)
    out = torch.zeros(query.shape[0], n_classes)
    for start in range(0, query.shape[0], chunk):
        sims = query[start : start + chunk] @ keys.T  # (chunk, P)
        nearest = sims.topk(k, dim=1).indices  # (chunk, k)
        votes = out[start : start + chunk]
        votes.scatter_add_(1, key_labels[nearest], torch.ones(nearest.shape))
    return out / k
