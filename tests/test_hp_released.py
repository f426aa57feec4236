"""hp.loss_form: released — each of the six documented differences (methods/hp/core.py) on a small hand case."""
import math

import numpy as np
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
    """lam = 0.5. The denominator is P_ag(i) plus the shared random mask's row, minus i (4).
    Image 0. anchor 0: P_ag {1} (w 1), task-specific {3} (w 0.5); random row 0 = {2, 3}; denominator
      {1, 2, 3}: lse A = log(2 + e^-2); nll_01 = nll_03 = A -> 1.5 A, weight 1.5.
      anchor 1: P_ag {0, 3} (w 1, 1); random row 1 = {0, 2}; denominator {0, 2, 3}:
      lse B = log(2 + e^2); nll_10 = B, nll_13 = B - 2 -> 2B - 2, weight 2.
      (2) L_0 = s (1.5 A + 2B - 2) / 3.5, normalised by the image's positive weights.
    Image 1. anchor 2: only a task-specific positive -> dropped (3).
      anchor 3: P_ag {1}, task-specific {0, 2} (w 0.5 each); random row 1 = {0, 2}: the task-specific
      positives the mask draws are in the denominator {0, 1, 2}: lse B; nll_31 = B - 2, nll_30 = nll_32 = B
      -> 2B - 2, weight 2; L_1 = s (B - 1)."""
    a = math.log(2 + math.exp(-2))
    b = math.log(2 + math.exp(2))
    expected = [SCALE * (1.5 * a + 2 * b - 2) / 3.5, SCALE * (b - 1)]
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
    # (4) a task-specific-only positive is in the denominator only where the random mask draws it:
    # anchor 3 with an empty random row has the denominator {1}: nll_31 = 0, nll_30 = nll_32 = 2 -> L_1 = s;
    # with a row drawing column 2 only: {1, 2}, lse C = log(e^2 + 1) -> L_1 = s (C - 2 + C / 2 + C / 2) / 2
    no_neg = torch.zeros(2, 4, dtype=torch.bool)
    assert float(released_supcon_per_image(Z, POS_AG, POS_SP, 0.5, no_neg, tau=0.5)[0][1]) == pytest.approx(SCALE)
    col_2 = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    c = math.log(math.exp(2) + 1)
    assert float(released_supcon_per_image(Z, POS_AG, POS_SP, 0.5, col_2, tau=0.5)[0][1]) == pytest.approx(
        SCALE * (2 * c - 2) / 2, rel=1e-6)
    # (4) the anchor itself is never in its denominator, even where the random mask draws it
    self_too = torch.ones(2, 4, dtype=torch.bool)
    assert float(released_supcon_per_image(Z, POS_AG, POS_SP, 0.5, self_too, tau=0.5)[0][1]) == pytest.approx(
        float(released_supcon_per_image(Z, POS_AG, POS_SP, 0.5, NEG_SHARED | torch.tensor(
            [[1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool), tau=0.5)[0][1]), rel=1e-7)
    # (4) the same [n, N] mask serves both images: row 0 of the mask is used by anchors 0 and 2 alike
    assert shared_negatives(2, 4, 0.5, torch.Generator().manual_seed(0)).shape == (2, 4)
    with pytest.raises(HPInputError, match=r"neg_shared must be \[n, N\]"):
        released_supcon_per_image(Z, POS_AG, POS_SP, 0.5, torch.ones(3, 4, dtype=torch.bool), tau=0.5)


def test_released_anchor_with_empty_random_row_keeps_finite_gradients():
    """An anchor without a task-agnostic positive and with an empty random row has an empty denominator:
    the released code's log(0) there makes the gradients NaN although the anchor is dropped; here it is
    never computed."""
    z = F.normalize(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), dim=1).requires_grad_()
    pos_ag = bool_mask(4, [(0, 1), (1, 0)])  # image 1 (anchors 2, 3): no task-agnostic positive
    neg = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)  # anchor 3 (row 1): empty denominator
    losses, kept = released_supcon_per_image(z, pos_ag, None, 0.0, neg, tau=0.5)
    losses.sum().backward()
    assert kept.tolist() == [True, True, False, False] and float(losses.detach()[1]) == 0.0
    assert torch.isfinite(z.grad).all() and z.grad[:2].abs().sum() > 0


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


class ReplayDropout(nn.Module):
    """Dropout2d with given per-(row, channel) multipliers, one [B, C] mask per call, in call order."""

    def __init__(self, masks):
        super().__init__()
        self.masks, self.calls = list(masks), 0

    def forward(self, x):
        mask = self.masks[self.calls]
        self.calls += 1
        return x * mask[:, :, None, None]


def channel_masks(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(shape, generator=g) > 0.3).float() / 0.9 for shape in shapes]


def test_point_5_every_use_draws_its_own_dropout_sample_in_the_documented_order():
    """released_loss's nine samples (B = 2, C = 16, K = 8): head branches, EMA branches, EMA codes,
    selection features, mixed codes, the augmented copy's branches; rebuilt by hand from the masks."""
    from raysseg.methods.hp.core import local_attention_weights, mix_codes

    torch.manual_seed(0)
    model = HPModel(16, 8)
    feats, feats_aug, attn, q_ag, q_sp = model_inputs(seed=5)
    c, k = (2, 16), (2, 8)
    masks = channel_masks([c, c, c, c, k, c, k, c, c])
    model.dropout = ReplayDropout(masks)
    loss, _ = model.loss(feats, feats_aug, attn, q_ag, q_sp, 0.5, generator=torch.Generator().manual_seed(1),
                         loss_form="released", **HP_KW)
    assert model.dropout.calls == 9
    d = [m[:, :, None, None] for m in masks]
    b, _, h, w = feats.shape
    flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # noqa: E731
    s = model.seg.linear(feats * d[0]) + model.seg.nonlinear(feats * d[1])
    s_ema = (model.ema_seg.linear(feats * d[2]) + model.ema_seg.nonlinear(feats * d[3])) * d[4]
    pos_ag = hidden_positive_mask(F.normalize(flat(feats * d[5]), dim=1), q_ag, 7)
    pos_sp = hidden_positive_mask(F.normalize(flat(s_ema), dim=1), q_sp, 7)
    neg = shared_negatives(h * w, b * h * w, HP_KW["rho"], torch.Generator().manual_seed(1))
    z = model.proj(s)
    ghp, _ = released_supcon_per_image(flat(z), pos_ag, pos_sp, 0.5, neg, HP_KW["tau"])
    z_mix = flat(model.proj(mix_codes(s, local_attention_weights(attn, h, w, HP_KW["sigma"])) * d[6]))
    lhp, _ = released_supcon_per_image(z_mix, pos_ag, pos_sp, 0.5, neg, HP_KW["tau"])
    z_aug = model.proj(model.seg.linear(feats_aug * d[7]) + model.seg.nonlinear(feats_aug * d[8]))
    expected = ((ghp + lhp) / 2).mean() + HP_KW["alpha"] * consistency_loss(z, z_aug)
    torch.testing.assert_close(loss, expected)


def test_point_5_pool_rows_from_dropped_out_outputs():
    """Q_ag row = drop(f); Q_sp row = drop(EMA linear(drop f) + EMA nonlinear(drop f)), four samples in order."""
    torch.manual_seed(0)
    model = HPModel(16, 8)
    f_ag, f_sp = torch.randn(2, 3, 16).unbind(0)
    masks = channel_masks([(3, 16), (3, 16), (3, 16), (3, 8)], seed=2)
    model.dropout = ReplayDropout(masks)
    ag, sp = model.released_pool_rows(f_ag, f_sp)
    torch.testing.assert_close(ag, f_ag * masks[0])
    codes = model.ema_seg.linear((f_sp * masks[1])[:, :, None, None]) + model.ema_seg.nonlinear(
        (f_sp * masks[2])[:, :, None, None])
    torch.testing.assert_close(sp, codes[:, :, 0, 0] * masks[3])
    with pytest.raises(HPInputError, match="feats_sp must be 2-D"):
        model.released_pool_rows(None, f_sp[:, :, None])


TINY = ["data.image_size=32", "model.code_dim=8", "train.batch_size=2", "hp.renew_every=1", "hp.warmup=0",
        "hp.sigma=2.0", "train.use_gpu=false"]


@pytest.fixture()
def one_thread():
    """Tiny tensors: one thread (two threads on a shared, loaded machine wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_seg():
    """hp_camvid's Segmenter (ViT-S/16, random weights, code_dim 8), built once: the ViT is the slow part."""
    from raysseg.methods.registry import build_segmenter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    seg = build_segmenter(load_config("hp_camvid", TINY))
    torch.set_num_threads(threads)
    return seg


def tiny_trainer(seg, loss_form: str, n_images: int = 3):
    """An HPTrainer on a copy of ``seg`` and 32-pixel images, one process, after setup."""
    import copy

    from raysseg.methods.base import TrainContext
    from raysseg.methods.hp.trainer import HPTrainer
    from raysseg.methods.shared import LocalSharedState

    cfg = load_config("hp_camvid", TINY + [f"hp.pool_size={n_images}", f"hp.loss_form={loss_form}"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    paths = [f"img{i}.png" for i in range(n_images)]

    class PoolShard:
        def iter_batches(self, batch_size, batch_format):
            yield {"image": images, "path": np.array(paths), "valid": np.ones(n_images, bool),
                   "error": np.array([""] * n_images)}

    plan = {"pool": {p: (i, i % 4) for i, p in enumerate(paths)}}
    trainer = HPTrainer(cfg, copy.deepcopy(seg), TrainContext(rank=0, world=1, device=torch.device("cpu"),
                                                              shared=LocalSharedState(), total_steps=4, plan=plan))
    trainer.setup({"pool": PoolShard()}.__getitem__)
    return trainer, images


@pytest.mark.parametrize("loss_form", ["paper", "released"])
def test_point_7_ema_follows_the_weights_before_the_step_in_the_released_form(tiny_seg, one_thread, loss_form):
    trainer, images = tiny_trainer(tiny_seg, loss_form)
    head = trainer.seg.head
    before = [p.detach().clone() for p in head.seg.parameters()]
    ema_before = [p.detach().clone() for p in head.ema_seg.parameters()]
    x = torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float() / 255
    stats = trainer.step_on(x, x.flip(-1), step=0)
    after = [p.detach() for p in head.seg.parameters()]
    source = before if loss_form == "released" else after
    assert not any(torch.equal(a, b) for a, b in zip(before, after))
    for e0, e1, s in zip(ema_before, head.ema_seg.parameters(), source):
        torch.testing.assert_close(e1, 0.99 * e0 + 0.01 * s)
    assert stats["sp_version"] == 1 and trainer.q_sp.shape == (3, 8)


def test_released_pools_dropped_out_and_new_patches_per_renewal_without_touching_the_training_stream(tiny_seg,
                                                                                                      one_thread):
    """Q_ag rows are dropped out (zeroed channels); each Q_sp version takes new patches (from (seed, version));
    renewals use a forked generator, so the global stream (dropout of the steps) is the same with or without."""
    trainer, _ = tiny_trainer(tiny_seg, "released")
    paper, _ = tiny_trainer(tiny_seg, "paper")
    zeroed = trainer.q_ag == 0
    assert zeroed.any() and not (paper.q_ag == 0).any()
    torch.testing.assert_close(trainer.q_ag[~zeroed], paper.q_ag[~zeroed] / 0.9)  # same patches, Dropout2d(0.1)
    other, _ = tiny_trainer(tiny_seg, "released")
    for t in (trainer, other):
        t.steps_per_epoch = 4
    torch.manual_seed(7)
    trainer._refresh_sp(0)
    v1 = trainer.q_sp.clone()
    trainer._refresh_sp(1)
    drawn = torch.rand(3)
    assert trainer.sp_version == 2 and not torch.equal(v1, trainer.q_sp)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(3))
    other.shared.put_part("sp", 1, 0, np.arange(3), v1.numpy())  # version 1 published: other builds only version 2
    other._refresh_sp(1)
    torch.testing.assert_close(other.q_sp, trainer.q_sp)  # from (seed, version, rank) alone
