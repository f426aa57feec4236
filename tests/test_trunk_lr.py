"""train.trunk_lr_scale and model.freeze_bn: a pretrained trunk learning slower, fixed, or with its BatchNorm pinned."""
import pytest
import torch

from raysseg.config import ConfigError, load_config
from raysseg.methods.base import load_optimizer_state, optimizer_state
from raysseg.methods.registry import build_segmenter

SMALL = ["data.image_size=64", "model.fpn_dim=16"]


def _seg(*overrides):
    torch.manual_seed(0)
    return build_segmenter(load_config("picie_camvid", [*SMALL, *overrides]), load_backbone_weights=False)


def _step(seg, lr=1e-2):
    opt = torch.optim.SGD(seg.param_groups(lr), lr=lr)
    seg.train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    seg.embed(x).square().mean().backward()
    opt.step()
    return opt


def _changed(before, after, prefix):
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_a_trunk_learns_at_its_scale_and_the_fpn_at_the_full_rate(scale):
    full, scaled = _seg(), _seg(f"train.trunk_lr_scale={scale}")
    before = {k: v.clone() for k, v in scaled.state_dict().items()}
    _step(full)
    _step(scaled)
    after = scaled.state_dict()
    assert _changed(before, after, "backbone.fpn.")  # the FPN always trains
    conv = "backbone.trunk.layer1.0.conv1.weight"
    moved = (after[conv] - before[conv]).abs().max()
    if scale == 0:
        assert not _changed(before, after, "backbone.trunk.")  # weights and BatchNorm statistics stay
        assert not any(p.requires_grad for p in scaled.backbone.trunk.parameters())
    else:
        moved_full = (full.state_dict()[conv] - before[conv]).abs().max()
        assert torch.allclose(moved, scale * moved_full, rtol=1e-4)  # SGD: the step is lr x gradient


def test_freeze_bn_keeps_the_trunks_batchnorm_and_trains_the_rest():
    seg = _seg("model.freeze_bn=true")
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    _step(seg)
    changed = _changed(before, seg.state_dict(), "backbone.trunk.")
    assert changed and not any(".bn" in k or "downsample.1" in k for k in changed)
    assert not seg.backbone.trunk.bn1.training and seg.backbone.trunk.layer1[0].conv1.weight.requires_grad


def test_resume_keeps_the_trunks_learning_rate():
    seg = _seg("train.trunk_lr_scale=0.1")
    opt = _step(seg)
    state = optimizer_state(opt, torch.Generator())
    again = torch.optim.SGD(seg.param_groups(1e-2), lr=1e-2)
    load_optimizer_state(state, again, torch.Generator(), lr=5e-3)
    assert sorted(g["lr"] for g in again.param_groups) == pytest.approx([5e-4, 5e-3])


def test_trunk_settings_keep_old_run_names_at_their_default():
    base = load_config("picie_camvid")
    assert load_config("picie_camvid", ["train.trunk_lr_scale=1.0", "model.freeze_bn=false"]).run_name() == base.run_name()
    assert load_config("picie_camvid", ["train.trunk_lr_scale=0.1"]).run_name() != base.run_name()
    assert load_config("picie_camvid", ["model.freeze_bn=true"]).run_name() != base.run_name()


def test_poly_schedule_and_sgd_as_segsorts_released_training():
    from raysseg.methods.base import make_optimizer, scheduled_lr

    cfg = load_config("segsort_camvid", ["train.optimizer=sgd", "train.lr_schedule=poly", "train.lr=2e-3"])
    assert scheduled_lr(cfg, 0, 100) == pytest.approx(2e-3)
    assert scheduled_lr(cfg, 50, 100) == pytest.approx(2e-3 * 0.5 ** 0.9)
    assert scheduled_lr(cfg, 100, 100) == 0.0
    seg = build_segmenter(load_config("segsort_camvid", ["train.optimizer=sgd", "train.trunk_lr_scale=0.1",
                                                         "data.image_size=64"]), load_backbone_weights=False)
    opt = make_optimizer(seg, seg.cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([seg.cfg.train.lr * 0.1, seg.cfg.train.lr])


@pytest.mark.parametrize("config, setting, says", [
    ("hp_camvid", "train.trunk_lr_scale=0.1", "hp has its own optimiser settings"),
    ("hp_camvid", "train.optimizer=sgd", "hp has its own optimiser settings"),
    ("picie_camvid", "model.frozen=true", None),
])
def test_trunk_settings_refused_where_they_would_do_nothing(config, setting, says):
    if says is None:  # a frozen backbone with a trunk setting
        with pytest.raises(ConfigError, match="model.frozen is true"):
            load_config(config, [setting, "model.freeze_bn=true"])
        return
    with pytest.raises(ConfigError, match=says):
        load_config(config, [setting])
