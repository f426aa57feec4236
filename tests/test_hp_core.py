"""Tests for raysseg.methods.hp.core (Hidden Positives core)."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from raysseg.methods.hp.core import (
    HPInputError,
    HPModel,
    ProjHead,
    SegHead,
    anchor_criterion,
    consistency_loss,
    ema_update,
    ghp_supcon_loss,
    hidden_positive_mask,
    lambda_at,
    local_attention_weights,
    mix_codes,
    neighbourhood_mask,
    sample_negatives,
    weighted_nll_sum,
    weighted_supcon_loss,
)


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


# ----------------------------------------------------------------------------- selection


def test_anchor_criterion_hand_values():
    # f0 = e0, f1 = (e0 + e1)/sqrt2, f2 = e1, f3 = e3; pool = {e0, (e1 + e3)/sqrt2}.
    # c0 = cos(f0, e0) = 1; c1 = cos(f1, e0) = 1/sqrt2 (vs 1/2); c2 = c3 = 1/sqrt2 (second pool entry).
    feats = unit([1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1])
    pool = unit([1, 0, 0, 0], [0, 1, 0, 1])
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(anchor_criterion(feats, pool, chunk=3), torch.tensor([1.0, r, r, r]))
    torch.testing.assert_close(anchor_criterion(feats, pool, chunk=1), torch.tensor([1.0, r, r, r]))


def test_hidden_positive_mask_hand_case_with_one_sided_pair():
    # Pool = {e0, e3}. Patches (normalised):
    #   a = (1, .2, 0, 0)   c_a = 1/sqrt(1.04)  = 0.981
    #   b = (1, -.2, 0, 0)  c_b = 1/sqrt(1.04)  = 0.981
    #   d = (.2, 1, 1, 0)   c_d = .2/sqrt(2.04) = 0.140
    #   g = (0, 0, 1, .5)   c_g = .5/sqrt(1.25) = 0.447
    # cos(a, b) = 0.923: below both criteria -> NOT positive although similar.
    # cos(a, d) = 0.275: below c_a but above c_d -> positive only through the symmetric OR.
    # cos(b, d) = 0 -> no.  cos(d, g) = 0.626 > c_d and > c_g -> positive.  cos(a|b, g) = 0 -> no.
    # Self-similarity 1 exceeds every c_i, so self-pairs must be removed explicitly.
    feats = unit([1, 0.2, 0, 0], [1, -0.2, 0, 0], [0.2, 1, 1, 0], [0, 0, 1, 0.5])
    pool = unit([1, 0, 0, 0], [0, 0, 0, 1])
    c = anchor_criterion(feats, pool, chunk=1)
    torch.testing.assert_close(c, torch.tensor([1 / math.sqrt(1.04), 1 / math.sqrt(1.04),
                                                0.2 / math.sqrt(2.04), 0.5 / math.sqrt(1.25)]))
    sim = feats @ feats.T
    assert c[2] < sim[0, 2] < c[0]  # one-sided: only d's criterion admits the pair
    assert sim[0, 1] < c[0] and sim[0, 1] < c[1]
    expected = torch.tensor([
        [0, 0, 1, 0],
        [0, 0, 0, 0],
        [1, 0, 0, 1],
        [0, 0, 1, 0],
    ], dtype=torch.bool)
    for chunk in (1, 3, 4):
        assert torch.equal(hidden_positive_mask(feats, pool, chunk=chunk), expected)


def test_selection_rejects_unnormalised_input():
    with pytest.raises(HPInputError, match="L2-normalised"):
        anchor_criterion(torch.ones(3, 4), unit([1, 0, 0, 0]), chunk=2)
    with pytest.raises(HPInputError, match="dims"):
        hidden_positive_mask(unit([1, 0, 0, 0]), unit([1, 0, 0]), chunk=2)


def test_sample_negatives_excludes_positives_and_self_and_keeps_rho():
    n = 400
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(n, n, generator=g) < 0.3
    pos = pos | pos.T
    pos.fill_diagonal_(False)
    neg = sample_negatives(pos, 0.1, torch.Generator().manual_seed(1), chunk=37)
    assert not (neg & pos).any()
    assert not neg.diagonal().any()
    candidates = (~pos).sum() - n
    assert float(neg.sum()) / float(candidates) == pytest.approx(0.1, abs=0.005)
    same = sample_negatives(pos, 0.1, torch.Generator().manual_seed(1), chunk=37)
    assert torch.equal(neg, same)
    assert not sample_negatives(pos, 0.0, None).any()
    assert torch.equal(sample_negatives(pos, 1.0, None), ~pos & ~torch.eye(n, dtype=torch.bool))
    with pytest.raises(HPInputError, match="rho"):
        sample_negatives(pos, 2.0, None)
    if torch.cuda.is_available():
        with pytest.raises(HPInputError, match="generator"):
            sample_negatives(pos.cuda(), 0.1, torch.Generator())


# ----------------------------------------------------------------------------- contrastive loss


def loop_reference(z, w, neg, tau, anchors=None):
    """Slow per-anchor SupCon exactly as written in METHODS, with |P| anchor weighting."""
    a = z if anchors is None else anchors
    n = z.shape[0]
    losses, counts = [], []
    for i in range(n):
        pos_idx = [j for j in range(n) if w[i, j] > 0]
        if not pos_idx:
            continue
        denom_idx = [j for j in range(n) if w[i, j] > 0 or neg[i, j]]
        log_den = torch.logsumexp(torch.stack([a[i] @ z[j] / tau for j in denom_idx]), 0)
        li = -sum(w[i, p] * (a[i] @ z[p] / tau - log_den) for p in pos_idx) / len(pos_idx)
        losses.append(li)
        counts.append(len(pos_idx))
    if not losses:
        return (z.sum() + a.sum()) * 0
    counts = torch.tensor(counts, dtype=torch.float32)
    weights = counts / counts.mean()
    return (tau / 0.07) * (torch.stack(losses) * weights).mean()


def random_problem(n=12, d=5, seed=0, lam=0.4):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1)
    m_ag = torch.rand(n, n, generator=g) < 0.25
    m_sp = torch.rand(n, n, generator=g) < 0.25
    m_ag, m_sp = m_ag | m_ag.T, m_sp | m_sp.T
    m_ag.fill_diagonal_(False)
    m_sp.fill_diagonal_(False)
    m_ag[0], m_ag[:, 0], m_sp[0], m_sp[:, 0] = False, False, False, False  # anchor 0: no positive
    neg = (torch.rand(n, n, generator=g) < 0.5) & ~(m_ag | m_sp)
    neg.fill_diagonal_(False)
    w = m_ag.float() + lam * m_sp.float()
    return z, m_ag, m_sp, w, neg


def test_loss_matches_loop_reference():
    z, m_ag, m_sp, w, neg = random_problem()
    ref = loop_reference(z, w, neg, tau=0.6)
    got = weighted_supcon_loss(z, w, neg, tau=0.6, chunk=5)
    torch.testing.assert_close(got, ref)
    got_ghp, counts = ghp_supcon_loss(z, m_ag, m_sp, 0.4, neg, tau=0.6, chunk=5)
    torch.testing.assert_close(got_ghp, ref)
    assert counts.tolist() == (w > 0).sum(1).tolist()
    # Separate anchors (e.g. mixed codes) against plain contrast codes.
    anchors = F.normalize(torch.randn(z.shape, generator=torch.Generator().manual_seed(9)), dim=1)
    torch.testing.assert_close(weighted_supcon_loss(z, w, neg, 0.6, 4, anchors=anchors),
                               loop_reference(z, w, neg, 0.6, anchors=anchors))


def test_weighted_nll_sum_closed_form_gradient():
    """The loss core's hand-written backward: finite differences in float64 (task-specific-only pairs
    outside the denominator included), and autograd through the plain expression in fp32 and bf16."""
    g = torch.Generator().manual_seed(3)
    a = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    z = F.normalize(torch.randn(11, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    pos, sp, neg = (torch.rand(7, 11, generator=g) < p for p in (0.3, 0.2, 0.3))
    denom = pos | neg
    denom[:, 0] = True
    w = pos.float() + 0.4 * sp.float()
    assert (w[~denom] > 0).any()
    assert torch.autograd.gradcheck(lambda a, z: weighted_nll_sum(a, z, w, denom, 0.7), (a, z))

    def plain(a, z):
        logits = (a @ z.T).float() / 0.7
        return (w * (logits.masked_fill(~denom, float("-inf")).logsumexp(1, keepdim=True) - logits)).sum()

    a32, z32 = (t.detach().float().requires_grad_() for t in (a, z))
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours, ref = weighted_nll_sum(a32, z32, w, denom, 0.7), plain(a32, z32)
        assert torch.equal(ours, ref)  # the forward is the plain expression's, bit for bit
        for got, want in zip(torch.autograd.grad(ours, (a32, z32)), torch.autograd.grad(ref, (a32, z32))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_loss_hand_computed_value():
    # z0 = e0, z1 = e1, z2 = -e0; tau = 0.5, so logits a.z/tau are 0 or -2.
    # anchor 0: P = {1} (w 1), N = {2}:  L0 = -(0 - log(e^0 + e^-2)) = log(1 + e^-2)
    # anchor 1: P = {0, 2} (w 1, 1), N = {}: each log-prob = 0 - log 2 -> L1 = log 2
    # anchor 2: P = {1} (w 0.5), N = {0}: L2 = -0.5 * (0 - log(1 + e^-2)) = 0.5 log(1 + e^-2)
    # |P| = (1, 2, 1), mean 4/3 -> anchor weights (3/4, 3/2, 3/4).
    # loss = (0.5/0.07) * (0.75 L0 + 1.5 L1 + 0.75 L2) / 3
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    w = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 0.5, 0]])
    neg = torch.tensor([[0, 0, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    l0 = math.log(1 + math.exp(-2))
    l1 = math.log(2)
    l2 = 0.5 * l0
    expected = (0.5 / 0.07) * (0.75 * l0 + 1.5 * l1 + 0.75 * l2) / 3
    assert float(weighted_supcon_loss(z, w, neg, tau=0.5, chunk=2)) == pytest.approx(expected, rel=1e-6)


def test_anchor_without_positives_contributes_nothing():
    z, _, _, w, neg = random_problem(n=10, seed=3)
    loss = weighted_supcon_loss(z, w, neg, 0.8, chunk=4)
    # Extra patch x: no positives (row and column of w zero), it is in nobody's
    # negative set (column of neg False) but it has negatives of its own (row True).
    x = F.normalize(torch.randn(1, z.shape[1]), dim=1)
    z2 = torch.cat([z, x]).requires_grad_(True)
    w2 = torch.zeros(11, 11)
    w2[:10, :10] = w
    neg2 = torch.zeros(11, 11, dtype=torch.bool)
    neg2[:10, :10] = neg
    neg2[10, :10] = True
    loss2 = weighted_supcon_loss(z2, w2, neg2, 0.8, chunk=4)
    torch.testing.assert_close(loss2, loss)
    loss2.backward()
    assert torch.equal(z2.grad[10], torch.zeros(z.shape[1]))
    # Control: once x is a negative of the others, it does change the loss.
    neg2[:10, 10] = True
    assert not torch.allclose(weighted_supcon_loss(z2, w2, neg2, 0.8, chunk=4), loss)


def test_no_positive_anywhere_returns_zero_with_graph():
    z = F.normalize(torch.randn(6, 3), dim=1).requires_grad_(True)
    loss = weighted_supcon_loss(z, torch.zeros(6, 6), torch.ones(6, 6, dtype=torch.bool).fill_diagonal_(False),
                                0.5, chunk=4)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_chunked_equals_unchunked_values_and_grads():
    z0, m_ag, m_sp, w, neg = random_problem(n=23, d=6, seed=5)
    a0 = F.normalize(torch.randn(z0.shape), dim=1)
    results = []
    for chunk in (23, 4, 1):
        z = z0.clone().requires_grad_(True)
        a = a0.clone().requires_grad_(True)
        loss, _ = ghp_supcon_loss(z, m_ag, m_sp, 0.4, neg, 0.6, chunk, anchors=a)
        loss.backward()
        results.append((loss.detach(), z.grad, a.grad))
    for loss, gz, ga in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(gz, results[0][1])
        torch.testing.assert_close(ga, results[0][2])
    assert results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0


def test_loss_rejects_self_pairs():
    z, _, _, w, neg = random_problem()
    neg[2, 2] = True
    with pytest.raises(HPInputError, match="self-pairs"):
        weighted_supcon_loss(z, w, neg, 0.5, 4)


# ----------------------------------------------------------------------------- local term


def test_local_attention_weights_window_mean_and_reference():
    h, w, sigma = 5, 6, 28.0
    n = h * w
    logits = torch.randn(2, n, n, generator=torch.Generator().manual_seed(0)) * 3
    a = local_attention_weights(logits, h, w, sigma)
    window = neighbourhood_mask(h, w)
    assert torch.equal(a * ~window, torch.zeros_like(a))  # zero outside 3x3
    # Reference with torch.quantile, row by row.
    lo = torch.quantile(logits, 0.1, dim=2, keepdim=True)
    hi = torch.quantile(logits, 0.9, dim=2, keepdim=True)
    soft = torch.minimum(torch.maximum(logits, lo), hi).softmax(-1) * sigma
    below = soft < soft.mean(-1, keepdim=True)
    ref = torch.where(below, 0.0, soft) * window
    torch.testing.assert_close(a, ref)
    # Entries below the row mean (= sigma / n) are zero; the kept ones are at least that.
    assert torch.equal(a[below & window], torch.zeros(int((below & window).sum())))
    assert (a[a > 0] >= sigma / n - 1e-6).all()
    assert (below & window).any() and (a > 0).any()  # both cases occur
    assert not a.requires_grad


def test_local_attention_weights_quantile_clipping():
    # 4x4 grid, anchor 5 = (1, 1). Its logits are 0 except +50 at patch 6 = (1, 2) and
    # -50 at patch 0 = (0, 0). The 10%/90% quantiles of the row are both 0, so clipping
    # flattens the row: every window entry gets sigma / 16. Without clipping patch 6
    # would take nearly all the mass and the others fall below the mean.
    logits = torch.zeros(1, 16, 16)
    logits[0, 5, 6] = 50.0
    logits[0, 5, 0] = -50.0
    a = local_attention_weights(logits, 4, 4, sigma=4.0)
    for j in (0, 1, 2, 4, 5, 6, 8, 9, 10):
        assert float(a[0, 5, j]) == pytest.approx(4.0 / 16)
    for j in (3, 7, 11, 12, 13, 14, 15):
        assert float(a[0, 5, j]) == 0.0
    with pytest.raises(HPInputError, match="CLS"):
        local_attention_weights(torch.zeros(1, 17, 17), 4, 4, 1.0)


def test_mix_codes_hand_value():
    # 2x2 grid: every patch's window is the whole grid (|N_i| = 4).
    codes = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    weights = torch.zeros(1, 4, 4)
    weights[0, 0, 0], weights[0, 0, 3] = 2.0, 4.0
    mixed = mix_codes(codes, weights)
    assert mixed[0, :, 0, 0].tolist() == [(2 * 0 + 4 * 3) / 4, (2 * 4 + 4 * 7) / 4]
    assert torch.equal(mixed[0, :, 1, 1], torch.zeros(2))
    # Window sizes on a 3x3 grid: corners 4, edges 6, centre 9.
    assert neighbourhood_mask(3, 3).sum(1).tolist() == [4, 6, 4, 6, 9, 6, 4, 6, 4]


def test_local_term_gradient_follows_attention_weights():
    torch.manual_seed(0)
    b, k, h, w = 1, 6, 5, 5
    n = h * w
    anchor = 12  # centre (2, 2)
    logits = torch.randn(b, n, n) * 2
    weights = local_attention_weights(logits, h, w, sigma=float(n))
    codes = torch.randn(b, k, h, w, requires_grad=True)
    z_mix = F.normalize(mix_codes(codes, weights).permute(0, 2, 3, 1).reshape(n, k), dim=1)
    z = F.normalize(codes.detach().permute(0, 2, 3, 1).reshape(n, k), dim=1)  # contrast side fixed
    pos = torch.zeros(n, n)
    pos[anchor, [0, 4, 20]] = 1.0  # only the anchor has positives
    neg = torch.zeros(n, n, dtype=torch.bool)
    neg[anchor, [1, 3, 24]] = True
    loss = weighted_supcon_loss(z, pos, neg, 0.5, chunk=7, anchors=z_mix)
    loss.backward()
    grad = codes.grad[0].reshape(k, n)  # [K, n]
    row = weights[0, anchor]
    window = neighbourhood_mask(h, w)[anchor]
    # Exactly zero outside the 3x3 window and where the weight was thresholded to 0.
    assert torch.equal(grad[:, row == 0], torch.zeros(k, int((row == 0).sum())))
    assert (~window & (row == 0)).sum() == n - 9
    kept = (row > 0).nonzero().flatten().tolist()
    assert len(kept) >= 2
    # Inside: grad_j = (a_ij / 9) * dL/ds_mix_i -> grad_j / a_ij is the same vector for all j.
    per_weight = grad[:, kept] / row[kept]
    torch.testing.assert_close(per_weight, per_weight[:, :1].expand_as(per_weight))
    assert per_weight.abs().sum() > 0


# ----------------------------------------------------------------------------- small pieces


def test_consistency_loss_hand_value():
    z = torch.zeros(1, 2, 1, 2)
    z_aug = torch.zeros(1, 2, 1, 2)
    z_aug[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5
    z_aug[0, :, 0, 1] = torch.tensor([0.0, 1.0])  # distance 1
    assert float(consistency_loss(z, z_aug)) == pytest.approx(3.0)
    zz = torch.zeros(1, 2, 1, 2, requires_grad=True)
    consistency_loss(zz, zz.detach()).backward()
    assert torch.isfinite(zz.grad).all()


def test_lambda_at():
    assert lambda_at(0, 50, 151) == 0.0
    assert lambda_at(50, 50, 151) == 0.0
    assert lambda_at(51, 50, 151) == pytest.approx(0.01)
    assert lambda_at(100, 50, 151) == pytest.approx(0.5)
    assert lambda_at(150, 50, 151) == 1.0
    assert lambda_at(400, 50, 151) == 1.0
    assert lambda_at(5, 10, 8) == 0.0  # warm-up longer than the run
    with pytest.raises(HPInputError):
        lambda_at(-1, 0, 10)


def test_ema_update():
    src, tgt = SegHead(3, 2), SegHead(3, 2)
    before = [p.clone() for p in tgt.parameters()]
    ema_update(tgt, src, 0.9)
    for b, t, s in zip(before, tgt.parameters(), src.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    ema_update(tgt, src, 0.0)
    for t, s in zip(tgt.parameters(), src.parameters()):
        assert torch.equal(t, s)
    with pytest.raises(HPInputError, match="momentum"):
        ema_update(tgt, src, 1.5)
    bn_src, bn_tgt = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    bn_src(torch.randn(5, 2) + 3)  # moves the running statistics
    ema_update(bn_tgt, bn_src, 0.99)
    assert torch.equal(bn_tgt.running_mean, bn_src.running_mean)


def test_heads_shapes_and_normalisation():
    head, proj = SegHead(8, 5), ProjHead(5)
    s = head(torch.randn(2, 8, 3, 4))
    assert s.shape == (2, 5, 3, 4)
    z = proj(s)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 3, 4))
    flat = proj(s.permute(0, 2, 3, 1).reshape(-1, 5))
    torch.testing.assert_close(flat, z.permute(0, 2, 3, 1).reshape(-1, 5))


def model_inputs(seed=0, b=2, c=16, h=4, w=5, k=8, m=10):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, c, h, w, generator=g)
    feats_aug = feats + 0.1 * torch.randn(b, c, h, w, generator=g)
    attn = torch.randn(b, h * w, h * w, generator=g)
    q_ag = F.normalize(torch.randn(m, c, generator=g), dim=1)
    q_sp = F.normalize(torch.randn(m, k, generator=g), dim=1)
    return feats, feats_aug, attn, q_ag, q_sp


HP_KW = dict(tau=0.6, rho=0.5, alpha=0.05, sigma=20.0, chunk=7)


@pytest.mark.parametrize("mixed_contrast", [True, False])
def test_hp_model_loss_backward(mixed_contrast):
    torch.manual_seed(0)
    model = HPModel(16, 8)
    feats, feats_aug, attn, q_ag, q_sp = model_inputs()
    loss, stats = model.loss(feats, feats_aug, attn, q_ag, q_sp, 0.5, generator=torch.Generator().manual_seed(0),
                             mixed_contrast=mixed_contrast, **HP_KW)
    loss.backward()
    assert torch.isfinite(loss)
    for p in list(model.seg.parameters()) + list(model.proj.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all(p.grad is None and not p.requires_grad for p in model.ema_seg.parameters())
    assert stats["loss_lhp"] > 0 and stats["loss_ghp"] > 0 and stats["loss_consistency"] > 0
    assert stats["loss_total"] == pytest.approx(
        stats["loss_ghp"] + stats["loss_lhp"] + 0.05 * stats["loss_consistency"], rel=1e-5)
    assert 0 < stats["kept_frac"] <= 1 and stats["pos_per_anchor"] > 0
    assert stats["time_selection_s"] >= 0 and stats["time_loss_s"] >= 0
    assert all(isinstance(v, float) for v in stats.values())
    assert model.codes(feats).shape == (2, 8, 4, 5) == model.ema_codes(feats).shape


def test_hp_model_skips_specific_set_at_lambda_zero_and_local_term_without_attention():
    feats, feats_aug, attn, q_ag, q_sp = model_inputs(seed=1)
    model = HPModel(16, 8)
    out = []
    for q, lam in ((q_sp, 0.0), (None, 0.7)):
        torch.manual_seed(3)
        out.append(model.loss(feats, feats_aug, attn, q_ag, q, lam, generator=torch.Generator().manual_seed(2),
                              **HP_KW)[0])
    torch.testing.assert_close(out[0], out[1])
    torch.manual_seed(3)
    with_sp, stats_sp = model.loss(feats, feats_aug, attn, q_ag, q_sp, 0.7,
                                   generator=torch.Generator().manual_seed(2), **HP_KW)
    assert not torch.allclose(with_sp, out[0])
    _, stats = model.loss(feats, feats_aug, None, q_ag, None, 0.0, generator=None, **HP_KW)
    assert stats["loss_lhp"] == 0.0


# ----------------------------------------------------------------------------- memory


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import torch.nn.functional as F
    from raysseg.methods.hp.core import (hidden_positive_mask, sample_negatives, ghp_supcon_loss,
                                         released_supcon_per_image, shared_negatives)

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux: KiB)

    torch.manual_seed(0)
    n, c, k = 20000, 64, 32
    if sys.argv[1] == "control":  # the measure must see one dense float N x N
        base = peak()
        dense = torch.ones(n, n)
        print(peak() - base)
        sys.exit(0)
    feats = F.normalize(torch.randn(n, c), dim=1)
    pool = F.normalize(torch.randn(2048, c), dim=1)
    z = F.normalize(torch.randn(n, k), dim=1).requires_grad_(True)
    # Warm-up on a tiny problem: first use of checkpoint loads ~200 MB of code/state.
    small = hidden_positive_mask(feats[:300], pool, chunk=256)
    ghp_supcon_loss(z[:300], small, None, 0.0, sample_negatives(small, 0.5, None), 0.6, 256)[0].backward()
    z.grad = None
    if sys.argv[1] == "released":  # two masks (task-agnostic, task-specific), 100 images of 200 patches
        pos_ag = hidden_positive_mask(feats, pool, chunk=256)
        pos_sp = hidden_positive_mask(F.normalize(torch.randn(n, c), dim=1), pool, chunk=256)
        neg = shared_negatives(200, n, 0.02, torch.Generator().manual_seed(0))
        base = peak()
        losses, kept = released_supcon_per_image(z, pos_ag, pos_sp, 0.5, neg, 0.6)
        losses.mean().backward()
        assert torch.isfinite(losses).all() and kept.any() and torch.isfinite(z.grad).all()
        print(peak() - base)
        sys.exit(0)
    base = peak()
    pos = hidden_positive_mask(feats, pool, chunk=256)
    neg = sample_negatives(pos, 0.02, torch.Generator().manual_seed(0), chunk=256)
    loss, counts = ghp_supcon_loss(z, pos, None, 0.0, neg, 0.6, chunk=256)
    loss.backward()
    assert torch.isfinite(loss) and counts.sum() > 0 and torch.isfinite(z.grad).all()
    print(peak() - base)
""")


def peak_growth(mode):
    # A fixed mmap threshold makes glibc return freed large blocks to the OS, so peak RSS
    # tracks live tensor memory instead of heap fragmentation.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.slow
def test_memory_stays_far_below_dense_n_by_n():
    n = 20000
    dense_float = 4 * n * n  # 1.6 GB
    masks = 2 * n * n  # two bool N x N (positives, negatives): 0.8 GB
    assert peak_growth("control") > 0.95 * dense_float  # the measure sees a dense N x N
    growth = peak_growth("workload")  # mask + negatives + loss forward + backward
    # Masks plus chunk buffers; one dense float N x N (let alone masks + it) would exceed this.
    assert growth < masks + 0.25 * dense_float, (growth, masks, dense_float)


@pytest.mark.slow
def test_released_loss_keeps_no_per_image_mask_copies_for_backward():
    """Its recomputing checkpoint is handed the batch's masks and takes each image's rows inside, so what waits
    for backward is not a copy of the rows (three bool [n, N] per image: 3 N^2 bytes, 1.2 GB here)."""
    n = 20000
    growth = peak_growth("released")  # the two masks exist before the measure starts
    assert growth < n * n, growth  # one image's float buffers (~0.24 GB); the copies alone would be 3 N^2


@pytest.mark.parametrize("form", ["paper", "released"])
def test_the_losses_give_the_same_gradients_with_and_without_recomputing_their_logits(monkeypatch, form):
    """Small batches keep the contrastive logits for backward (no checkpoint), large ones recompute them: the
    loss and its gradients are the same either way."""
    import raysseg.methods.hp.core as core

    torch.manual_seed(0)
    n_img, n, k = 3, 16, 8
    z0 = F.normalize(torch.randn(n_img * n, k), dim=1)
    pos = torch.rand(n_img * n, n_img * n) < 0.2
    pos.fill_diagonal_(False)
    sp = torch.rand(n_img * n, n_img * n) < 0.2
    sp.fill_diagonal_(False)
    results = []
    for pairs in (1, 1 << 40):  # checkpointed, then kept
        monkeypatch.setattr(core, "CHECKPOINT_PAIRS", pairs)
        z = z0.clone().requires_grad_(True)
        if form == "paper":
            neg = core.sample_negatives(pos | sp, 0.5, torch.Generator().manual_seed(0))
            loss = core.ghp_supcon_loss(z, pos, sp, 0.5, neg, 0.6, chunk=5)[0]
        else:
            neg = core.shared_negatives(n, n_img * n, 0.5, torch.Generator().manual_seed(0), "cpu")
            loss = core.released_supcon_per_image(z, pos, sp, 0.5, neg, 0.6)[0].sum()
        assert core._checkpointed(z, z) == (pairs == 1)
        loss.backward()
        results.append((loss.detach(), z.grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_union_count_by_row_chunks_equals_the_union_mask():
    from raysseg.methods.hp.core import _union_count

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(37, 23, generator=g) < 0.3, torch.rand(37, 23, generator=g) < 0.2
    assert _union_count(a, b, 8) == int((a | b).sum()) != int(a.sum()) + int(b.sum())
    assert _union_count(a, None, 8) == int(a.sum())
