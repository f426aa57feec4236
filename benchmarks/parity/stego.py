"""STEGO parity: the released code (github mhamilton723/STEGO) and raysseg.methods.stego on the same inputs.

    python benchmarks/parity/stego.py /path/to/STEGO [--out tests/fixtures/parity/stego.npz]

Imports the released ``src/modules.py`` and ``src/precompute_knns.py`` at run time (nothing of them is copied
here) and runs, on small fixed inputs with the same random draws:
- ``tensor_correlation`` of normalised tensors against ``core.correlation``; ``sample`` against ``sample_points``;
- ``ContrastiveCorrelationLoss.helper`` (the shifted loss, pointwise, zero clamp) against ``correspondence_loss``;
- ``ContrastiveCorrelationLoss.forward`` weighted as ``train_segmentation.py``'s training_step does (self = pos_intra,
  knn = pos_inter, random = neg_inter) against ``stego_loss``, and the gradients of the head (the released
  ``DinoFeaturizer`` cluster1 + cluster2 modules, given our ``StegoHead``'s weights) on both sides;
- the KNN selection: ``precompute_knns.get_feats`` (mean-pooled, normalised) and its top-30 search, replayed as
  ``my_app`` does it (an einsum and ``torch.topk``, inside the hydra main, so not importable), against
  ``pooled_features`` and ``nearest_neighbours``.
Prints a table (quantity, max abs diff, max rel diff) and writes the inputs, the draws and the released outputs to
``--out``; ``tests/test_parity_stego.py`` checks ours against that file without the released code.

The released modules import packages unrelated to these functions (``utils`` needs torch._six, wget and torchmetrics;
``dino.vision_transformer``, hydra, omegaconf, pytorch_lightning, the datasets of ``data``): they are replaced
by empty stand-in modules in ``sys.modules`` before the import, in this process only. Runs in the project's venv.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from raysseg.methods.stego.core import (  # noqa: E402
    StegoHead, correlation, correspondence_loss, nearest_neighbours, normalize, pooled_features, random_partner,
    random_points, sample_points, stego_loss,
)

SHIFTS = {"self": 0.18, "knn": 0.12, "random": 0.46}  # the released train_config.yml's active block
WEIGHTS = {"self": 0.67, "knn": 0.25, "random": 0.63}
B, C, D, H, POINTS, N_RANDOM = 3, 8, 5, 6, 4, 3
KNN_IMAGES, KNN_K = 40, 30


def _stub(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def import_released(repo: Path):
    """The released ``modules`` and ``precompute_knns``, with stand-ins for what they import but do not use here."""
    import torch.nn as nn
    import torch.nn.functional as F

    _stub("utils", torch=torch, nn=nn, F=F, np=np)
    _stub("dino")
    _stub("dino.vision_transformer")
    _stub("data", ContrastiveSegDataset=None)
    _stub("hydra", main=lambda **kw: (lambda fn: fn))
    _stub("omegaconf", DictConfig=dict, OmegaConf=None)
    _stub("pytorch_lightning")
    _stub("pytorch_lightning.utilities")
    _stub("pytorch_lightning.utilities.seed", seed_everything=lambda seed: None)
    sys.path.insert(0, str(repo / "src"))
    import modules
    import precompute_knns

    return modules, precompute_knns


def released_cfg(**overrides):
    cfg = dict(pointwise=True, zero_clamp=True, stabalize=False, use_salience=False, feature_samples=POINTS,
               neg_samples=N_RANDOM, pos_intra_shift=SHIFTS["self"], pos_inter_shift=SHIFTS["knn"],
               neg_inter_shift=SHIFTS["random"])
    cfg.update(overrides)
    return types.SimpleNamespace(**cfg)


def inputs() -> dict[str, np.ndarray]:
    """Fixed small inputs: features of a batch and of its KNN partners, head weights, KNN feature maps."""
    g = torch.Generator().manual_seed(0)
    head = StegoHead(C, D)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    out = {"feats": torch.randn(B, C, H, H, generator=g), "feats_knn": torch.randn(B, C, H, H, generator=g),
           "knn_maps": torch.randn(KNN_IMAGES, C, 4, 4, generator=g)}
    out.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return {k: v.numpy() for k, v in out.items()}


def head_from(data: dict) -> StegoHead:
    head = StegoHead(C, D)
    head.load_state_dict({k[5:]: torch.from_numpy(v) for k, v in data.items() if k.startswith("head.")})
    return head.eval()


def draws(seed: int = 7) -> dict[str, np.ndarray]:
    """The random draws of one loss call, in the released order (coords1, coords2, then each permutation),
    from torch's global generator seeded with ``seed``, as the released forward draws them."""
    torch.manual_seed(seed)
    return {"coords1": random_points(B, POINTS).numpy(), "coords2": random_points(B, POINTS).numpy(),
            "partners": torch.stack([random_partner(B) for _ in range(N_RANDOM)]).numpy()}


def ours(data: dict, drawn: dict) -> dict[str, np.ndarray]:
    """Every compared quantity computed by raysseg.methods.stego.core."""
    t = {k: torch.from_numpy(v) for k, v in data.items()}
    d = {k: torch.from_numpy(v) for k, v in drawn.items()}
    out = {"correlation": correlation(normalize(t["feats"]), normalize(t["feats_knn"])),
           "sample": sample_points(t["feats"], d["coords1"])}
    head = head_from(data)
    codes, codes_knn = head(t["feats"]), head(t["feats_knn"])
    for kind in ("self", "knn", "random"):
        loss, cd = correspondence_loss(t["feats"], t["feats_knn"], codes, codes_knn, SHIFTS[kind])
        out[f"helper_{kind}"] = loss
    total, parts = stego_loss(t["feats"], t["feats_knn"], codes, codes_knn, d["coords1"], d["coords2"],
                              list(d["partners"]), shifts=SHIFTS, weights=WEIGHTS)
    total.backward()
    out.update({f"loss_{k}": v for k, v in parts.items()})
    out["loss_total"] = total
    out.update({f"grad.{name}": p.grad for name, p in head.named_parameters()})
    vectors = pooled_features(t["knn_maps"])
    out["knn_vectors"] = vectors
    out["knn"] = nearest_neighbours(vectors, 0, KNN_IMAGES, KNN_K)
    return {k: v.detach().numpy() for k, v in out.items()}


def theirs(modules, precompute_knns, data: dict, drawn: dict) -> dict[str, np.ndarray]:
    """The same quantities from the released functions (the loss with its own draws, seeded as :func:`draws`)."""
    t = {k: torch.from_numpy(v) for k, v in data.items()}
    out = {"correlation": modules.tensor_correlation(modules.norm(t["feats"]), modules.norm(t["feats_knn"])),
           "sample": modules.sample(t["feats"], torch.from_numpy(drawn["coords1"]))}
    dims = types.SimpleNamespace(dim=D)
    linear = modules.DinoFeaturizer.make_clusterer(dims, C)
    nonlinear = modules.DinoFeaturizer.make_nonlinear_clusterer(dims, C)
    linear[0].weight.data, linear[0].bias.data = t["head.linear.weight"].clone(), t["head.linear.bias"].clone()
    for i in (0, 2):
        nonlinear[i].weight.data = t[f"head.nonlinear.{i}.weight"].clone()
        nonlinear[i].bias.data = t[f"head.nonlinear.{i}.bias"].clone()
    code, code_knn = linear(t["feats"]) + nonlinear(t["feats"]), linear(t["feats_knn"]) + nonlinear(t["feats_knn"])
    names = {"self": "pos_intra_shift", "knn": "pos_inter_shift", "random": "neg_inter_shift"}
    loss_fn = modules.ContrastiveCorrelationLoss(released_cfg())
    for kind in ("self", "knn", "random"):
        out[f"helper_{kind}"] = loss_fn.helper(t["feats"], t["feats_knn"], code, code_knn,
                                               getattr(released_cfg(), names[kind]))[0]
    torch.manual_seed(7)
    intra, _, inter, _, neg, _ = loss_fn(t["feats"], t["feats_knn"], None, None, code, code_knn)
    parts = {"self": intra.mean(), "knn": inter.mean(), "random": neg.mean()}
    total = WEIGHTS["knn"] * parts["knn"] + WEIGHTS["self"] * parts["self"] + WEIGHTS["random"] * parts["random"]
    total.backward()
    out.update({f"loss_{k}": v for k, v in parts.items()})
    out["loss_total"] = total
    grads = {"linear.weight": linear[0].weight, "linear.bias": linear[0].bias}
    grads.update({f"nonlinear.{i}.{w}": getattr(nonlinear[i], w) for i in (0, 2) for w in ("weight", "bias")})
    out.update({f"grad.{k}": p.grad for k, p in grads.items()})

    class Batch:  # get_feats moves each batch's "img" to the GPU first; here it is already the feature maps
        def __init__(self, maps):
            self.maps = maps

        def cuda(self):
            return self.maps

    class Identity:
        def forward(self, maps):
            return maps

    loader = [{"img": Batch(t["knn_maps"][i:i + 16])} for i in range(0, KNN_IMAGES, 16)]
    vectors = precompute_knns.get_feats(Identity(), loader)
    out["knn_vectors"] = vectors
    out["knn"] = torch.topk(torch.einsum("nf,mf->nm", vectors, vectors), KNN_K)[1]  # precompute_knns.my_app's search
    return {k: v.detach().numpy() for k, v in out.items()}


def compare(a: dict, b: dict) -> list[tuple[str, float, float]]:
    """(quantity, max abs diff, max rel diff) for every quantity of ``a`` (rel: against max |b|)."""
    rows = []
    for key in a:
        x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
        diff = float(np.abs(x - y).max()) if x.size else 0.0
        rows.append((key, diff, diff / max(float(np.abs(y).max()), 1e-30)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="a copy of github.com/mhamilton723/STEGO")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/parity/stego.npz")
    args = parser.parse_args()
    modules, precompute_knns = import_released(args.repo)
    data, drawn = inputs(), draws()
    mine, reference = ours(data, drawn), theirs(modules, precompute_knns, data, drawn)
    print(f"{'quantity':<28} {'max abs diff':>14} {'max rel diff':>14}")
    for key, diff, rel in compare(mine, reference):
        print(f"{key:<28} {diff:>14.3e} {rel:>14.3e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **{f"in.{k}": v for k, v in {**data, **drawn}.items()},
                        **{f"out.{k}": v for k, v in reference.items()})
    print(f"golden values written to {args.out}")


if __name__ == "__main__":
    main()
