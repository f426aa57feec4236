"""SegSort and visual concepts: the maths in plain PyTorch / NumPy (METHODS.md sections 3 and 4).

Notation: N pixels (locations of the embedding map) with unit embeddings e (N, D); S
segments with unit prototypes mu (S, D) (normalised mean embedding, see
:func:`raysseg.core.segments.segment_prototypes`); a dictionary of K unit concept vectors
C (K, D). Similarities are exp(kappa * cos) (a vMF with shared concentration kappa).

Readings of what the papers leave open:

- SegSort segments are pixel-sorting clusters intersected with the pseudo segments of
  the oversegmentation. Following METHODS.md, a pixel's only positive is its own
  segment; every other segment of the worker's batch and of the memory bank (the last
  ``segsort.memory_batches`` global batches, held by the concept bank) is a negative.
- Local concepts: segments are the pseudo segments seen in each of two augmented views.
  A pixel's positives are the prototypes of its pseudo segment in both views; every
  other segment (both views, memory bank) is a negative. Same loss function as SegSort
  (:func:`segment_sort_loss`) with the pseudo segment as the label.
- Global concepts: prototypes are vector-quantised to the nearest concept (cosine on the
  sphere). The dictionary is owned by the concept-bank actor and learned by exponential
  moving averages of the prototypes assigned to each concept (the EMA form of the VQ
  codebook loss, van den Oord et al. 2017, appendix), so every worker reads the same
  version and no optimizer state is duplicated. The gradient side is the commitment term
  beta * ||mu - sg[c]||^2 plus a pull of each pixel toward its segment's concept
  (1 - cosine; see :func:`concept_pull_loss` for why there is no push away from the others).
- Co-occurrence: the bank keeps EMA counts of concept pairs present in the same image.
  "Often co-occur" is read as more often than chance: the weight of a pair is its positive
  pointwise mutual information from those counts (:func:`cooccurrence_weights`; the
  diagonal is zero: same concept is the global term's job). Each pixel's target over the
  segments of the batch and memory is proportional to the weight of their concept with
  its own; the loss is the cross-entropy of softmax(kappa * e . mu) against that target.
  Pixels with no co-occurring segment present contribute nothing. Raw counts instead of
  PMI pull everything toward everything once a few concepts dominate (we saw the
  dictionary collapse to a handful of concepts on CamVid); PMI is zero for such pairs.
- ``concepts.warmup``: steps during which only the local-concept term trains (the
  dictionary is still updated), so a randomly initialised network first learns local
  structure before concepts pull its embeddings together.
"""
from __future__ import annotations

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysseg.core.precision import at_least_fp32, exact_fp32

DEAD_COUNT = 0.01  # EMA assignment count below which a concept is restarted from a current prototype


class EmbeddingHead(nn.Module):
    """Backbone features (B, C, h, w) -> pixel embeddings (B, D, h, w), unnormalised."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, 3, padding=1, bias=False), nn.BatchNorm2d(in_dim), nn.ReLU(inplace=True),
            nn.Conv2d(in_dim, embed_dim, 1),
        )

    def forward(self, feats: Tensor) -> Tensor:
        return self.net(feats)

    def embed(self, feats: Tensor, rgb: Tensor) -> Tensor:
        """The Segmenter's head interface (``rgb`` unused)."""
        return self(feats)


def segment_sort_loss(emb: Tensor, pixel_label: Tensor, protos: Tensor, proto_label: Tensor,
                      kappa: float) -> Tensor:
    """vMF segment sorting: -log( sum_{s in P(i)} exp(kappa e_i.mu_s) / sum_s exp(kappa e_i.mu_s) ),
    averaged over pixels, where P(i) = {s : proto_label[s] == pixel_label[i]}.

    emb (N, D) unit; pixel_label (N,) int; protos (S, D) unit; proto_label (S,) int (use -1 for
    memory-bank prototypes, which are only negatives). Pixels without a positive are left out.
    Returns a scalar (0 when no pixel has a positive)."""
    logits = at_least_fp32((kappa * emb) @ protos.T)  # (N, S): kappa on the small side; fp32 logsumexps
    pos = pixel_label[:, None] == proto_label[None, :]
    has = pos.any(1)
    if not bool(has.any()):
        return emb.sum() * 0
    logits, pos = logits[has], pos[has]
    return (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos, float("-inf")), 1)).mean()


def quantize(protos: Tensor, dictionary: Tensor) -> Tensor:
    """Nearest concept of each prototype: protos (S, D), dictionary (K, D), both unit -> (S,) int64.
    On the sphere the largest cosine is the smallest Euclidean distance."""
    with exact_fp32():  # a decision: fp32 whatever the run's precision
        return (protos.float() @ dictionary.float().T).argmax(1)


def vq_loss(protos: Tensor, dictionary: Tensor, index: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """VQ loss of prototypes against their concepts: ||sg[mu] - c||^2 + beta ||mu - sg[c]||^2.

    protos (S, D), dictionary (K, D), index (S,) = assigned concept. Returns (total, commitment),
    both means over segments. With the EMA dictionary (a buffer) only the commitment term has a
    gradient; the codebook term is reported for monitoring."""
    c = dictionary[index]
    codebook = ((protos.detach() - c) ** 2).sum(1).mean()
    commitment = ((protos - c.detach()) ** 2).sum(1).mean()
    return codebook + beta * commitment, commitment


def concept_pull_loss(emb: Tensor, pixel_concept: Tensor, dictionary: Tensor) -> Tensor:
    """Pixels toward their segment's concept: mean of 1 - cos(e_i, c_{k_i}).

    emb (N, D) unit, pixel_concept (N,) int64, dictionary (K, D) unit -> scalar. Attraction only:
    a softmax over all concepts would also push every pixel away from the dictionary's mass,
    the same direction for all pixels while the concepts are still bunched together, and on
    CamVid that collapsed the embeddings onto a handful of concepts within an epoch."""
    return (1 - (emb * dictionary[pixel_concept]).sum(1)).mean()


def cooccurrence_weights(counts: Tensor) -> Tensor:
    """Positive pointwise mutual information of concept pairs.

    counts (K, K) symmetric pair counts (diagonal ignored) -> weights (K, K) =
    max(0, log(P(a, b) / E(a, b))), zero on the diagonal and wherever a pair was never seen, with
    P(a, b) = counts / total, P(a) = row sums / total and the chance level of a pair of distinct
    concepts E(a, b) = P(a) P(b) / (1 - sum_c P(c)^2). Concepts that co-occur with everything
    equally get zero."""
    a = counts.clone()
    a.fill_diagonal_(0)
    total = a.sum()
    if total <= 0:
        return torch.zeros_like(a)
    marginal = a.sum(1) / total
    joint = a / total
    chance = marginal[:, None] * marginal[None, :] / (1 - (marginal ** 2).sum()).clamp_min(1e-12)
    pmi = torch.log(joint.clamp_min(1e-30) / chance.clamp_min(1e-30))
    return torch.where(a > 0, pmi.clamp_min(0), torch.zeros_like(a))


def cooccurrence_loss(emb: Tensor, pixel_concept: Tensor, protos: Tensor, proto_concept: Tensor,
                      weights: Tensor, kappa: float) -> Tensor:
    """Attract pixels to segments whose concepts often co-occur with their own.

    Target w_is = W[k_i, k_s] / sum_t W[k_i, k_t] with W = ``weights`` (K, K), e.g.
    :func:`cooccurrence_weights`; loss_i = -sum_s w_is log softmax_s(kappa e_i.mu_s), averaged over
    pixels whose target is defined. emb (N, D); pixel_concept (N,); protos (S, D); proto_concept (S,)
    -> scalar."""
    w = weights[pixel_concept][:, proto_concept]  # (N, S)
    total = w.sum(1)
    has = total > 0
    if not bool(has.any()):
        return emb.sum() * 0
    w = w[has] / total[has, None]
    logp = torch.log_softmax(at_least_fp32((kappa * emb[has]) @ protos.T), 1)
    return -(w * logp).sum(1).mean()


# ------------------------------------------------------------------ dictionary state (held by the bank actor)


def init_dictionary(k: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    """A fresh dictionary state: random unit concepts, zero EMA statistics, co-occurrence and idle steps."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((k, dim)).astype(np.float32)
    return {"concepts": c / np.linalg.norm(c, axis=1, keepdims=True),
            "ema_counts": np.zeros(k, np.float32), "ema_sums": np.zeros((k, dim), np.float32),
            "cooccurrence": np.zeros((k, k), np.float32), "idle_steps": np.zeros(k, np.float32)}


def concept_statistics(protos: np.ndarray, index: np.ndarray, image: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """One worker's contribution to a dictionary update.

    protos (S, D) unit prototypes, index (S,) their concepts, image (S,) their image in the batch.
    Returns sums (K, D), counts (K,), pairs (K, K) = number of images in which both concepts
    appear (a != b), and the prototypes themselves (candidates for restarting dead concepts)."""
    sums = np.zeros((k, protos.shape[1]), np.float32)
    np.add.at(sums, index, protos)
    counts = np.bincount(index, minlength=k).astype(np.float32)
    present = np.zeros((int(image.max()) + 1 if len(image) else 0, k), np.float32)
    present[image, index] = 1.0
    pairs = present.T @ present
    np.fill_diagonal(pairs, 0)
    return {"sums": sums, "counts": counts, "pairs": pairs, "candidates": protos.astype(np.float32)}


def update_dictionary(state: dict[str, np.ndarray], stats: list[dict[str, np.ndarray]], decay: float,
                      rng: np.random.Generator, restart_after: int = 0) -> dict[str, np.ndarray]:
    """One EMA step of the dictionary from every worker's :func:`concept_statistics` (in rank order).

    ema_counts <- decay * ema_counts + (1 - decay) * counts (same for ema_sums and the
    co-occurrence counts); each concept is its normalised ema_sums; idle_steps counts the updates
    since a concept's last assignment. Dead concepts restart at a random current prototype:

    - ``restart_after`` = R > 0: dead = no assignment in the last R + 1 updates, or never assigned;
      a restart has the weight of one assignment (ema count 1 - decay, ema sums (1 - decay) * prototype),
      so its first real assignments move it.
    - R = 0, the original rule: dead = ema count below ``DEAD_COUNT``; a restart has ema count 1.0
      (the weight of 1 / (1 - decay) assignments, 100 at decay 0.99), so a restarted concept stays at
      its prototype and counts as alive for ~460 idle steps at decay 0.99, longer than a 3-epoch
      CamVid run (138 steps): no restart fires after the first step.

    Pure: returns a new state."""
    counts = sum(s["counts"] for s in stats)
    sums = sum(s["sums"] for s in stats)
    pairs = sum(s["pairs"] for s in stats)
    ema_counts = decay * state["ema_counts"] + (1 - decay) * counts
    ema_sums = decay * state["ema_sums"] + (1 - decay) * sums
    cooccurrence = decay * state["cooccurrence"] + (1 - decay) * pairs
    idle = np.where(counts > 0, 0.0, state.get("idle_steps", np.zeros_like(counts)) + 1)  # old checkpoints lack it
    concepts = state["concepts"].copy()
    if restart_after > 0:
        weight, live = 1 - decay, (idle <= restart_after) & (ema_counts > 0)
    else:
        weight, live = 1.0, ema_counts >= DEAD_COUNT
    norms = np.linalg.norm(ema_sums[live], axis=1, keepdims=True)
    concepts[live] = ema_sums[live] / np.maximum(norms, 1e-12)
    dead = np.flatnonzero(~live)
    candidates = np.concatenate([s["candidates"] for s in stats])
    if len(dead) and len(candidates):
        pick = rng.choice(len(candidates), len(dead), replace=len(candidates) < len(dead))
        concepts[dead] = candidates[pick]
        ema_sums[dead] = weight * candidates[pick]
        ema_counts[dead] = weight
        idle[dead] = 0
    return {"concepts": concepts.astype(np.float32), "ema_counts": ema_counts.astype(np.float32),
            "ema_sums": ema_sums.astype(np.float32), "cooccurrence": cooccurrence.astype(np.float32),
            "idle_steps": idle.astype(np.float32)}
