"""train.precision: bf16/fp16 autocast for the network, exact fp32 for every decision.

bf16 autocast runs on the CPU, so these tests exercise the same code paths a GPU run takes.
Tolerance: a first step's total loss under bf16 is within 3% (relative) of the fp32 one on the
same weights and rows. bf16 keeps 8 bits of mantissa (0.4% relative rounding per operation);
the measured gaps on these cases are 0.1-1.4%.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysseg.apps.bench_steps import CPU_SETTINGS, _config
from raysseg.apps.synth import synth_images
from raysseg.core.precision import Precision, exact_fp32
from raysseg.engine.steps import build_rig, memory_rows
from raysseg.methods.hp.core import HPModel, hidden_positive_mask
from raysseg.methods.registry import trained_methods

BF16_LOSS_RTOL = 0.03


def _clustered(n: int, dim: int, centres: int, seed: int) -> torch.Tensor:
    """Unit rows around a few centres: many pairs sit near any threshold, as real features do."""
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(centres, dim, generator=g), dim=1)
    x = c[torch.randint(0, centres, (n,), generator=g)] + 0.35 * torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=1)


def test_exact_fp32_turns_autocast_off_and_on_gpus_tf32_too():
    before = torch.backends.cuda.matmul.allow_tf32
    a = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with exact_fp32():
            assert (a @ a).dtype == torch.float32
            if torch.cuda.is_available():
                assert not torch.backends.cuda.matmul.allow_tf32
        assert (a @ a).dtype == torch.bfloat16
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_hp_positive_masks_identical_under_bf16_autocast():
    feats, pool = _clustered(600, 64, 6, seed=0), _clustered(128, 64, 6, seed=1)
    exact = hidden_positive_mask(feats, pool, chunk=256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = hidden_positive_mask(feats, pool, chunk=256)
    assert torch.equal(exact, under_autocast)
    # what the guard prevents: the same rule on bf16 products flips positives (the released code's fp16 selection)
    f, q = feats.bfloat16(), pool.bfloat16()
    crit = (f @ q.T).float().amax(1)
    sim = (f @ f.T).float()
    low = (sim > crit[:, None]) | (sim > crit[None, :])
    low.fill_diagonal_(False)
    assert (low != exact).sum() > 0


def test_hp_loss_bf16_selects_the_same_positives_and_stays_close():
    torch.manual_seed(0)
    model = HPModel(32, 16)
    feats, feats_aug = torch.randn(2, 32, 6, 6), torch.randn(2, 32, 6, 6)
    attn = torch.randn(2, 36, 36)
    q_ag, q_sp = torch.randn(20, 32), torch.randn(20, 16)
    model.eval()  # no dropout: the same heads in both precisions

    def run(precision: str):
        g = torch.Generator().manual_seed(3)
        with Precision(precision, "cpu").autocast():
            return model.loss(feats, feats_aug, attn, q_ag, q_sp, 0.5, tau=0.8, rho=0.3, alpha=0.05, sigma=4.0,
                              chunk=16, generator=g)

    loss32, stats32 = run("fp32")
    loss16, stats16 = run("bf16")
    assert loss16.dtype == torch.float32
    for key in ("pos_per_anchor", "neg_per_anchor", "kept_frac"):
        assert stats16[key] == stats32[key], key
    loss16, loss32 = float(loss16.detach()), float(loss32.detach())
    assert abs(loss16 - loss32) <= BF16_LOSS_RTOL * abs(loss32)


@pytest.mark.parametrize("method", trained_methods())
def test_first_step_loss_bf16_within_tolerance_of_fp32(method):
    images = synth_images(8, 64, seed=0)
    name, preset = CPU_SETTINGS[method]
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = _config(name, [*preset, f"train.precision={precision}", "hp.warmup=0", "hp.pool_size=8"])
        rig = build_rig(cfg, memory_rows(images), "cpu")
        losses[precision] = rig.trainer.train_step(next(rig.batches()), 0)["loss_total"]
    assert np.isfinite(losses["bf16"])
    assert abs(losses["bf16"] - losses["fp32"]) <= BF16_LOSS_RTOL * abs(losses["fp32"]), losses


def test_fp16_scales_the_loss_and_checkpoints_the_scaler():
    name, preset = CPU_SETTINGS["hp"]
    cfg = _config(name, [*preset, "train.precision=fp16", "hp.pool_size=8"])
    rig = build_rig(cfg, memory_rows(synth_images(8, 64, seed=0)), "cpu")
    batches = rig.batches()
    for step in range(3):
        assert np.isfinite(rig.trainer.train_step(next(batches), step)["loss_total"])
    state = rig.trainer.state_dict()
    assert state["scaler"]["scale"] > 0
    rig.trainer.load_state_dict(state)
    assert rig.trainer.scaler.get_scale() == state["scaler"]["scale"]


@pytest.mark.slow
def test_torch_compile_trains_and_keeps_checkpoint_keys():
    name, preset = CPU_SETTINGS["segsort"]
    compiled = build_rig(_config(name, [*preset, "train.compile=true"]), memory_rows(synth_images(4, 64, seed=0)),
                         "cpu")
    batches = compiled.batches()
    for step in range(2):
        assert np.isfinite(compiled.trainer.train_step(next(batches), step)["loss_total"])
    assert not any("_orig_mod" in key for key in compiled.seg.state_dict())  # checkpoints load without compile


def test_compile_is_not_part_of_the_run_name_and_precision_is():
    name, preset = CPU_SETTINGS["hp"]
    base = _config(name, preset)
    assert _config(name, [*preset, "train.compile=true"]).run_name() == base.run_name()
    assert _config(name, [*preset, "train.precision=fp32"]).run_name() == base.run_name()
    assert _config(name, [*preset, "train.precision=bf16"]).run_name() != base.run_name()
