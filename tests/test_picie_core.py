"""Tests for raysseg.methods.picie.core (PiCIE + PGG + CAE core)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raysseg.methods.picie.core import (
    CAE,
    PYRAMID_BOXES,
    CAMHead,
    PGGHead,
    PiCIEInputError,
    active_selection,
    assign_labels,
    cell_positions,
    guidance_loss,
    picie_loss,
    region_pool,
)


def unit_map(b, d, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, h, w, generator=g), dim=1)


# ----------------------------------------------------------------------------- PiCIE


def test_assign_labels_hand_values():
    # Cells (1,0), (0.6,0.8), (0,-1); centroids e0, 2*e1 (normalised inside), (-1,-1).
    # cosines: cell0 -> (1, 0, -.71) -> 0; cell1 -> (.6, .8, -.99) -> 1; cell2 -> (0, -1, .71) -> 2.
    z = torch.tensor([[1.0, 0.6, 0.0], [0.0, 0.8, -1.0]]).reshape(1, 2, 1, 3)
    c = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    y = assign_labels(z, c)
    assert y.dtype == torch.int64 and y.shape == (1, 1, 3)
    assert y.tolist() == [[[0, 1, 2]]]


def _ce_loop(z, c, y):
    """Slow reference: mean over labelled pixels of -log softmax(z_p . c_k / |c_k|)[y_p]."""
    c = c / c.norm(dim=1, keepdim=True)
    total, count = 0.0, 0
    b, _, h, w = z.shape
    for i in range(b):
        for r in range(h):
            for s in range(w):
                label = int(y[i, r, s])
                if label == -1:
                    continue
                logits = [float((z[i, :, r, s] * c[k]).sum()) for k in range(c.shape[0])]
                lse = math.log(sum(math.exp(v) for v in logits))
                total += lse - logits[label]
                count += 1
    return total / count


@pytest.mark.parametrize("ignore", [False, True])
def test_picie_loss_matches_per_pixel_loop(ignore):
    z1, z2 = unit_map(2, 3, 2, 3, 0), unit_map(2, 3, 2, 3, 1)
    g = torch.Generator().manual_seed(2)
    c1, c2 = torch.randn(4, 3, generator=g) * 3, torch.randn(4, 3, generator=g)
    y1, y2 = torch.randint(0, 4, (2, 2, 3), generator=g), torch.randint(0, 4, (2, 2, 3), generator=g)
    if ignore:
        y1[0, 0, :] = -1
        y2[1, 1, 1] = -1
        y2[0, 0, 0] = -1  # pixel (0, 0, 0) is ignored in both views
    z1.requires_grad_(True)
    loss, stats = picie_loss(z1, z2, c1, c2, y1, y2)
    within = _ce_loop(z1.detach(), c1, y1) + _ce_loop(z2, c2, y2)
    cross = _ce_loop(z1.detach(), c2, y2) + _ce_loop(z2, c1, y1)
    assert stats["loss_within"] == pytest.approx(within, rel=1e-5)
    assert stats["loss_cross"] == pytest.approx(cross, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(within + cross, rel=1e-5)
    loss.backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all()
    if ignore:  # a pixel ignored in both y1 and y2 gets no gradient through z1; the others do
        assert z1.grad[0, :, 0, 0].abs().max() == 0
        assert z1.grad[0, :, 0, 1].abs().max() > 0  # ignored in y1 only: still in CE(z1.c2, y2)


def test_picie_loss_all_ignored_is_zero_with_grad():
    z = unit_map(1, 3, 2, 2, 0).requires_grad_(True)
    c = torch.randn(4, 3)
    y = torch.full((1, 2, 2), -1)
    loss, stats = picie_loss(z, z, c, c, y, y)
    assert float(loss.detach()) == 0.0 and stats == {"loss_within": 0.0, "loss_cross": 0.0}
    loss.backward()
    assert z.grad is not None


def test_picie_loss_centroids_get_no_grad_and_shapes_checked():
    z = unit_map(1, 3, 2, 2, 0)
    c = torch.randn(4, 3, requires_grad=True)
    y = torch.zeros(1, 2, 2, dtype=torch.int64)
    loss, _ = picie_loss(z.requires_grad_(True), z, c, c, y, y)
    loss.backward()
    assert c.grad is None
    with pytest.raises(PiCIEInputError, match="c2"):
        picie_loss(z, z, c, torch.randn(4, 5), y, y)
    with pytest.raises(PiCIEInputError, match="y2"):
        picie_loss(z, z, c, c, y, y.int())


# ----------------------------------------------------------------------------- CAE


def _attention_loop(cae: CAE, f, rgb):
    """Slow reference for A over every pixel pair, straight from the formulas."""
    b, _, h, w = f.shape
    n = h * w
    s = max(h, w)
    pos = [((x + 0.5) / s, (y + 0.5) / s) for y in range(h) for x in range(w)]
    a = torch.zeros(b, n, n, dtype=torch.float64)
    for bi in range(b):
        feats = f[bi].flatten(1).double()
        cols = rgb[bi].flatten(1).double()
        for i in range(n):
            row = []
            for j in range(n):
                val = 1.0
                if cae.affinity in ("both", "feature"):
                    cos = float(feats[:, i] @ feats[:, j] / (feats[:, i].norm() * feats[:, j].norm()))
                    val *= math.exp(cos / math.exp(cae.log_tau.item()))
                if cae.affinity in ("both", "raw"):
                    dp = (pos[i][0] - pos[j][0]) ** 2 + (pos[i][1] - pos[j][1]) ** 2
                    dc = float(((cols[:, i] - cols[:, j]) ** 2).sum())
                    ta, tb, tg = (math.exp(p.item()) for p in
                                  (cae.log_theta_alpha, cae.log_theta_beta, cae.log_theta_gamma))
                    w1, w2 = math.exp(cae.log_w1.item()), math.exp(cae.log_w2.item())
                    val *= (w1 * math.exp(-dp / (2 * ta ** 2) - dc / (2 * tb ** 2))
                            + w2 * math.exp(-dp / (2 * tg ** 2)))
                row.append(val)
            total = sum(row)
            for j in range(n):
                a[bi, i, j] = row[j] / total
    return a


@pytest.mark.parametrize("affinity", ["both", "feature", "raw"])
def test_cae_attention_matches_pair_loop(affinity):
    torch.manual_seed(0)
    # bandwidths wide enough that no entry underflows, so the loop is a fair reference
    cae = CAE(4, affinity, tau=0.5, theta_alpha=0.4, theta_beta=0.3, theta_gamma=0.25, w1=0.7, w2=1.3)
    f = torch.randn(2, 4, 2, 3) * 2
    rgb = torch.rand(2, 3, 2, 3)
    a = cae.attention(f, rgb)
    assert a.shape == (2, 6, 6)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 6))
    torch.testing.assert_close(a.double(), _attention_loop(cae, f, rgb), rtol=1e-5, atol=1e-6)
    # forward = projector(A @ f)
    out = cae(f, rgb)
    mixed = (a @ f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, 4, 2, 3)
    torch.testing.assert_close(out, cae.projector(mixed))


def test_cae_default_init_rows_sum_to_one_and_finite():
    cae = CAE(8)
    f, rgb = torch.randn(3, 8, 5, 7), torch.rand(3, 3, 5, 7)
    a = cae.attention(f, rgb)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 35))
    assert cae(f, rgb).shape == (3, 8, 5, 7)


@pytest.mark.parametrize("affinity,params", [
    ("both", {"log_tau", "log_theta_alpha", "log_theta_beta", "log_theta_gamma", "log_w1", "log_w2"}),
    ("feature", {"log_tau"}),
    ("raw", {"log_theta_alpha", "log_theta_beta", "log_theta_gamma", "log_w1", "log_w2"}),
])
def test_cae_gradients_reach_every_kernel_parameter(affinity, params):
    torch.manual_seed(1)
    cae = CAE(4, affinity, theta_gamma=0.3)
    names = {n for n, _ in cae.named_parameters() if not n.startswith("projector")}
    assert names == params  # only the parameters the mode uses exist (no unused DDP params)
    f, rgb = torch.randn(2, 4, 3, 3, requires_grad=True), torch.rand(2, 3, 3, 3)
    (cae(f, rgb) * torch.randn(2, 4, 3, 3)).sum().backward()
    for name, p in cae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert f.grad.abs().sum() > 0


@pytest.mark.parametrize("affinity", ["both", "raw"])
def test_cae_tiny_bandwidths_give_identity(affinity):
    cae = CAE(4, affinity, theta_alpha=1e-3, theta_gamma=1e-3, w1=1e-6)
    f, rgb = torch.randn(2, 4, 4, 5), torch.rand(2, 3, 4, 5)
    a = cae.attention(f, rgb)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, torch.eye(20).expand(2, 20, 20), atol=1e-5, rtol=0)


def test_cae_extreme_values_stay_finite():
    # large cosine/tau and huge colour/position exponents must not overflow (log-space)
    cae = CAE(4, "both", tau=1e-3, theta_alpha=1e-4, theta_beta=1e-4, theta_gamma=1e-4)
    f, rgb = torch.randn(1, 4, 6, 6, requires_grad=True), torch.rand(1, 3, 6, 6)
    out = cae(f, rgb)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(f.grad).all()
    for p in cae.parameters():
        assert torch.isfinite(p.grad).all()


def test_cae_positions_and_bad_affinity():
    pos = cell_positions(2, 4)
    torch.testing.assert_close(pos[[0, 3, 4]], torch.tensor([[0.125, 0.125], [0.875, 0.125], [0.125, 0.375]]))
    with pytest.raises(ValueError, match="affinity"):
        CAE(4, "colour")
    with pytest.raises(ValueError, match="rgb"):
        CAE(4).attention(torch.randn(1, 4, 2, 2), torch.rand(1, 3, 4, 4))


# ----------------------------------------------------------------------------- PGG


def test_pyramid_boxes():
    assert PYRAMID_BOXES.shape == (6, 4) and PYRAMID_BOXES.dtype == torch.float32
    assert PYRAMID_BOXES.tolist() == [
        [0, 0, 1, 1], [0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1],
        [0.25, 0.25, 0.75, 0.75]]


def _region_pool_loop(fmap, boxes):
    b, d, h, w = fmap.shape
    out = torch.zeros(b, boxes.shape[0], d, dtype=torch.float64)
    for v, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cells = [(r, s) for r in range(h) for s in range(w)
                 if x0 <= (s + 0.5) / w <= x1 and y0 <= (r + 0.5) / h <= y1]
        for bi in range(b):
            out[bi, v] = sum(fmap[bi, :, r, s].double() for r, s in cells) / len(cells)
    return out


@pytest.mark.parametrize("hw", [(8, 12), (5, 7), (3, 3)])
def test_region_pool_matches_loop(hw):
    fmap = torch.randn(2, 3, *hw)
    boxes = torch.cat([PYRAMID_BOXES, torch.tensor([[0.1, 0.3, 0.45, 0.9]])])
    got = region_pool(fmap, boxes)
    assert got.shape == (2, 7, 3)
    torch.testing.assert_close(got.double(), _region_pool_loop(fmap, boxes))
    # whole-image box = global average pooling
    torch.testing.assert_close(got[:, 0], fmap.mean((2, 3)))


def test_region_pool_hand_case_and_empty_box_error():
    fmap = torch.arange(8.0).reshape(1, 1, 2, 4)  # rows [0 1 2 3], [4 5 6 7]; centres x .125 .375 .625 .875
    got = region_pool(fmap, torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.3, 0.0, 0.9, 1.0]]))
    torch.testing.assert_close(got, torch.tensor([[[0.5], [(1 + 2 + 3 + 5 + 6 + 7) / 6]]]))
    with pytest.raises(ValueError, match=r"box 1 .*contains no cell"):
        region_pool(fmap, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.4, 0.0, 0.6, 0.2]]))


def test_active_selection_keeps_smallest_with_index_ties():
    d = torch.tensor([0.5, 0.1, 0.3, 0.1, 0.9, 0.3, 0.2])
    # ceil(0.4 * 7) = 3: 0.1 (idx 1), 0.1 (idx 3), 0.2 (idx 6)
    assert active_selection(d, 0.4).tolist() == [False, True, False, True, False, False, True]
    # ceil(0.5 * 7) = 4: the tie at 0.3 goes to idx 2 (lower index) over idx 5
    assert active_selection(d, 0.5).tolist() == [False, True, True, True, False, False, True]
    assert active_selection(torch.zeros(10), 0.7).sum() == 7  # 0.7 * 10 = 7.000000000000001
    assert active_selection(torch.zeros(4), 0.7).tolist() == [True, True, True, False]
    assert not active_selection(d, 0.0).any() and active_selection(d, 1.0).all()
    with pytest.raises(ValueError):
        active_selection(d, 1.5)


def test_guidance_loss_kept_subset_and_none_kept():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (2, 6), generator=g)
    keep = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    expected = F.cross_entropy(logits.detach()[keep], labels[keep])
    torch.testing.assert_close(guidance_loss(logits, labels, keep), expected)
    zero = guidance_loss(logits, labels, torch.zeros(2, 6, dtype=torch.bool))
    assert float(zero.detach()) == 0.0 and zero.requires_grad
    zero.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_cam_head_structures():
    classic, modified = CAMHead(16, 50, modified=False), CAMHead(16, 50, modified=True)
    lin = [m for m in classic.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(16, 50)]
    assert not any(isinstance(m, nn.ReLU) for m in classic.modules())
    layers = list(modified.net)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (16, 16, 50)
    x = torch.randn(7, 16)
    assert classic(x).shape == modified(x).shape == (7, 50)
    torch.testing.assert_close(modified(x), layers[2](torch.relu(layers[0](x))))


def test_pgg_head_shapes_with_and_without_cae():
    torch.manual_seed(0)
    f4, rgb = torch.randn(2, 16, 16, 24), torch.rand(2, 3, 64, 96)
    head = PGGHead(16, cae=True, affinity="both", n_global=50, guidance=True, modified_cam=True)
    emb = head(f4, rgb)
    assert emb.shape == (2, 16, 8, 12)
    assert isinstance(head.cam, CAMHead) and head.cam.modified
    assert head.global_logits(emb, PYRAMID_BOXES).shape == (2, 6, 50)
    emb.sum().backward()
    assert head.cae.log_theta_beta.grad is not None

    plain = PGGHead(16, cae=False, affinity="both", n_global=50, guidance=False, modified_cam=False)
    assert plain.cam is None and plain.cae is None
    out = plain(f4, rgb)
    assert out.shape == (2, 16, 8, 12)
    torch.testing.assert_close(out, plain.proj8(F.avg_pool2d(f4, 2)))
    with pytest.raises(ValueError, match="guidance"):
        plain.global_logits(out, PYRAMID_BOXES)


def test_pgg_head_cae_term_is_the_upsampled_cae():
    torch.manual_seed(0)
    f4, rgb = torch.randn(1, 8, 16, 24), torch.rand(1, 3, 64, 96)
    head = PGGHead(8, cae=True, affinity="raw", n_global=10, guidance=False, modified_cam=False)
    ctx = head.cae(F.avg_pool2d(f4, 4), F.avg_pool2d(rgb, 16))
    expected = head.proj8(F.avg_pool2d(f4, 2)) + F.interpolate(ctx, size=(8, 12), mode="bilinear",
                                                               align_corners=False)
    torch.testing.assert_close(head(f4, rgb), expected)


def test_pgg_head_at_stride_4_keeps_picie_resolution_and_the_cae_ratio():
    """output_stride 4: the embedding stays on the FPN's 1/4 grid, CAE runs at 1/8 (2x coarser, as 1/16 to 1/8)."""
    torch.manual_seed(0)
    f4, rgb = torch.randn(1, 8, 16, 24), torch.rand(1, 3, 64, 96)
    head = PGGHead(8, cae=True, affinity="raw", n_global=10, guidance=True, modified_cam=False, output_stride=4)
    ctx = head.cae(F.avg_pool2d(f4, 2), F.avg_pool2d(rgb, 8))
    assert ctx.shape == (1, 8, 8, 12)
    expected = head.proj8(f4) + F.interpolate(ctx, size=(16, 24), mode="bilinear", align_corners=False)
    emb = head(f4, rgb)
    torch.testing.assert_close(emb, expected)
    assert head.global_logits(emb, PYRAMID_BOXES).shape == (1, 6, 10)
    with pytest.raises(ValueError, match="output_stride"):
        PGGHead(8, cae=False, affinity="raw", n_global=10, guidance=False, modified_cam=False, output_stride=16)


def test_pgg_output_stride_setting_reaches_the_model_and_leaves_run_names_alone():
    from raysseg.config import load_config
    from raysseg.methods.registry import output_stride

    default = load_config("pgg_camvid", [])
    fine = load_config("pgg_camvid", ["pgg.output_stride=4"])
    assert output_stride(default) == 8 and output_stride(fine) == 4
    assert default.run_name() == load_config("pgg_camvid", ["pgg.output_stride=8"]).run_name() != fine.run_name()
