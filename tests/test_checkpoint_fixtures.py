"""Checkpoints written by earlier code (tests/fixtures/checkpoints, made by its make.py) still load,
give the codes and cluster maps they gave when written, and evaluate."""
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
METHODS = ["kmeans", "hp", "picie", "pgg", "segsort", "concepts"]


def unpacked(name: str, tmp_path: Path) -> str:
    path = tmp_path / name.removesuffix(".xz")
    path.write_bytes(lzma.decompress((FIXTURES / name).read_bytes()))
    return str(path)


@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_of_the_earlier_layout_loads_and_gives_the_same_maps(method, tmp_path):
    from raysseg.io.checkpoints import load_segmenter

    seg, ckpt = load_segmenter(unpacked(f"{method}.pt.xz", tmp_path))
    assert seg.cfg.method == method and ckpt["finished"] and ckpt["progress"]["clustered"]
    expected = np.load(FIXTURES / f"{method}.npz")
    images = torch.from_numpy(expected["images"])
    codes = seg.codes(images)
    np.testing.assert_allclose(codes.numpy(), expected["codes"], atol=1e-5)
    # the same map wherever the best centroid wins by a margin (ties may go either way with other threads)
    logits = F.interpolate(seg.cluster_logits(codes), size=images.shape[1:3], mode="bilinear", align_corners=False)
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1] > 1e-6).numpy()
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(seg.cluster_map(images).numpy()[clear], expected["maps"][clear])


def test_a_moco_backbone_of_the_earlier_layout_loads(tmp_path):
    from raysseg.core.backbones import build_backbone

    path = unpacked("moco_backbone.pt.xz", tmp_path)
    state = torch.load(path, weights_only=True)
    backbone = build_backbone("resnet18_fpn", weights=path, frozen=False, fpn_dim=64)
    loaded = backbone.state_dict()
    assert state and all(torch.equal(loaded[k], v) for k, v in state.items())
