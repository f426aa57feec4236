"""hp.loss_form: released — each of the six documented differences (methods/hp/core.py) on a small hand case."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raysseg.config import load_config
from raysseg.core.distributed import optimizer_step
from raysseg.methods.hp.core import (
    HPInputError,
    HPModel,
    consistency_loss,
    hidden_positive_mask,
    lambda_at,
    lambda_released,
    released_sp_version,
    released_supcon_per_image,
    shared_negatives,
)
from raysseg.methods.hp.trainer import param_groups
from tests.test_hp_core import HP_KW, model_inputs


def bool_mask(n, pairs):
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, j in pairs:
        m[i, j] = True
    return m


# Two images of two patches (N = 4). z0 = e0, z1 = e1, z2 = -e0, z3 = e1; tau = 0.5, so l = a.z/tau is 2, 0 or -2.
Z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]])
POS_AG = bool_mask(4, [(0, 1), (1, 0), (1, 3), (3, 1)])
POS_SP = bool_mask(4, [(0, 3), (3, 0), (2, 3), (3, 2)])
NEG_SHARED = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)  # row = patch index within its image
SCALE = 0.5 / 0.07


def test_released_per_image_hand_case_points_2_3_4():
    """lam = 0.5.
    Image 0. anchor 0: P_ag {1} (w 1), task-specific {3} (w 0.5); shared negatives {2, 3} lose the
      positive 3 -> {2}; denominator {1, 2}: lse A = log(1 + e^-2); nll_01 = nll_03 = A -> 1.5 A, weight 1.5.
      anchor 1: P_ag {0, 3} (w 1, 1); negatives {0, 2} minus positives -> {2}; denominator {0, 2, 3}:
      lse B = log(2 + e^2); nll_10 = B, nll_13 = B - 2 -> 2B - 2, weight 2.
      (2) L_0 = s (1.5 A + 2B - 2) / 3.5, normalised by the image's positive weights.
    Image 1. anchor 2: only a task-specific positive -> dropped (3).
      anchor 3: P_ag {1}, task-specific {0, 2} (w 0.5 each); negatives {0, 2} are all positives -> {};
      denominator {1} only (4): lse = 2; nll_31 = 0, nll_30 = nll_32 = 2 -> 2, weight 2; L_1 = s."""
    a = math.log(1 + math.exp(-2))
    b = math.log(2 + math.exp(2))
    expected = [SCALE * (1.5 * a + 2 * b - 2) / 3.5, SCALE * 2 / 2]
    losses, kept = released_supcon_per_image(Z, POS_AG, POS_SP, 0.5, NEG_SHARED, tau=0.5)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert kept.tolist() == [True, True, False, True]


def test_point_3_task_specific_only_anchor_is_dropped_and_point_4_negatives_are_shared():
    # (3) anchor 2's task-specific positive changes nothing: remove it and image 1 keeps its value
    no_sp_2 = POS_SP.clone()
    no_sp_2[2, 3] = False
    full, _ = released_supcon_per_image(Z, POS_AG, POS_SP, 0.5, NEG_SHARED, tau=0.5)
    less, _ = released_supcon_per_image(Z, POS_AG, no_sp_2, 0.5, NEG_SHARED, tau=0.5)
    assert float(less[1]) == pytest.approx(float(full[1]), rel=1e-7)
    # (4) a task-specific-only positive is never in the denominator: anchor 3's p_32 = e^0 / e^2 > 0 exactly
    # as computed above, whatever the shared mask says about column 2
    all_neg = torch.ones(2, 4, dtype=torch.bool)
    assert float(released_supcon_per_image(Z, POS_AG, POS_SP, 0.5, all_neg, tau=0.5)[0][1]) == pytest.approx(SCALE)
    # (4) the same [n, N] mask serves both images: row 0 of the mask is used by anchors 0 and 2 alike
    assert shared_negatives(2, 4, 0.5, torch.Generator().manual_seed(0)).shape == (2, 4)
    with pytest.raises(HPInputError, match=r"neg_shared must be \[n, N\]"):
        released_supcon_per_image(Z, POS_AG, POS_SP, 0.5, torch.ones(3, 4, dtype=torch.bool), tau=0.5)


def test_point_1_total_is_halved_per_image_mean_plus_alpha_r():
    """total = mean_b (GHP_b + LHP_b) / 2 + alpha R, rebuilt from the parts with the same dropout and negatives."""
    torch.manual_seed(0)
    model = HPModel(16, 8)
    model.dropout = nn.Identity()  # one fixed "dropout sample": the parts below see the same features
    feats, feats_aug, attn, q_ag, q_sp = model_inputs(seed=4)
    loss, stats = model.loss(feats, feats_aug, attn, q_ag, q_sp, 0.5, generator=torch.Generator().manual_seed(1),
                             loss_form="released", **HP_KW)
    b, _, h, w = feats.shape
    flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # noqa: E731
    pos_ag = hidden_positive_mask(F.normalize(flat(feats), dim=1), q_ag, 7)
    pos_sp = hidden_positive_mask(F.normalize(flat(model.ema_codes(feats)), dim=1), q_sp, 7)
    neg = shared_negatives(h * w, b * h * w, HP_KW["rho"], torch.Generator().manual_seed(1))
    from raysseg.methods.hp.core import local_attention_weights, mix_codes

    s = model.seg(feats)
    z = model.proj(s)
    ghp, _ = released_supcon_per_image(flat(z), pos_ag, pos_sp, 0.5, neg, HP_KW["tau"])
    z_mix = flat(model.proj(mix_codes(s, local_attention_weights(attn, h, w, HP_KW["sigma"]))))
    lhp, _ = released_supcon_per_image(z_mix, pos_ag, pos_sp, 0.5, neg, HP_KW["tau"])
    reg = consistency_loss(z, model.proj(model.seg(feats_aug)))
    expected = ((ghp + lhp) / 2).mean() + HP_KW["alpha"] * reg
    torch.testing.assert_close(loss, expected)
    assert stats["loss_total"] == pytest.approx((stats["loss_ghp"] + stats["loss_lhp"]) / 2
                                                + HP_KW["alpha"] * stats["loss_consistency"], rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.proj.parameters())


class DropChannel0(nn.Module):
    """A fixed Dropout2d sample: channel 0 dropped."""

    def forward(self, x):
        y = x.clone()
        y[:, 0] = 0
        return y


def test_point_5_selection_sees_the_dropout_features():
    """One image, two patches f0 = (1, 0, 1), f1 = (-1, 0, 1); pool q = (0, 1, 1)/sqrt2.
    Clean (paper): cos(f0, f1) = 0 < c = cos(q, f) = 1/2 -> no positive.
    Channel 0 dropped (released): f0 = f1 = (0, 0, 1), cos = 1 > c = 1/sqrt2 -> a positive pair."""
    model = HPModel(3, 4)
    model.dropout = DropChannel0()
    feats = torch.tensor([[1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]).reshape(1, 3, 1, 2)
    q_ag = F.normalize(torch.tensor([[0.0, 1.0, 1.0]]), dim=1)
    kw = dict(HP_KW, rho=0.0)
    _, paper = model.loss(feats, feats, None, q_ag, None, 0.0, generator=None, loss_form="paper", **kw)
    _, released = model.loss(feats, feats, None, q_ag, None, 0.0, generator=None, loss_form="released", **kw)
    assert paper["kept_frac"] == 0.0 and paper["pos_per_anchor"] == 0.0
    assert released["kept_frac"] == 1.0 and released["pos_per_anchor"] == 1.0


def test_point_6_lambda_ramp_and_sp_renewal_within_epochs():
    # (t - w) / (T - w) with w = 2, T = 10: t = 6 -> 0.5; the paper's (t - w) / (T - 1 - w) gives 4/7
    assert [lambda_released(t, 2, 10) for t in (0, 2, 3, 6, 9)] == pytest.approx([0, 0, 1 / 8, 0.5, 7 / 8])
    assert lambda_at(6, 2, 10) == pytest.approx(4 / 7) and lambda_at(9, 2, 10) == 1.0
    # 10 steps per epoch, renewed every 5: epoch-local 5 renews, epoch-local 0 does not
    versions = [released_sp_version(s, 10, 5) for s in range(25)]
    assert versions == [1] * 5 + [2] * 5 + [2] * 5 + [3] * 5 + [3] * 5
    # the paper's step // N + 1 renews at every multiple of N, epoch starts included
    assert [s // 5 + 1 for s in (10, 15, 20)] == [3, 4, 5]


def test_point_6_projection_head_without_weight_decay_or_clipping():
    torch.manual_seed(0)
    head = HPModel(6, 4)
    groups, clip = param_groups(head, 0.1, "released")
    proj = set(map(id, head.proj.parameters()))
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {id(p) for p in groups[1]["params"]} == proj and not proj & set(map(id, clip))
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    loss = 1000 * sum(p.sum() for p in head.proj.parameters()) + 1000 * head.seg.linear.weight.sum()
    optimizer_step(loss, optimizer, 0, "train.lr", 1e-3, grad_clip=1.0, clip_params=clip)
    assert all(torch.all(p.grad == 1000) for p in head.proj.parameters())  # not clipped
    assert float(head.seg.linear.weight.grad.norm()) == pytest.approx(1.0, rel=1e-4)  # clipped
    paper_groups, paper_clip = param_groups(head, 0.1, "paper")
    assert len(paper_groups) == 1 and len(paper_clip) == len(list(head.seg.parameters())) + 2


def test_loss_form_default_keeps_run_names_and_rejects_unknown_forms():
    base = load_config("hp_cocostuff")
    assert base.hp.loss_form == "paper"
    assert load_config("hp_cocostuff", ["hp.loss_form=paper"]).run_name() == base.run_name()
    assert load_config("hp_cocostuff", ["hp.loss_form=released"]).run_name() != base.run_name()
    feats, feats_aug, attn, q_ag, q_sp = model_inputs()
    with pytest.raises(HPInputError, match="loss_form must be one of paper, released"):
        HPModel(16, 8).loss(feats, feats_aug, attn, q_ag, q_sp, 0.5, generator=None, loss_form="both", **HP_KW)


@pytest.mark.parametrize("paper", ["hp_cocostuff", "hp_cityscapes", "hp_potsdam"])
def test_released_configs_differ_from_the_paper_configs_only_in_loss_form(paper):
    a, b = load_config(paper).flat(), load_config(f"{paper}_released").flat()
    assert {k for k in a if a[k] != b[k]} == {"name", "hp.loss_form"} and b["hp.loss_form"] == "released"
