"""Label-free selection scores: NMI by hand, the view score on a model that is right, collapsed or blind."""
import numpy as np
import pytest
import torch

from raysseg.core.selection import jitter_view, nmi, view_nmi


def test_nmi_small_case_by_hand():
    # a = [0,0,1,1], b = [0,1,1,1]: H(a) = ln 2, H(b) = -(1/4 ln 1/4 + 3/4 ln 3/4),
    # I = sum p(x,y) ln p(x,y)/(p(x)p(y)) over (0,0) 1/4, (0,1) 1/4, (1,1) 1/2
    a, b = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    ha = np.log(2)
    hb = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    mi = 0.25 * np.log(0.25 / (0.5 * 0.25)) + 0.25 * np.log(0.25 / (0.5 * 0.75)) + 0.5 * np.log(0.5 / (0.5 * 0.75))
    assert nmi(a, b) == pytest.approx(2 * mi / (ha + hb))


def test_nmi_is_one_for_relabelled_partitions_and_zero_for_independent_or_constant():
    a = np.repeat([0, 1, 2], 4)
    assert nmi(a, (a + 1) % 3 + 10) == pytest.approx(1.0)
    assert nmi(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(0.0)
    assert nmi(np.zeros(6), np.zeros(6)) == 0.0
    with pytest.raises(ValueError, match="differ in size"):
        nmi(np.zeros(3), np.zeros(4))


def test_jitter_view_flips_and_changes_colours_but_keeps_shape():
    rng = np.random.default_rng(0)
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    view = jitter_view(images, rng)
    assert view.shape == images.shape and view.dtype == np.uint8
    # flipped: the left column of the view comes from the right column of the image
    assert np.corrcoef(view[:, :, 0].ravel(), images[:, :, -1].ravel())[0, 1] > 0.5
    assert not np.array_equal(view, images[:, :, ::-1])


class _Coded(torch.nn.Module):
    """A stand-in Segmenter whose codes are a fixed function of the pixels (what view_nmi needs)."""

    training = False

    def __init__(self, fn, k=2):
        super().__init__()
        self.fn = fn
        self.cfg = type("C", (), {"n_clusters": k})()
        self.fitted = torch.tensor(False)
        self.centroids = torch.zeros(k, 2)

    def codes(self, images):
        return torch.nn.functional.normalize(self.fn(images.float()), dim=1)


def _halves(n=4, h=8, w=8):
    """Images whose left half is dark red and right half bright blue."""
    img = np.zeros((n, h, w, 3), np.uint8)
    img[:, :, : w // 2, 0] = 120
    img[:, :, w // 2 :, 2] = 200
    return img


def test_view_nmi_rewards_codes_that_follow_the_scene_and_gives_collapse_zero():
    images = _halves()
    by_hue = _Coded(lambda x: torch.stack([x[..., 0] - x[..., 2], x[..., 2] - x[..., 0] + 1], 1))  # red vs blue
    collapsed = _Coded(lambda x: torch.ones(x.shape[0], 2, x.shape[1], x.shape[2]))
    assert view_nmi(by_hue, images, seed=0) == pytest.approx(1.0)
    assert view_nmi(collapsed, images, seed=0) == 0.0


def test_view_nmi_is_low_for_codes_that_follow_pixel_noise():
    """Grey noise around 128, coded by 'brighter than 128': the jitter moves pixels across
    the threshold, so the two views disagree."""
    noise = np.random.default_rng(0).normal(128, 12, (4, 16, 16, 1)).clip(0, 255).astype(np.uint8)
    images = np.repeat(noise, 3, axis=3)
    by_noise = _Coded(lambda x: torch.stack([x[..., 0] - 128, 128 - x[..., 0]], 1))
    assert view_nmi(by_noise, images, seed=0) < 0.3
