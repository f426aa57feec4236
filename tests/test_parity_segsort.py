"""SegSort against golden values from the authors' released TensorFlow code (benchmarks/parity/segsort.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raysseg.core.segments import batch_segment_ids, flat_pixels, pixel_sort, segment_prototypes
from raysseg.methods.segsort.core import segment_sort_loss

GOLDEN = Path(__file__).parent / "fixtures" / "parity"


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"segsort_{name}.npz") as z:
        return dict(z)


def close(ours, theirs, rtol: float = 1e-5) -> bool:
    """max |ours - theirs| <= rtol * max |theirs| (fp32)."""
    a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return bool(np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1e-30))


def our_loss(g: dict, memory: bool, shift: float = 0.0, scale: float = 1.0):
    """Our loss (+ shift, x scale) and its gradient w.r.t. the un-normalised embedding (B, H, W, D)."""
    e = torch.from_numpy(g["emb"]).permute(0, 3, 1, 2).requires_grad_()
    ids, _ = batch_segment_ids(torch.from_numpy(g["clusters"]).long())
    ids = ids.reshape(-1)
    n = int(ids.max()) + 1
    pix = flat_pixels(F.normalize(e, dim=1))
    protos, _ = segment_prototypes(pix, ids, n)
    labels = torch.arange(n)
    if memory:
        protos = torch.cat([protos, F.normalize(torch.from_numpy(g["memory"]), dim=1)])
        labels = torch.cat([labels, torch.from_numpy(g["memory_labels"]).long()])
    loss = segment_sort_loss(pix, ids, protos, labels, float(g["kappa"])) * scale + shift
    loss.backward()
    return float(loss.detach()), e.grad.permute(0, 2, 3, 1).numpy()


def test_vmf_loss_and_gradient_match_the_released_code():
    g = load("loss")
    for memory, key in ((False, "unsup"), (True, "memory")):
        loss, grad = our_loss(g, memory)
        assert close(loss, g[f"{key}_loss"]), key
        assert close(grad, g[f"{key}_grad"]), key


def test_a_loss_changed_by_1e_4_fails_the_comparison():
    g = load("loss")
    loss, _ = our_loss(g, True, shift=1e-4)
    assert not close(loss, g["memory_loss"])
    _, grad = our_loss(g, True, scale=1 + 1e-4)
    assert not close(grad, g["memory_grad"])


def test_pixel_sorting_equals_their_kmeans_on_our_features():
    g = load("sort")
    unit = torch.from_numpy(g["unit"]).permute(0, 3, 1, 2)
    ours = pixel_sort(unit, int(g["grid"]), int(g["iterations"])).reshape(len(unit), -1).numpy()
    assert np.array_equal(ours, g["labels"])
    # their location features (y/H, x/W in [0, 1)) give another partition (README, "Checked against ...")
    for a, b in zip(ours, g["their_conventions"]):
        pairs = len(np.unique(a * 1000 + b))
        assert pairs > len(np.unique(a)) or pairs > len(np.unique(b))
