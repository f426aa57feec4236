"""hp.loss_form: released against the authors' released code, through the golden file that
benchmarks/parity/hp.py wrote from it (tests/fixtures/parity/hp_released.npz): the first training step's
inputs (ViT outputs, dropout masks, pools, random draw, head weights) and the released outputs at lambda 0
and 0.25, plus the released lambda ramp and Q_sp renewal schedule. No released code is needed here."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raysseg.methods.hp.core import (
    HPModel,
    hidden_positive_mask,
    lambda_released,
    released_sp_version,
    shared_negatives,
)

GOLDEN = Path(__file__).parent / "fixtures/parity/hp_released.npz"
RTOL = 1e-5  # relative to the largest magnitude of each quantity (normwise), as the parity script's table
LAMBDAS = (0.0, 0.25)


class ReplayDropout(nn.Module):
    def __init__(self, masks):
        super().__init__()
        self.masks = list(masks)

    def forward(self, x):
        return x * (self.masks.pop(0).float() / 0.9)[:, :, None, None]


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN))


def model_from(g) -> HPModel:
    k, c = g["cluster1.0.weight"].shape[:2]
    model = HPModel(c, k)
    pairs = {"seg.linear": "cluster1.0", "seg.nonlinear.0": "cluster2.0", "seg.nonlinear.2": "cluster2.2"}
    with torch.no_grad():
        for ours, theirs in pairs.items():
            for kind in ("weight", "bias"):
                value = torch.from_numpy(g[f"{theirs}.{kind}"]).float() / 2048  # int8 multiples of 2^-11
                model.get_submodule(ours).get_parameter(kind).copy_(value)
                model.get_submodule("ema_" + ours).get_parameter(kind).copy_(value)  # the EMA head starts as a copy
        model.proj.linear.weight.copy_(torch.from_numpy(g["proj.weight"]))
        model.proj.linear.bias.copy_(torch.from_numpy(g["proj.bias"]))
    return model


def masks_from(g) -> list[torch.Tensor]:
    """The nine masks in released_loss's order: head lin, head nonlin, EMA lin, EMA nonlin, EMA codes, feats,
    mixed codes, aug lin, aug nonlin."""
    c, k = [torch.from_numpy(m) for m in g["masks_c"]], [torch.from_numpy(m) for m in g["masks_k"]]
    return [c[0], c[1], c[2], c[3], k[0], c[4], k[1], c[5], c[6]]


def generator_from(g) -> torch.Generator:
    return torch.Generator().set_state(torch.from_numpy(g["rng_state"]))


def ours_from(g) -> dict[str, np.ndarray]:
    """Our values under the golden file's keys."""
    tau, rho, alpha, sigma = g["hyper"].tolist()
    feat, feat_aug, attn = (torch.from_numpy(g[k]).float() for k in ("feat", "feat_aug", "attn"))
    q_ag, q_sp = torch.from_numpy(g["q_ag"]), torch.from_numpy(g["q_sp"])
    b, _, h, w = feat.shape
    n = h * w
    out = {}
    probe = torch.from_numpy(np.random.RandomState(0).standard_normal(feat.shape[1]).astype(np.float32))
    for lam in LAMBDAS:
        model = model_from(g)
        model.dropout = ReplayDropout(masks_from(g))
        loss, stats = model.loss(feat, feat_aug, attn, q_ag, q_sp, lam, tau=tau, rho=rho, alpha=alpha, sigma=sigma,
                                 chunk=16, generator=generator_from(g), loss_form="released")
        for key, name in (("ghp", "loss_ghp"), ("lhp", "loss_lhp"), ("reg", "loss_consistency"),
                          ("total", "loss_total")):
            out[f"{lam}/{key}"] = np.array(stats[name])
        names = {"seg.linear": "cluster1.0", "seg.nonlinear.0": "cluster2.0", "seg.nonlinear.2": "cluster2.2",
                 "proj.linear": "proj"}
        params = {f"{names[m]}.{kind}": model.get_submodule(m).get_parameter(kind) for m in names
                  for kind in ("weight", "bias")}
        for name, grad in zip(params, torch.autograd.grad(loss, list(params.values()))):
            if name == "cluster2.0.weight":
                grad = grad.flatten(1)
                out[f"{lam}/grad/{name}/row_norm"] = grad.norm(dim=1).numpy()
                out[f"{lam}/grad/{name}/probe"] = (grad @ probe).numpy()
            else:
                out[f"{lam}/grad/{name}"] = grad.numpy()
        # the selection, from the same parts released_loss uses
        keep = [(m.float() / 0.9)[:, :, None, None] for m in masks_from(g)]
        flat = lambda x: F.normalize(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), dim=1)  # noqa: E731
        with torch.no_grad():
            s_ema = (model.ema_seg.linear(feat * keep[2]) + model.ema_seg.nonlinear(feat * keep[3])) * keep[4]
        pos_ag = hidden_positive_mask(flat(feat * keep[5]), q_ag, 16)
        neg = shared_negatives(n, b * n, rho, generator_from(g))
        out[f"{lam}/pos_ag"] = pos_ag.numpy()
        out[f"{lam}/pos_sp"] = hidden_positive_mask(flat(s_ema), q_sp, 16).numpy()
        out[f"{lam}/denominator"] = ((pos_ag | neg.repeat(b, 1)) & ~torch.eye(b * n, dtype=torch.bool)).numpy()
    warmup, total, per_epoch, every = g["schedule"].tolist()
    out["lambda_by_step"] = np.array([lambda_released(t, warmup, total) for t in range(total)])
    out["sp_version_by_step"] = np.array([released_sp_version(t, per_epoch, every) for t in range(total)])
    return out


def failures(ours: dict, golden: dict) -> list[str]:
    """Keys where ours differs from the released value: bool masks must be equal, numbers within RTOL of the
    quantity's largest magnitude."""
    bad = []
    for key, value in ours.items():
        theirs = golden[key]
        if theirs.dtype == bool:
            if not np.array_equal(value, theirs):
                bad.append(f"{key}: {int((value != theirs).sum())} entries differ")
            continue
        err = np.abs(np.asarray(value, np.float64) - theirs).max()
        if err > RTOL * max(np.abs(theirs).max(), 1e-12):
            bad.append(f"{key}: max abs diff {err:.3g}, scale {np.abs(theirs).max():.3g}")
    return bad


@pytest.fixture(scope="module")
def ours(golden):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread (two wait on each other on a loaded machine)
    try:
        return ours_from(golden)
    finally:
        torch.set_num_threads(threads)


def test_the_recorded_random_draw_is_reproduced(golden):
    b, _, h, w = golden["feat"].shape
    rho = float(golden["hyper"][1])
    assert np.array_equal(shared_negatives(h * w, b * h * w, rho, generator_from(golden)).numpy(), golden["neg"]), \
        "torch's CPU generator no longer reproduces the recorded draw: rerun benchmarks/parity/hp.py"


def test_released_form_matches_the_released_code(ours, golden):
    assert set(ours) <= set(golden)
    assert len([k for k in ours if k.startswith("0.25/grad/")]) == 9  # 8 tensors, cluster2.0.weight as 2 summaries
    assert golden["0.25/pos_sp"].any() and golden["0.25/denominator"].sum() > golden["0.25/pos_ag"].sum()
    assert failures(ours, golden) == []


@pytest.mark.parametrize("key", ["0.25/ghp", "0.0/lhp", "0.25/reg", "0.25/grad/proj.weight"])
def test_the_check_fails_when_a_term_moves_by_1e_4(ours, golden, key):
    moved = dict(ours, **{key: ours[key] * (1 + 1e-4)})
    assert [f for f in failures(moved, golden) if f.startswith(key + ":")]
