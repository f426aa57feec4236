"""exact_select / exact_row_max: bf16 products with an fp32 re-check give the fp32 path's decisions bit for bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raysseg.core.exact_select import error_margins, exact_row_max, exact_select, fast_products, mask_any
from raysseg.core.machine import count_flops_split
from raysseg.core.precision import exact_fp32
from raysseg.methods.hp.core import HPModel, anchor_criterion, hidden_positive_mask

CAMVID = Path(__file__).parents[2] / "shared" / "data" / "camvid" / "train" / "images"


def _unit(*shape, seed=0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g) + shift * torch.randn(1, shape[1], generator=g), dim=1)


def _fp32_select(a, b, row_t, col_t, chunk):
    out = []
    for i in range(0, a.shape[0], chunk):
        sim = a[i:i + chunk] @ b.T
        out.append((sim > row_t[i:i + chunk, None]) | (sim > col_t[None, :]))
    return torch.cat(out)


@pytest.mark.parametrize("scheme,size", [("bf16", (0.0025, 0.0040)), ("bf16x3", (5e-5, 1.2e-4)),
                                         ("fp16", (3e-4, 7e-4))])
def test_error_margins_hold_and_have_the_documented_size(scheme, size):
    a, b = _unit(600, 384, seed=1), _unit(700, 384, seed=2)
    m = error_margins(a, b, scheme)
    assert size[0] < float(m.max()) < size[1]  # module docstring: unit vectors, C = 384
    exact = a.double() @ b.double().T
    fp32 = a @ b.T
    assert ((fast_products(a, b, scheme) - fp32).abs() < m).all()
    assert ((fast_products(a, b, scheme).double() - exact).abs() < m.double()).all()
    # adversarial worst case for the bound's form: all components rounding the same way
    x = torch.full((1, 384), 1.0 + 2.0 ** -8 - 2.0 ** -20)  # bf16 rounds each down by ~2^-8 relative
    x = x / x.norm()
    assert float((fast_products(x, x, scheme) - x @ x.T).abs()) < float(error_margins(x, x, scheme))


def test_the_fast_products_are_exact_products_of_bf16_values():
    """oneDNN's bf16 mode on bf16-valued inputs: only the fp32 accumulation rounds (far below bf16's error)."""
    a, b = _unit(64, 384, seed=3), _unit(80, 384, seed=4)
    for scheme, piece in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        exact = a.to(piece).double() @ b.to(piece).double().T
        assert float((fast_products(a, b, scheme).double() - exact).abs().max()) < 2 * 384 * 2.0 ** -24


@pytest.mark.parametrize("n,m,c,chunk", [(700, 900, 384, 256), (520, 300, 256, 128), (300, 200, 27, 64),
                                         (261, 100, 384, 128)])  # 261 = 2 x 128 + a 5-row tail
@pytest.mark.parametrize("scheme", ["bf16", "bf16x3", "fp16"])
def test_random_unit_vectors_equal_fp32(n, m, c, chunk, scheme):
    f, q = _unit(n, c, seed=n), _unit(m, c, seed=m)
    crit = exact_row_max(f, q, chunk, scheme)
    assert torch.equal(crit, anchor_criterion(f, q, chunk))
    stats = {}
    got = exact_select(f, f, crit, crit, chunk=chunk, scheme=scheme, stats=stats)
    assert torch.equal(got, _fp32_select(f, f, crit, crit, chunk))
    assert 0 < stats["rechecked"] < 0.1 * stats["pairs"]  # shifted (concentrated) vectors: ~3% (one pass) here
    selection = {"bf16": "bf16_recheck", "bf16x3": "bf16x3_recheck", "fp16": "fp16_recheck"}[scheme]
    assert torch.equal(hidden_positive_mask(f, q, chunk, selection), hidden_positive_mask(f, q, chunk))


def _ties(n=512, m=400, c=384, chunk=128):
    """Pool rows that are batch rows, so thresholds equal products exactly (s_ij == c_i: not a positive),
    and near-duplicates within bf16's resolution of each other."""
    f = _unit(n, c, seed=5)
    f[1::2] = F.normalize(f[0::2] + 1e-3 * _unit(n // 2, c, seed=6), dim=1)  # pairs 2^-10 apart
    q = _unit(m, c, seed=7)
    q[:n // 2] = f[0::2][:m]
    return f, q, chunk


def test_ties_at_the_threshold_equal_fp32_and_flip_without_the_recheck():
    f, q, chunk = _ties()
    crit_ref = anchor_criterion(f, q, chunk)
    ref = hidden_positive_mask(f, q, chunk)
    crit = exact_row_max(f, q, chunk)
    assert torch.equal(crit, crit_ref)
    assert torch.equal(hidden_positive_mask(f, q, chunk, "bf16_recheck"), ref)
    assert torch.equal(hidden_positive_mask(f, q, chunk, "fp16_recheck"), ref)
    # the same decisions on the fast products alone (thresholds included) are wrong: the test can fail
    low_crit = fast_products(f, q).amax(dim=1)
    low = fast_products(f, f)
    low = (low > low_crit[:, None]) | (low > low_crit[None, :])
    low.fill_diagonal_(False)
    assert (low != ref).sum() > 0
    # and with the exact thresholds but no re-check of the pairs
    low_exact_t = fast_products(f, f)
    low_exact_t = (low_exact_t > crit[:, None]) | (low_exact_t > crit[None, :])
    low_exact_t.fill_diagonal_(False)
    assert (low_exact_t != ref).sum() > 0


def test_hp_model_selection_setting_gives_the_same_masks():
    torch.manual_seed(0)
    model = HPModel(384, 32)
    feats = torch.randn(2, 384, 14, 14)
    q_ag, q_sp = torch.randn(100, 384), torch.randn(100, 32)
    ref = model.hidden_positives(feats, q_ag, q_sp, 0.5, 64)
    model.selection = "bf16_recheck"
    stats = {}
    got = model.hidden_positives(feats, q_ag, q_sp, 0.5, 64, stats)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    n = 2 * 14 * 14
    assert stats["pairs"] == 2 * (n * 100 + n * n) and 0 < stats["rechecked"] < stats["pairs"]
    for form in ("paper", "released"):  # the losses report the share re-checked, only for a low selection
        for selection in ("fp32", "bf16_recheck"):
            model.selection = selection
            _, loss_stats = model.loss(feats, feats, None, q_ag, q_sp, 0.5, tau=0.2, rho=0.1, alpha=1.0, sigma=1.0,
                                       chunk=64, generator=torch.Generator().manual_seed(0), loss_form=form)
            assert ("recheck_frac" in loss_stats) == ("recheck_gathered_gb" in loss_stats) == (selection != "fp32")
            if selection != "fp32":
                assert 0 < loss_stats["recheck_frac"] < 1 and loss_stats["recheck_gathered_gb"] > 0
    model.selection = "fp16"
    with pytest.raises(ValueError, match="selection must be one of fp32, bf16_recheck"):
        model.hidden_positives(feats, q_ag, None, 0.0, 64)


def test_the_selection_counts_as_exact_fp32_flops_unless_its_products_are_bf16():
    """`bench demand` prices exact fp32 FLOPs at a GPU's fp32 peak: a GEMM inside exact_fp32 counts there, the
    bf16 fast products and anything outside exact_fp32 do not; HP's bf16_recheck selection moves its products
    out of exact fp32 (here only part of them: random features put many pairs near their thresholds)."""
    a, b = _unit(64, 32), _unit(48, 32, seed=1)
    gemm = 2 * 64 * 48 * 32
    with exact_fp32():
        assert count_flops_split(lambda: a @ b.T) == (gemm, gemm)
        assert count_flops_split(lambda: fast_products(a, b)) == (gemm, 0)
        assert count_flops_split(lambda: fast_products(a, b, "fp16")) == (gemm, 0)  # an fp32 GEMM here, not exact
    assert count_flops_split(lambda: a @ b.T) == (gemm, 0)
    torch.manual_seed(0)
    model = HPModel(384, 32)
    feats = torch.randn(2, 384, 14, 14)
    q_ag, q_sp = torch.randn(100, 384), torch.randn(100, 32)
    counts = {}
    for selection in ("fp32", "bf16_recheck", "fp16_recheck"):
        model.selection = selection
        with exact_fp32():
            model.hidden_positives(feats, q_ag, q_sp, 0.5, 64)  # the re-check's self-check runs once, uncounted
            counts[selection] = count_flops_split(lambda: model.hidden_positives(feats, q_ag, q_sp, 0.5, 64))
    n = 2 * 14 * 14
    products = 2 * n * n * 384 + 2 * n * 100 * 384  # patches against patches and against the pool, at least
    total, exact = counts["fp32"]
    assert exact >= products and exact > 0.9 * total
    for low in ("bf16_recheck", "fp16_recheck"):
        total_low, exact_low = counts[low]
        assert total_low - exact_low >= products and exact_low < 0.8 * exact
    assert counts["fp16_recheck"][1] < counts["bf16_recheck"][1]  # a narrower margin, less to re-check


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid images not present")
def test_real_camvid_features_equal_fp32_with_few_rechecks():
    from raysseg.core.backbones import IMAGENET_MEAN, IMAGENET_STD, ViTBackbone

    torch.manual_seed(0)
    files = sorted(CAMVID.glob("*.png"))[::90][:4]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    imgs = [(torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((224, 224)), dtype=np.float32)
                              ).permute(2, 0, 1) / 255 - mean) / std for p in files]
    backbone = ViTBackbone("vit_small_patch16").eval()  # random weights
    with torch.no_grad():
        feats = backbone(torch.stack(imgs)).features  # [4, 384, 14, 14]
    f = F.normalize(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), dim=1)  # N = 784
    pool, chunk = f[torch.randperm(f.shape[0])[:256]].clone(), 256  # a pool of batch patches: exact ties
    crit = anchor_criterion(f, pool, chunk)
    ref = hidden_positive_mask(f, pool, chunk)
    shares = {}
    for scheme in ("bf16", "bf16x3", "fp16"):
        stats_max, stats_sel = {}, {}
        assert torch.equal(exact_row_max(f, pool, chunk, scheme, stats=stats_max), crit)
        got = exact_select(f, f, crit, crit, chunk=chunk, scheme=scheme, stats=stats_sel)
        got.fill_diagonal_(False)
        assert torch.equal(got, ref)
        shares[scheme] = stats_sel["rechecked"] / stats_sel["pairs"]
        print(f"{scheme}: re-checked {shares[scheme]:.3%} of pairs in the mask, "
              f"{stats_max['rechecked'] / stats_max['pairs']:.3%} of pairs for the row maxima")
    # a random ViT's patches are concentrated (similarities crowd the thresholds): one bf16 pass's margin
    # (~0.0035) leaves a few % to re-check (2.4% measured); three passes' (~8e-5) under 1% (0.47% measured, much of
    # it exact ties: the pool's patches are batch patches, so each row meets its own maximum); one fp16 pass's
    # (~5e-4) 0.94%
    assert shares["bf16"] < 0.06
    assert 0 < shares["bf16x3"] < 0.01
    assert 0 < shares["fp16"] < shares["bf16"] / 2


def test_a_blas_whose_gemm_values_depend_on_the_shape_falls_back_to_fp32(monkeypatch):
    """Where the machine's self-check finds a re-check GEMM differing from the fp32 path's, every product is
    computed in fp32: the same decisions, and stats say so."""
    from raysseg.core import exact_select as module

    a, b = _unit(300, 64), _unit(200, 64, seed=1)
    t = torch.full((300,), 0.1)
    with exact_fp32():
        ref = torch.cat([a[i:i + 128] @ b.T for i in range(0, 300, 128)]) > t[:, None]
    monkeypatch.setattr(module, "_RECHECK_EXACT", {}, raising=True)
    monkeypatch.setattr(module, "recheck_is_exact", lambda *shape: False)
    stats = {}
    assert torch.equal(exact_select(a, b, t, chunk=128, stats=stats), ref)
    assert stats["fallback"] and stats["rechecked"] == stats["pairs"]


def test_recheck_pads_each_group_to_its_width_class_not_to_the_widest_group():
    """One group with every column uncertain, fourteen with one each, one with none: the fp32 values of exactly the
    uncertain pairs, and GEMM work of 16 x (512 + 14 x 32) columns (the wide group, then the narrow ones padded to
    32), not 16 groups x 512; its gathers write those groups' rows and columns, (15 x 16 + 512 + 14 x 32) x 64
    floats."""
    from torch.utils.flop_counter import FlopCounterMode

    from raysseg.core.exact_select import _recheck

    a, b = _unit(256, 64), _unit(512, 64, seed=1)
    maybe = torch.zeros(256, 512, dtype=torch.bool)
    maybe[0] = True
    for group in range(1, 16):
        if group != 3:
            maybe[16 * group + group % 16, 7 * group] = True
    with exact_fp32():
        ref = a @ b.T
        stats = {}
        with FlopCounterMode(display=False) as counter:
            r, c, vals = _recheck(a, b, maybe, stats)
    assert torch.equal(torch.stack([r, c]), torch.stack(maybe.nonzero(as_tuple=True)))
    assert torch.equal(vals, ref[r, c])
    assert counter.get_total_flops() == 2 * 16 * 64 * (512 + 14 * 32)
    assert stats["gathered"] == (15 * 16 + 512 + 14 * 32) * 64


def test_the_recheck_groups_similar_rows_so_their_unions_are_narrower():
    """Rows of two clusters, interleaved, each cluster with its own uncertain columns: 16 consecutive rows need
    both clusters' columns, 16 rows along the first principal direction only one's; the values stay fp32's."""
    from torch.utils.flop_counter import FlopCounterMode

    from raysseg.core.exact_select import _principal_key, _recheck, _recheck_similar

    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(2, 64, generator=g), dim=1)
    a = F.normalize(centres[torch.arange(256) % 2] + 0.05 * torch.randn(256, 64, generator=g), dim=1)
    b = _unit(512, 64, seed=1)
    maybe = torch.zeros(256, 512, dtype=torch.bool)
    maybe[0::2, :100] = True
    maybe[1::2, 100:200] = True
    with exact_fp32():
        ref = a @ b.T
        flops = {}
        for name, fn in (("consecutive", _recheck),
                         ("similar", lambda a, b, maybe: _recheck_similar(a, b, maybe, _principal_key(a)))):
            with FlopCounterMode(display=False) as counter:
                r, c, vals = fn(a, b, maybe)
            flops[name] = counter.get_total_flops()
            assert torch.equal(vals, ref[r, c])
            got = torch.zeros(256, 512)
            got[r, c] = vals
            assert r.shape[0] == int(maybe.sum()) and torch.equal(got, torch.where(maybe, ref, torch.zeros(())))
    assert flops["similar"] < 0.6 * flops["consecutive"]


@pytest.mark.parametrize("scheme", ["bf16", "bf16x3"])
def test_a_against_itself_computes_half_the_fast_products_and_decides_the_same(scheme):
    """exact_select(a, a): each chunk's fast products cover its own and later columns only; the pairs before them
    are decided on the transposed products (re-checked as the fp32 path computes them); the mask equals fp32's."""
    f = _unit(640, 96, seed=11)  # 5 chunks of 128
    crit = exact_row_max(f, _unit(200, 96, seed=12), 128, scheme)
    ref = _fp32_select(f, f, crit, crit, 128)
    with exact_fp32():
        counts = {name: count_flops_split(lambda: exact_select(f, other, crit, crit, chunk=128, scheme=scheme))
                  for name, other in (("itself", f), ("a copy", f.clone()))}
    stats = {}
    assert torch.equal(exact_select(f, f, crit, crit, chunk=128, scheme=scheme, stats=stats), ref)
    assert torch.equal(exact_select(f, f.clone(), crit, crit, chunk=128, scheme=scheme), ref)
    assert stats["pairs"] == 640 * 640 and 0 < stats["rechecked"]
    per_product = 2 * 96 * (3 if scheme == "bf16x3" else 1)
    fast = {name: total - exact for name, (total, exact) in counts.items()}
    assert fast["a copy"] == 640 * 640 * per_product
    assert fast["itself"] == 128 * (640 + 512 + 384 + 256 + 128) * per_product  # 60% of it: chunks of 128


def test_mask_any_equals_torch_any_on_contiguous_sliced_and_grouped_masks():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(48, 33, generator=g) < 0.03
    mask[3] = False
    for m in (mask, mask[5:17], mask[:, 4:20], mask.T):
        for dim in (0, 1):
            assert torch.equal(mask_any(m, dim), m.any(dim=dim))
    grouped = mask.view(3, 16, 33)
    assert torch.equal(mask_any(grouped, 1), grouped.any(dim=1))
