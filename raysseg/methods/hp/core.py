"""Hidden Positives (HP) core: selection, losses and heads in plain PyTorch.

Implements METHODS.md section 1 / hidden-positives.txt. Notation: a local batch of B
images gives N = B*h*w patches; f = frozen backbone features (C dims), s = codes of
the segmentation head (K dims), z = projected, L2-normalised codes.

Readings of details the paper leaves open (each checked against METHODS.md):

- GHP loss. Both GHP sets are folded into one supervised-contrastive term with
  positive weights w = m_ag + lambda*m_sp; P_i = {j : w_ij > 0}; one negative set
  per anchor, sampled among patches that are in neither positive set. The anchor
  weighting by |P_i| (mean 1 over kept anchors) cancels the 1/|P_i| of the SupCon
  mean, so the loss equals exactly
      (tau/0.07) * sum_ij w_ij * (-log p_ij) / sum_i |P_i|,
  which is what lets it be summed over anchor chunks without a second pass.
- Local term (Psi). METHODS says the same contrastive loss is "applied to Z(s_mix)":
  the released code puts mixed codes on both sides (anchor z_mix_i against z_mix_p and
  z_mix_n); that is the default (`mixed_contrast=True`). The paper's Eq. 10 read
  literally mixes only the anchor (z_mix_i against plain z_p, z_n); that is
  `mixed_contrast=False` (the `anchors=` argument of the losses). Positive and
  negative sets are the GHP ones.
- |N_i| in s_mix_i = sum_j a_ij s_j / |N_i| is the size of the 3x3 window of i inside
  the image (9 inside, 6 on an edge, 4 in a corner), as in the released code; the
  paper writes |I_i^local| (only the above-mean neighbours).
- Selection uses clean (no dropout) backbone features and EMA codes; the heads see
  Dropout2d(0.1) features during training.
- Negatives are Bernoulli(rho) per candidate pair, so an anchor keeps a rho fraction
  of its candidates in expectation.
- Precision: under bf16/fp16 autocast the heads and the contrastive products run in the
  low precision, but the selection (criteria, masks, negatives, the local weights'
  thresholds) runs in exact fp32 (`exact_fp32`: no autocast, no TF32), and the logits are
  cast to fp32 before the logsumexp and the weighted sums. The released code selects under
  fp16 autocast, which flips 2-3.6% of the positives of identical inputs.

Memory (N patches, M pool size, chunk rows at a time):
- selection: each positive mask and the negative mask is one N x N bool (N^2 bytes);
  HPModel.loss holds at most four (m_ag, m_sp, their union, negatives) while sampling,
  three during the loss. Float work is chunk x max(N, M).
- loss: forward and backward work one anchor chunk (or image) at a time; from N^2 >= CHECKPOINT_PAIRS
  (2^24: 64 MB per float N x N) torch.utils.checkpoint recomputes each chunk's logits in backward, so
  float activations are a few chunk x N buffers; what stays alive for backward is z, the anchors and
  views of the masks, and nothing float is N x N. Below it the chunks' logits are kept (a few float
  N x N, under 64 MB each) and not computed twice. Gradients are N x K.
- local term: attention weights are B x n x n float with n = h*w (per image, not per
  batch).
So peak memory grows with N^2 bytes (the bool masks) plus ~6 * 4 * chunk * N bytes.

Loss forms (``hp.loss_form``). ``paper`` (the default) is everything above. ``released``
follows the authors' released code, which produced the paper's numbers, in seven documented
points (each a branch below, named "released (k)"; benchmarks/parity/hp.py runs both side by side):
  (1) total = mean over images b of (GHP_b + LHP_b) / 2, plus alpha R outside the mean;
  (2) each image's term is sum_ij w_ij (-log p_ij) / sum_ij w_ij over its kept anchors
      (normalised by the positive weights within the image, not by sum |P_i| over the batch);
  (3) an anchor is kept only when it has a task-agnostic positive;
  (4) the denominator of anchor i is P_ag(i) plus one random [n, N] mask (Bernoulli(rho),
      n = h*w) shared by every image of the batch, minus i itself; a positive found only in
      the task-specific set is in the numerator, and in the denominator only if the random
      mask draws it;
  (5) dropout: every use draws its own Dropout2d(0.1) sample (:meth:`HPModel.released_loss`
      lists them): each branch of the head and of the EMA head, the selection features, the
      EMA codes, the mixed codes; the reference pools are built from such dropped-out rows
      (:meth:`HPModel.released_pool_rows`) and each Q_sp renewal takes new random patches
      (the trainer). Selection (both positive sets) uses these dropped-out features and codes;
  (6) lambda = (t - w) / (T - w) (:func:`lambda_released`); Q_sp is renewed every N
      iterations counted within each epoch, skipping iteration 0
      (:func:`released_sp_version`); the projection head is optimised without weight decay
      or gradient clipping (the trainer's parameter groups);
  (7) the EMA head is updated with the weights before the optimiser step (the trainer).
With the same tensors, (1) alone doubles alpha's relative weight. Two things are not copied.
fp16: the released code selects under fp16 autocast, stores the pools normalised in fp16 (row norms
1 +- 5e-4) and keeps the positive weights w = m_ag + lambda m_sp in fp16 (lambda = 0.3 becomes 0.29980:
2e-5 relative in the loss and 1e-4 in the head gradients on the parity case; nothing for lambda a
multiple of 1/4 there); here selection, pools and weights are exact fp32. These move the loss far less
than one dropout draw does, so they do not change numbers users compare. NaN: the released code
computes log-probabilities for every anchor before dropping those without a task-agnostic positive,
so an anchor whose random mask row is also empty has log(0) in its denominator and makes the
gradients NaN (0 * inf in the backward of the dropped row); here only kept anchors are computed
(their denominator holds P_ag(i), never empty), so the loss and gradients stay finite.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from raysseg.core.exact_select import exact_row_max, exact_select, mask_any
from raysseg.core.precision import at_least_fp32, exact_fp32

BASE_TEMPERATURE = 0.07  # the released code multiplies the loss by tau / 0.07
LOSS_FORMS = ("paper", "released")  # hp.loss_form: the paper's text, or the authors' released code
# hp.selection: how the products of the selection are computed: exact fp32, or an exact_select scheme's fast
# products with the fp32 re-check near the thresholds
SELECTIONS = {"fp32": None, "bf16_recheck": "bf16", "bf16x3_recheck": "bf16x3", "fp16_recheck": "fp16"}


class HPInputError(ValueError):
    """Bad input to an HP function; the message names the function, field and fix."""


def _fail(where: str, message: str) -> None:
    raise HPInputError(f"hp_core.{where}: {message}")


def _check_2d(where: str, name: str, x: Tensor, dim: int | None = None) -> None:
    if x.dim() != 2:
        _fail(where, f"{name} must be 2-D [rows, dims], got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        _fail(where, f"{name} has {x.shape[1]} dims but the features have {dim}; "
                     "build the pool from the same backbone/head")


def _check_unit(where: str, name: str, x: Tensor) -> None:
    # F.normalize gives unit rows, or zero rows for zero input; non-finite rows come from a
    # diverged model and must reach the loss, whose NaN check stops the run with a clear message
    norms = x.detach().float().norm(dim=1)
    wrong = torch.isfinite(norms) & ((norms - 1).abs() > 1e-3) & (norms != 0)
    if wrong.any():
        _fail(where, f"{name} rows must be L2-normalised; apply F.normalize(x, dim=1) first")


def _check_chunk(where: str, chunk: int) -> None:
    if not isinstance(chunk, int) or chunk < 1:
        _fail(where, f"chunk must be a positive int, got {chunk!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- selection


@torch.no_grad()
def anchor_criterion(feats: Tensor, pool: Tensor, chunk: int, selection: str = "fp32",
                     stats: dict | None = None) -> Tensor:
    """c_i = max_m cos(pool_m, f_i). feats [N, C], pool [M, C], both L2-normalised -> [N].
    selection "bf16_recheck" / "bf16x3_recheck" / "fp16_recheck": fast products (one bf16 pass, three, or one fp16
    pass), fp32 re-check near the maximum (core/exact_select.py), equal bit for bit; ``stats`` gets its "pairs"
    and "rechecked" added."""
    _check_2d("anchor_criterion", "feats", feats)
    _check_2d("anchor_criterion", "pool", pool, feats.shape[1])
    _check_chunk("anchor_criterion", chunk)
    if pool.shape[0] == 0:
        _fail("anchor_criterion", "pool is empty; build the reference pool before training")
    _check_unit("anchor_criterion", "feats", feats)
    _check_unit("anchor_criterion", "pool", pool)
    f, q = feats.float(), pool.float()
    if selection not in SELECTIONS:
        _fail("anchor_criterion", f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if SELECTIONS[selection]:
        return exact_row_max(f, q, chunk, SELECTIONS[selection], stats=stats)
    with exact_fp32():  # thresholds of a decision: fp32 whatever the caller's autocast
        return torch.cat([(f[i:i + chunk] @ q.T).amax(dim=1) for i in range(0, f.shape[0], chunk)])


@torch.no_grad()
def hidden_positive_mask(feats: Tensor, pool: Tensor, chunk: int, selection: str = "fp32",
                         stats: dict | None = None) -> Tensor:
    """Global hidden positives: (i, j) iff cos(f_i, f_j) > c_i or > c_j, i != j.

    feats [N, C] and pool [M, C] L2-normalised -> bool [N, N]. Built chunk rows at a
    time, so the float work is chunk x N; in exact fp32 even inside an autocast region.
    selection "bf16_recheck" / "bf16x3_recheck" / "fp16_recheck": the same mask from fast products and
    an fp32 re-check of the pairs near their thresholds (:func:`raysseg.core.exact_select.exact_select`), whose
    "pairs" and "rechecked" (the criterion's and the mask's) are added to ``stats``.
    """
    crit = anchor_criterion(feats, pool, chunk, selection, stats)
    f = feats.float()
    n = f.shape[0]
    if SELECTIONS[selection]:
        mask = exact_select(f, f, crit, crit, chunk=chunk, scheme=SELECTIONS[selection], stats=stats)
        mask.fill_diagonal_(False)
        return mask
    mask = torch.empty(n, n, dtype=torch.bool, device=f.device)
    with exact_fp32():
        for i in range(0, n, chunk):
            sim = f[i:i + chunk] @ f.T
            torch.logical_or(sim > crit[i:i + chunk, None], sim > crit[None, :], out=mask[i:i + chunk])
    mask.fill_diagonal_(False)
    return mask


@torch.no_grad()
def sample_negatives(positive_any: Tensor, rho: float, generator: torch.Generator | None,
                     chunk: int = 1024) -> Tensor:
    """Each anchor keeps each non-positive, non-self patch with probability rho.

    positive_any bool [N, N] (union of the positive sets) -> bool [N, N]. Random numbers
    are drawn chunk rows at a time from `generator` (same device as the mask).
    """
    if positive_any.dim() != 2 or positive_any.shape[0] != positive_any.shape[1]:
        _fail("sample_negatives", f"positive_any must be square [N, N], got {tuple(positive_any.shape)}")
    if positive_any.dtype != torch.bool:
        _fail("sample_negatives", f"positive_any must be a bool mask, got {positive_any.dtype}")
    if not 0.0 <= rho <= 1.0:
        _fail("sample_negatives", f"rho must be a fraction in [0, 1], got {rho} (2% is rho=0.02)")
    _check_chunk("sample_negatives", chunk)
    if generator is not None and generator.device.type != positive_any.device.type:
        _fail("sample_negatives", f"generator is on {generator.device} but the masks are on "
                                  f"{positive_any.device}; create torch.Generator(device=...) on the mask's device")
    n = positive_any.shape[0]
    neg = torch.empty_like(positive_any)
    for i in range(0, n, chunk):
        rows = positive_any[i:i + chunk]
        keep = torch.rand(rows.shape, generator=generator, device=rows.device) < rho
        torch.logical_and(keep, ~rows, out=neg[i:i + chunk])
    neg.fill_diagonal_(False)
    return neg


def _recheck_stats(selected: dict) -> dict[str, float]:
    """A low-precision selection's share of pairs re-checked in fp32, and the GB its re-check gathers (rows and
    columns written out for the batched GEMMs, which read them again); empty for the fp32 selection."""
    if not selected:
        return {}
    return {"recheck_frac": selected["rechecked"] / selected["pairs"],
            "recheck_gathered_gb": 4 * selected.get("gathered", 0) / 1e9}


def _union_count(a: Tensor, b: Tensor | None, chunk: int) -> int:
    """How many entries of bool [N, M] masks a | b are set, chunk rows at a time (no third [N, M] mask)."""
    if b is None:
        return int(torch.count_nonzero(a))
    return sum(int(torch.count_nonzero(a[i:i + chunk] | b[i:i + chunk])) for i in range(0, a.shape[0], chunk))


# ----------------------------------------------------------------------------- contrastive loss


def _weights(parts: tuple[Tensor, ...], coefs: tuple[float, ...]) -> Tensor:
    return sum(c * p.to(torch.float32) for c, p in zip(coefs, parts))


def _chunk_nll_sum(anchors: Tensor, z: Tensor, neg: Tensor, *parts: Tensor,
                   coefs: tuple[float, ...], tau: float) -> Tensor:
    """sum_{i in chunk, j} w_ij * (logsumexp_{n in N_i u P_i} l_in - l_ij), l = a.z/tau."""
    w = _weights(parts, coefs)
    pos = w > 0
    # Rows without positives get a full (finite) denominator; their w = 0 removes them.
    denom = pos | neg | ~mask_any(pos, 1)[:, None]
    return weighted_nll_sum(anchors, z, w, denom, tau)


def weighted_nll_sum(anchors: Tensor, z: Tensor, w: Tensor, denom: Tensor, tau: float) -> Tensor:
    """sum_ij w_ij * (logsumexp_{k : denom_ik} l_ik - l_ij), l = a.z / tau, with its gradient in closed form.

    anchors [r, D], z [N, D]; w float [r, N] (>= 0; an entry outside denom still counts its -l_ij);
    denom bool [r, N] with a True in every row -> scalar. Under autocast the product is bf16/fp16 and
    everything after it fp32 (float64 inputs stay float64). The forward's values are those of
    ``(w * (logits.masked_fill(~denom, -inf).logsumexp(1, keepdim=True) - logits)).sum()`` bit for bit;
    the backward uses dS/dl_ik = W_i p_ik - w_ik (W_i = sum_j w_ij, p the softmax over denom_i) from the
    exponentials kept in forward, instead of autograd's chain through masked_fill, logsumexp and the
    weighted difference (about half the [r, N] passes, and no exponential computed twice)."""
    return _WeightedNLLSum.apply(anchors, z, w, denom, tau)


class _WeightedNLLSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors: Tensor, z: Tensor, w: Tensor, denom: Tensor, tau: float) -> Tensor:
        product = anchors @ z.T  # under autocast the product is bf16/fp16; the softmax sums are fp32
        logits = at_least_fp32(product) / tau
        # torch.logsumexp's own steps (amax, infinite maxima set to 0, exp of the shifted row, sum, log + max)
        masked = logits.masked_fill(~denom, float("-inf"))
        shift = masked.amax(dim=1, keepdim=True)
        shift.masked_fill_(shift.abs() == float("inf"), 0)
        exps = masked.sub_(shift).exp_()
        sums = exps.sum(dim=1, keepdim=True)
        lse = sums.log().add_(shift)
        ctx.save_for_backward(anchors, z, w, exps, sums)
        ctx.tau, ctx.product_dtype = tau, product.dtype
        return (w * (lse - logits)).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        anchors, z, w, exps, sums = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            scale = w.sum(dim=1, keepdim=True, dtype=sums.dtype).div_(sums)
            d_logits = (exps * scale).sub_(w).mul_(grad / ctx.tau)  # dS/dl, then through l = product / tau
            d_product = d_logits.to(ctx.product_dtype)
            d_anchors = d_z = None
            if ctx.needs_input_grad[0]:
                d_anchors = (d_product @ z.to(ctx.product_dtype)).to(anchors.dtype)
            if ctx.needs_input_grad[1]:
                d_z = (d_product.T @ anchors.to(ctx.product_dtype)).to(z.dtype)
        return d_anchors, d_z, None, None, None


@torch.no_grad()
def _positive_counts(parts: tuple[Tensor, ...], coefs: tuple[float, ...], chunk: int) -> Tensor:
    n = parts[0].shape[0]
    return torch.cat([(_weights(tuple(p[i:i + chunk] for p in parts), coefs) > 0).sum(dim=1)
                      for i in range(0, n, chunk)])


CHECKPOINT_PAIRS = 1 << 24  # from this many N x N pairs the contrastive logits are recomputed in backward


def _checkpointed(z: Tensor, anchors: Tensor) -> bool:
    """Whether the contrastive loss over z [N, D] recomputes its logits in backward (module docstring)."""
    needs_grad = torch.is_grad_enabled() and (z.requires_grad or anchors.requires_grad)
    return needs_grad and z.shape[0] * anchors.shape[0] >= CHECKPOINT_PAIRS


def _supcon(where: str, z: Tensor, parts: tuple[Tensor, ...], coefs: tuple[float, ...],
            neg_mask: Tensor, tau: float, chunk: int, anchors: Tensor | None) -> tuple[Tensor, Tensor]:
    """Chunked, checkpointed weighted SupCon; returns (loss, |P_i| per anchor [N])."""
    _check_2d(where, "z", z)
    n = z.shape[0]
    a = z if anchors is None else anchors
    if a.shape != z.shape:
        _fail(where, f"anchors shape {tuple(a.shape)} must equal z shape {tuple(z.shape)}")
    for name, m in [("neg_mask", neg_mask)] + [(f"positive set {k}", p) for k, p in enumerate(parts)]:
        if m.shape != (n, n):
            _fail(where, f"{name} must be [N, N] = [{n}, {n}], got {tuple(m.shape)}")
        if m.diagonal().any():
            _fail(where, f"{name} has self-pairs on its diagonal; clear them with fill_diagonal_")
    if neg_mask.dtype != torch.bool:
        _fail(where, f"neg_mask must be bool, got {neg_mask.dtype}")
    if tau <= 0:
        _fail(where, f"tau must be > 0, got {tau}")
    _check_chunk(where, chunk)

    counts = _positive_counts(parts, coefs, chunk)
    total_pos = int(counts.sum())
    if total_pos == 0:
        return z.sum() * 0 + a.sum() * 0, counts
    use_ckpt = _checkpointed(z, a)
    pieces = []
    for i in range(0, n, chunk):
        args = (a[i:i + chunk], z, neg_mask[i:i + chunk], *(p[i:i + chunk] for p in parts))
        if use_ckpt:
            pieces.append(checkpoint(_chunk_nll_sum, *args, coefs=coefs, tau=tau, use_reentrant=False))
        else:
            pieces.append(_chunk_nll_sum(*args, coefs=coefs, tau=tau))
    loss = torch.stack(pieces).sum() / total_pos * (tau / BASE_TEMPERATURE)
    return loss, counts


def weighted_supcon_loss(z: Tensor, pos_weight: Tensor, neg_mask: Tensor, tau: float, chunk: int,
                         anchors: Tensor | None = None) -> Tensor:
    """Weighted supervised-contrastive loss over anchor chunks.

    z [N, D] L2-normalised; pos_weight [N, N] >= 0 (w = m_ag + lambda*m_sp; bool ok);
    neg_mask bool [N, N]; anchors [N, D] (default z). For anchor i, a_i = anchors[i]:
      L_i = -1/|P_i| sum_p w_ip log( exp(a_i.z_p/tau) / sum_{n in N_i u P_i} exp(a_i.z_n/tau) ),
    P_i = {j: w_ij > 0}. Anchors without positives are dropped, the rest weighted by
    |P_i| / mean|P|; result = (tau/0.07) * mean over kept anchors. Returns a scalar
    (0 with the graph intact if no anchor has a positive).
    """
    if pos_weight.dtype != torch.bool and bool((pos_weight < 0).any()):
        _fail("weighted_supcon_loss", "pos_weight must be >= 0 (w = m_ag + lambda*m_sp)")
    return _supcon("weighted_supcon_loss", z, (pos_weight,), (1.0,), neg_mask, tau, chunk, anchors)[0]


def ghp_supcon_loss(z: Tensor, pos_ag: Tensor, pos_sp: Tensor | None, lam: float, neg_mask: Tensor,
                    tau: float, chunk: int, anchors: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """weighted_supcon_loss with w = pos_ag + lam*pos_sp built per chunk from bool masks.

    Avoids materialising the float N x N weight matrix. pos_ag, pos_sp bool [N, N].
    Returns (loss, |P_i| per anchor [N]).
    """
    if lam < 0:
        _fail("ghp_supcon_loss", f"lam must be >= 0, got {lam}")
    parts, coefs = (pos_ag,), (1.0,)
    if pos_sp is not None and lam > 0:
        parts, coefs = (pos_ag, pos_sp), (1.0, float(lam))
    for p in parts:
        if p.dtype != torch.bool:
            _fail("ghp_supcon_loss", f"positive masks must be bool, got {p.dtype}")
    return _supcon("ghp_supcon_loss", z, parts, coefs, neg_mask, tau, chunk, anchors)


# ----------------------------------------------------------------------------- released form


@torch.no_grad()
def shared_negatives(n: int, total: int, rho: float, generator: torch.Generator | None,
                     device: torch.device | str = "cpu") -> Tensor:
    """Released form (4): one bool [n, N] mask, each entry True with probability rho, that every
    image's n anchors use against the N patches of the batch."""
    if not 0.0 <= rho <= 1.0:
        _fail("shared_negatives", f"rho must be a fraction in [0, 1], got {rho} (2% is rho=0.02)")
    if generator is not None and generator.device.type != torch.device(device).type:
        _fail("shared_negatives", f"generator is on {generator.device} but device is {device}; "
                                  "create torch.Generator(device=...) on the same device")
    return torch.rand((n, total), generator=generator, device=device) < rho


def _released_image_sum(anchors: Tensor, z: Tensor, pos_ag: Tensor, pos_sp: Tensor | None, lam: float,
                        neg_shared: Tensor, rows: Tensor, start: int, tau: float) -> Tensor:
    """sum over kept rows of sum_j w_ij (logsumexp_{n in P_ag u neg} l_in - l_ij), rows = one image's anchors.

    anchors [r, D] (the rows' anchors; every row has a task-agnostic positive), z [N, D], pos_ag / pos_sp
    bool [N, N] (the whole batch's), neg_shared [n, N], rows [r] the anchors' indices, start the image's first.
    The rows' masks are taken here, so a recomputing checkpoint keeps no [r, N] copy alive until backward."""
    ag = pos_ag[rows]
    w = ag.to(torch.float32)
    if pos_sp is not None:
        w = w + lam * pos_sp[rows].to(torch.float32)
    cols = torch.arange(z.shape[0], device=z.device)
    neg = neg_shared[rows - start] & (cols[None, :] != rows[:, None])  # released (4): self removed
    denom = ag | neg  # released (4): P_ag plus the shared random mask
    return weighted_nll_sum(anchors, z, w, denom, tau)


def released_supcon_per_image(z: Tensor, pos_ag: Tensor, pos_sp: Tensor | None, lam: float, neg_shared: Tensor,
                              tau: float, anchors: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The released code's contrastive term, one value per image.

    z [N, D] L2-normalised, patch order (b, y, x), N = B*n; pos_ag, pos_sp bool [N, N] (pos_sp None
    or lam = 0: task-agnostic only); neg_shared bool [n, N] (:func:`shared_negatives`); anchors [N, D]
    (default z). For image b with anchors i in its n patches:
      kept_i = any_j pos_ag_ij                                            released (3)
      w_ij = pos_ag_ij + lam pos_sp_ij,  D_i = (P_ag(i) u neg_shared_i) minus i             (4)
      L_b = (tau/0.07) sum_{kept i, j} w_ij (-log p_ij) / sum_{kept i, j} w_ij              (2)
    where -log p_ij = logsumexp_{k in D_i} l_ik - l_ij, l = a.z/tau (a task-specific-only j is
    in D_i only where neg_shared draws it). An image with no kept anchor gives 0 (with the graph).
    Returns (L [B], kept bool [N]).
    """
    _check_2d("released_supcon_per_image", "z", z)
    total = z.shape[0]
    a = z if anchors is None else anchors
    if a.shape != z.shape:
        _fail("released_supcon_per_image", f"anchors shape {tuple(a.shape)} must equal z shape {tuple(z.shape)}")
    n = neg_shared.shape[0]
    if neg_shared.dim() != 2 or neg_shared.shape[1] != total or total % n:
        _fail("released_supcon_per_image", f"neg_shared must be [n, N] with N = {total} a multiple of n, "
                                           f"got {tuple(neg_shared.shape)}")
    masks = [("pos_ag", pos_ag)] + ([("pos_sp", pos_sp)] if pos_sp is not None else [])
    for name, m in masks:
        if m.shape != (total, total) or m.dtype != torch.bool:
            _fail("released_supcon_per_image", f"{name} must be bool [N, N] = [{total}, {total}], "
                                               f"got {m.dtype} {tuple(m.shape)}")
    if tau <= 0:
        _fail("released_supcon_per_image", f"tau must be > 0, got {tau}")
    use_sp = pos_sp is not None and lam > 0
    kept = mask_any(pos_ag, 1)  # released (3)
    use_ckpt = _checkpointed(z, a)
    losses = []
    for start in range(0, total, n):
        rows = torch.arange(start, start + n, device=z.device)[kept[start:start + n]]
        if len(rows) == 0:
            losses.append(z.sum() * 0 + a.sum() * 0)
            continue
        with torch.no_grad():  # count_nonzero: a bool sum would first widen the rows to int64
            weight = torch.count_nonzero(pos_ag[rows]) + (lam * torch.count_nonzero(pos_sp[rows]) if use_sp else 0.0)
        args = (a[rows], z, pos_ag, pos_sp if use_sp else None, lam, neg_shared, rows, start, tau)
        part = (checkpoint(_released_image_sum, *args, use_reentrant=False) if use_ckpt
                else _released_image_sum(*args))
        losses.append(part / weight * (tau / BASE_TEMPERATURE))  # released (2)
    return torch.stack(losses), kept


# ----------------------------------------------------------------------------- local term


def neighbourhood_mask(h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
    """bool [h*w, h*w]: True where j lies in the 3x3 window of i (self included), row-major grid."""
    idx = torch.arange(h * w, device=device)
    ys, xs = idx // w, idx % w
    return ((ys[:, None] - ys[None, :]).abs() <= 1) & ((xs[:, None] - xs[None, :]).abs() <= 1)


def _row_quantiles(x: Tensor, *qs: float) -> list[Tensor]:
    """Linear-interpolated quantiles ``qs`` of each last-dim row (same as torch.quantile), keepdim; one sort."""
    s = x.sort(dim=-1).values
    out = []
    for q in qs:
        pos = q * (x.shape[-1] - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, x.shape[-1] - 1)
        out.append((s[..., lo] + (pos - lo) * (s[..., hi] - s[..., lo])).unsqueeze(-1))
    return out


@torch.no_grad()
def local_attention_weights(attn_logits: Tensor, h: int, w: int, sigma: float) -> Tensor:
    """Local hidden-positive weights a_ij from last-block attention (no gradient).

    attn_logits [B, n, n] pre-softmax, CLS removed, head-averaged, n = h*w. Per row:
    clip to its 10%/90% quantiles, softmax, times sigma, entries below the row mean
    -> 0, keep only j in the 3x3 window of i (self included). Returns float [B, n, n].
    """
    if attn_logits.dim() != 3 or attn_logits.shape[1:] != (h * w, h * w):
        _fail("local_attention_weights",
              f"attn_logits must be [B, h*w, h*w] = [B, {h * w}, {h * w}] with the CLS token removed, "
              f"got {tuple(attn_logits.shape)}")
    x = attn_logits.detach().float()
    low, high = _row_quantiles(x, 0.1, 0.9)
    x = x.clamp(min=low, max=high)
    a = x.softmax(dim=-1) * sigma
    a = a.masked_fill(a < a.mean(dim=-1, keepdim=True), 0.0)
    return a * neighbourhood_mask(h, w, x.device)


def mix_codes(codes: Tensor, weights: Tensor) -> Tensor:
    """s_mix_i = sum_j a_ij s_j / |N_i|, |N_i| = in-image 3x3 window size (9/6/4).

    codes [B, K, h, w] (with grad), weights [B, h*w, h*w] (detached here) -> [B, K, h, w].
    """
    b, k, h, w = codes.shape
    if weights.shape != (b, h * w, h * w):
        _fail("mix_codes", f"weights must be [B, h*w, h*w] = [{b}, {h * w}, {h * w}], got {tuple(weights.shape)}")
    window = neighbourhood_mask(h, w, codes.device).sum(dim=1).to(codes.dtype)  # [n]
    flat = codes.reshape(b, k, h * w)
    mixed = flat @ weights.detach().to(codes.dtype).transpose(1, 2)  # [B, K, n]: sum_j s_j a_ij
    return (mixed / window).reshape(b, k, h, w)


# ----------------------------------------------------------------------------- other terms


def consistency_loss(z: Tensor, z_aug: Tensor) -> Tensor:
    """R = mean over (b, y, x) of ||z - z_aug||_2 over channels. z, z_aug [B, D, h, w] -> scalar."""
    if z.shape != z_aug.shape or z.dim() != 4:
        _fail("consistency_loss", f"z and z_aug must both be [B, D, h, w], got {tuple(z.shape)} "
                                  f"and {tuple(z_aug.shape)}")
    return torch.linalg.vector_norm(z - z_aug, dim=1).mean()


def lambda_released(step: int, warmup: int, total: int) -> float:
    """Released form (6): lambda at 0-based iteration ``step`` is (t - w) / (T - w), clipped to [0, 1]
    (0 before the warm-up ends; it never quite reaches 1 on the last iteration)."""
    if step < 0 or warmup < 0 or total < 1:
        _fail("lambda_released", f"need step >= 0, warmup >= 0, total >= 1; got step={step}, "
                                 f"warmup={warmup}, total={total}")
    if step <= warmup or total <= warmup:
        return 0.0
    return min(1.0, (step - warmup) / (total - warmup))


def released_sp_version(step: int, steps_per_epoch: int, every: int) -> int:
    """Released form (6): version of Q_sp in use at global 0-based ``step`` when it is renewed at the
    epoch-local iterations i with i % every == 0 and i != 0 (version 1: the pool built at the start)."""
    if step < 0 or steps_per_epoch < 1 or every < 1:
        _fail("released_sp_version", f"need step >= 0, steps_per_epoch >= 1, every >= 1; got {step}, "
                                     f"{steps_per_epoch}, {every}")
    epoch, local = divmod(step, steps_per_epoch)
    return 1 + epoch * ((steps_per_epoch - 1) // every) + local // every


def lambda_at(step: int, warmup: int, total: int) -> float:
    """Task-specific weight at 0-based iteration `step`: 0 up to `warmup`, then linear to 1
    at the last iteration (total - 1); clipped to [0, 1]."""
    if step < 0 or warmup < 0 or total < 1:
        _fail("lambda_at", f"need step >= 0, warmup >= 0, total >= 1; got step={step}, "
                           f"warmup={warmup}, total={total}")
    if step <= warmup or total - 1 <= warmup:
        return 0.0
    return min(1.0, (step - warmup) / (total - 1 - warmup))


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source (parameters); buffers copied."""
    if not 0.0 <= momentum <= 1.0:
        _fail("ema_update", f"momentum must be in [0, 1], got {momentum}")
    t_params, s_params = list(target.parameters()), list(source.parameters())
    if [p.shape for p in t_params] != [p.shape for p in s_params]:
        _fail("ema_update", "target and source have different parameter shapes; "
                            "the target must be a deep copy of the source")
    for t, s in zip(t_params, s_params):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)


# ----------------------------------------------------------------------------- modules


class SegHead(nn.Module):
    """Code s = linear 1x1 conv C->K + (1x1 conv C->C, ReLU, 1x1 conv C->K). [B,C,h,w] -> [B,K,h,w]."""

    def __init__(self, in_dim: int, k: int):
        super().__init__()
        self.linear = nn.Conv2d(in_dim, k, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, k, 1))

    def forward(self, feats: Tensor) -> Tensor:
        return self.linear(feats) + self.nonlinear(feats)


class ProjHead(nn.Module):
    """z = normalize(Linear(K, K)(s)) per location; accepts [B, K, h, w] or [N, K]."""

    def __init__(self, k: int):
        super().__init__()
        self.linear = nn.Linear(k, k)

    def forward(self, s: Tensor) -> Tensor:
        if s.dim() == 4:
            return F.normalize(self.linear(s.permute(0, 2, 3, 1)), dim=-1).permute(0, 3, 1, 2)
        return F.normalize(self.linear(s), dim=-1)


def _flat(x: Tensor) -> Tensor:
    """[B, D, h, w] -> [B*h*w, D] (patch order b, y, x)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class HPModel(nn.Module):
    """Trainable HP heads on top of frozen backbone features, plus the EMA head S'."""

    def __init__(self, in_dim: int, k: int):
        super().__init__()
        self.dropout = nn.Dropout2d(0.1)
        self.seg = SegHead(in_dim, k)
        self.proj = ProjHead(k)
        self.ema_seg = copy.deepcopy(self.seg)
        self.ema_seg.requires_grad_(False)
        self.selection = "fp32"  # hp.selection (SELECTIONS), set from the config by methods/hp/spec.py

    def codes(self, feats: Tensor) -> Tensor:
        """Segmentation codes for inference (no dropout). [B, C, h, w] -> [B, K, h, w]."""
        return self.seg(feats)

    def embed(self, feats: Tensor, rgb: Tensor) -> Tensor:
        """The Segmenter's head interface: the codes of ``feats`` (``rgb`` unused)."""
        return self.codes(feats)

    @torch.no_grad()
    def ema_codes(self, feats: Tensor) -> Tensor:
        """Codes s' of the momentum head (no grad, no dropout). [B, C, h, w] -> [B, K, h, w]."""
        return self.ema_seg(feats)

    def branch_codes(self, head: SegHead, feats: Tensor) -> Tensor:
        """Released (5): head.linear(drop(f)) + head.nonlinear(drop(f)), each branch with its own
        Dropout2d sample (drawn in that order). [B, C, h, w] -> [B, K, h, w]."""
        return head.linear(self.dropout(feats)) + head.nonlinear(self.dropout(feats))

    @torch.no_grad()
    def released_pool_rows(self, feats_ag: Tensor | None,
                           feats_sp: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Released (5): reference-pool rows from one patch of each pool image, as the released code
        builds them from its dropped-out outputs (not normalised; the loss normalises).

        feats_ag [M, C] -> Q_ag rows drop(f) [M, C]; feats_sp [M, C] -> Q_sp rows
        drop(EMA-head branch codes of f) [M, K] (:meth:`branch_codes`); either may be None.
        Dropout2d samples, in order: Q_ag's, the EMA head's two branches, Q_sp's."""
        ag = sp = None
        if feats_ag is not None:
            _check_2d("released_pool_rows", "feats_ag", feats_ag)
            ag = self.dropout(feats_ag[:, :, None, None])[:, :, 0, 0]
        if feats_sp is not None:
            _check_2d("released_pool_rows", "feats_sp", feats_sp)
            sp = self.dropout(self.branch_codes(self.ema_seg, feats_sp[:, :, None, None]))[:, :, 0, 0]
        return ag, sp

    def hidden_positives(self, feats: Tensor, q_ag: Tensor, q_sp: Tensor | None, lam: float,
                         chunk: int, stats: dict | None = None) -> tuple[Tensor, Tensor | None]:
        """Task-agnostic positives from the backbone features (B, C, h, w) against Q_ag (M, C), and
        task-specific ones from the EMA codes against Q_sp (M, K) when Q_sp exists and lambda > 0
        (else None): (N, N) bool masks, N = B*h*w. Call inside ``no_grad`` and ``exact_fp32``."""
        f = F.normalize(_flat(feats).float(), dim=1)
        pos_ag = hidden_positive_mask(f, F.normalize(q_ag.float(), dim=1), chunk, self.selection, stats)
        if q_sp is None or lam <= 0:
            return pos_ag, None
        s_ema = F.normalize(_flat(self.ema_codes(feats.float())).float(), dim=1)
        return pos_ag, hidden_positive_mask(s_ema, F.normalize(q_sp.float(), dim=1), chunk, self.selection, stats)

    def loss(self, feats: Tensor, feats_aug: Tensor, attn_logits: Tensor | None, q_ag: Tensor,
             q_sp: Tensor | None, lam: float, *, tau: float, rho: float, alpha: float, sigma: float,
             chunk: int, generator: torch.Generator | None,
             mixed_contrast: bool = True, loss_form: str = "paper") -> tuple[Tensor, dict[str, float]]:
        """Total = (Phi_ag + Psi_ag) + lam (Phi_sp + Psi_sp) + alpha R for one local batch.

        feats, feats_aug [B, C, h, w] backbone outputs of the image and its photometric
        copy; attn_logits [B, h*w, h*w] or None (no local term); q_ag [M, C] backbone
        pool; q_sp [M', K] EMA-code pool or None. Phi/Psi of both sets are one weighted
        term each (w = m_ag + lam*m_sp). mixed_contrast: see module docstring.
        Returns (loss, stats) with float stats: loss parts, lam, mean positives and
        negatives per anchor, fraction of anchors kept, and wall-clock seconds of the
        selection (masks + negatives) and of the heads + contrastive forward; with a low-precision
        ``selection``, the share of pairs its fp32 re-check recomputed ("recheck_frac") and the GB that re-check
        gathers ("recheck_gathered_gb").
        loss_form "released": :meth:`released_loss` (module docstring, points 1-5).
        """
        if feats.dim() != 4 or feats_aug.shape != feats.shape:
            _fail("HPModel.loss", f"feats and feats_aug must both be [B, C, h, w], got "
                                  f"{tuple(feats.shape)} and {tuple(feats_aug.shape)}")
        if loss_form == "released":
            return self.released_loss(feats, feats_aug, attn_logits, q_ag, q_sp, lam, tau=tau, rho=rho, alpha=alpha,
                                      sigma=sigma, chunk=chunk, generator=generator, mixed_contrast=mixed_contrast)
        if loss_form != "paper":
            _fail("HPModel.loss", f"loss_form must be one of {', '.join(LOSS_FORMS)}, got {loss_form!r}")
        b, _, h, w = feats.shape
        device = feats.device

        selected: dict = {}  # the low-precision selections' pairs and re-checked pairs
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), exact_fp32():  # selection decides: fp32 whatever the run's precision
            pos_ag, pos_sp = self.hidden_positives(feats, q_ag, q_sp, lam, chunk, selected)
            neg = sample_negatives(pos_ag if pos_sp is None else pos_ag | pos_sp, rho, generator, chunk)
        _sync(device)
        t1 = time.perf_counter()

        s = self.seg(self.dropout(feats))
        z = self.proj(s)
        phi, counts = ghp_supcon_loss(_flat(z), pos_ag, pos_sp, lam, neg, tau, chunk)
        psi = phi.new_zeros(())
        if attn_logits is not None:
            with exact_fp32():  # the weights threshold at the row mean: decided in fp32
                weights = local_attention_weights(attn_logits, h, w, sigma)
            z_mix = _flat(self.proj(mix_codes(s, weights)))
            if mixed_contrast:
                psi = ghp_supcon_loss(z_mix, pos_ag, pos_sp, lam, neg, tau, chunk)[0]
            else:
                psi = ghp_supcon_loss(_flat(z), pos_ag, pos_sp, lam, neg, tau, chunk, anchors=z_mix)[0]
        _sync(device)
        t2 = time.perf_counter()

        z_aug = self.proj(self.seg(self.dropout(feats_aug)))
        reg = consistency_loss(z, z_aug)
        total = phi + psi + alpha * reg
        n = counts.numel()
        stats = {
            "loss_total": float(total.detach()),
            "loss_ghp": float(phi.detach()),
            "loss_lhp": float(psi.detach()),
            "loss_consistency": float(reg.detach()),
            "lam": float(lam),
            "pos_per_anchor": float(counts.sum()) / n,
            "neg_per_anchor": float(torch.count_nonzero(neg)) / n,
            "kept_frac": float((counts > 0).sum()) / n,
            "time_selection_s": t1 - t0,
            "time_loss_s": t2 - t1,
        }
        stats.update(_recheck_stats(selected))
        return total, stats

    def released_loss(self, feats: Tensor, feats_aug: Tensor, attn_logits: Tensor | None, q_ag: Tensor,
                      q_sp: Tensor | None, lam: float, *, tau: float, rho: float, alpha: float, sigma: float,
                      chunk: int, generator: torch.Generator | None,
                      mixed_contrast: bool = True) -> tuple[Tensor, dict[str, float]]:
        """Total = mean_b (GHP_b + LHP_b) / 2 + alpha R, the released code's form (module docstring).

        Same inputs, stats and shapes as :meth:`loss`; GHP_b, LHP_b from
        :func:`released_supcon_per_image`. Without attention LHP_b = 0 and the sum is still halved.
        Released (5): the Dropout2d samples are drawn in this order: the head's two branches (codes s),
        the EMA head's two branches, the EMA codes s', the selection features f, the mixed codes (only
        with attention), the head's two branches on ``feats_aug``. Selection uses drop(f) and drop(s').
        """
        b, _, h, w = feats.shape
        device = feats.device
        s = self.branch_codes(self.seg, feats)
        with torch.no_grad(), exact_fp32():  # drawn whatever lambda is, so the dropout stream is the same every step
            s_ema = self.dropout(self.branch_codes(self.ema_seg, feats.float()))
            f_sel = self.dropout(feats.float())

        selected: dict = {}  # the low-precision selections' pairs and re-checked pairs
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), exact_fp32():  # fp32 selection: the released code's fp16 here is not copied
            pos_ag = hidden_positive_mask(F.normalize(_flat(f_sel), dim=1), F.normalize(q_ag.float(), dim=1), chunk,
                                          self.selection, selected)
            pos_sp = None
            if q_sp is not None and lam > 0:
                pos_sp = hidden_positive_mask(F.normalize(_flat(s_ema), dim=1), F.normalize(q_sp.float(), dim=1),
                                              chunk, self.selection, selected)
            neg = shared_negatives(h * w, b * h * w, rho, generator, device)  # released (4)
        _sync(device)
        t1 = time.perf_counter()

        z = self.proj(s)
        ghp, kept = released_supcon_per_image(_flat(z), pos_ag, pos_sp, lam, neg, tau)
        lhp = torch.zeros_like(ghp)
        if attn_logits is not None:
            with exact_fp32():
                weights = local_attention_weights(attn_logits, h, w, sigma)
            z_mix = _flat(self.proj(self.dropout(mix_codes(s, weights))))
            if mixed_contrast:
                lhp = released_supcon_per_image(z_mix, pos_ag, pos_sp, lam, neg, tau)[0]
            else:
                lhp = released_supcon_per_image(_flat(z), pos_ag, pos_sp, lam, neg, tau, anchors=z_mix)[0]
        _sync(device)
        t2 = time.perf_counter()

        z_aug = self.proj(self.branch_codes(self.seg, feats_aug))
        reg = consistency_loss(z, z_aug)
        contrast = ((ghp + lhp) / 2).mean()  # released (1)
        total = contrast + alpha * reg
        n = kept.numel()
        stats = {
            "loss_total": float(total.detach()),
            "loss_ghp": float(ghp.detach().mean()),
            "loss_lhp": float(lhp.detach().mean()),
            "loss_consistency": float(reg.detach()),
            "lam": float(lam),
            "pos_per_anchor": _union_count(pos_ag, pos_sp, chunk) / n,
            "neg_per_anchor": float(torch.count_nonzero(neg)) * b / n,
            "kept_frac": float(kept.sum()) / n,
            "time_selection_s": t1 - t0,
            "time_loss_s": t2 - t1,
        }
        stats.update(_recheck_stats(selected))
        return total, stats
