"""Distributed spherical k-means (``raysseg.core.kmeans.kmeans_ray``) on a real local Ray."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from raysseg.core.kmeans import _allocate, _update, kmeans_plus_plus, kmeans_ray, spherical_kmeans


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _mixture(n: int, k: int, d: int, noise: float, seed: int = 0):
    """n points around k random centres on the unit sphere -> (points, centres, labels)."""
    rng = np.random.default_rng(seed)
    centres = _normalise(rng.normal(size=(k, d)))
    labels = rng.integers(0, k, n)
    return _normalise(centres[labels] + noise * rng.normal(size=(n, d))), centres, labels


def _blocks(ray, x: np.ndarray, cuts: list[int]) -> list:
    return [ray.put(b) for b in np.split(x, cuts)]


def _mean_cosine(x: np.ndarray, centroids: np.ndarray) -> tuple[float, np.ndarray]:
    sim = x.astype(np.float64) @ centroids.astype(np.float64).T
    return float(sim.max(1).mean()), sim.argmax(1)


def test_allocate_is_proportional_and_exact():
    sizes = np.array([1000, 10, 0, 2990], np.int64)
    alloc = _allocate(sizes, 400)
    assert alloc.sum() == 400 and alloc.tolist() == [100, 1, 0, 299]
    assert _allocate(sizes, 10_000).tolist() == sizes.tolist()  # more than there is: everything


def test_recovers_separated_centres(ray_local):
    x, centres, labels = _mixture(12_000, 6, 32, noise=0.05)
    blocks = _blocks(ray_local, x, [1000, 5000, 5300, 9000])  # uneven blocks
    r = kmeans_ray(blocks, 6, init_sample=2000, assign_passes=1, redo=2, seed=0)
    assert r.centroids.shape == (6, 32) and r.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(r.centroids, axis=1), 1.0, atol=1e-5)
    rows, cols = linear_sum_assignment(-(r.centroids @ centres.T))
    assert (r.centroids @ centres.T)[rows, cols].min() > 0.99
    assert r.n_points == 12_000 and r.counts.dtype == np.int64 and r.counts.sum() == 12_000
    assert sorted(r.counts.tolist()) == sorted(np.bincount(labels, minlength=6).tolist())
    ref, _ = _mean_cosine(x, r.centroids)
    assert r.mean_cosine == pytest.approx(ref, abs=1e-5)
    assert r.time_init_s > 0 and r.time_assign_s > 0


def test_assignment_pass_is_a_lloyd_step_and_never_lowers_mean_cosine(ray_local):
    # Overlapping clusters and more clusters than components: the pass really moves the centroids.
    x, _, _ = _mixture(9_000, 4, 16, noise=0.4, seed=1)
    blocks = _blocks(ray_local, x, [3000, 6000])
    init = kmeans_ray(blocks, 7, init_sample=500, assign_passes=0, iterations=3, seed=3)
    ref0, lab0 = _mean_cosine(x, init.centroids)
    assert init.mean_cosine == pytest.approx(ref0, abs=1e-5)
    assert init.counts.tolist() == np.bincount(lab0, minlength=7).tolist()

    one = kmeans_ray(blocks, 7, init_sample=500, assign_passes=1, iterations=3, seed=3)
    sums = np.zeros((7, 16))
    np.add.at(sums, lab0, x.astype(np.float64))
    expected = np.where((np.bincount(lab0, minlength=7) > 0)[:, None], _normalise(sums), init.centroids)
    np.testing.assert_allclose(one.centroids, expected, atol=1e-5)
    ref1, lab1 = _mean_cosine(x, one.centroids)
    assert one.mean_cosine == pytest.approx(ref1, abs=1e-5)
    assert one.counts.tolist() == np.bincount(lab1, minlength=7).tolist()
    assert ref1 > ref0  # a Lloyd step never lowers it; here it really moves
    three = kmeans_ray(blocks, 7, init_sample=500, assign_passes=3, iterations=3, seed=3)
    assert three.mean_cosine > one.mean_cosine


def test_empty_cluster_keeps_its_centroid():
    old = _normalise(np.eye(3, 4) + 0.1)
    sums = np.array([[2.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 3.0, 4.0]])
    new = _update(old, sums, np.array([2, 0, 5]))
    np.testing.assert_allclose(new, [[1, 0, 0, 0], old[1], [0, 0, 0.6, 0.8]], atol=1e-7)
    assert new.dtype == np.float32


def test_agrees_with_single_process_kmeans(ray_local):
    x, _, _ = _mixture(6_000, 5, 24, noise=0.3, seed=2)
    blocks = _blocks(ray_local, x, [2500, 4000])
    # A sample as large as the data is the data itself, in block order: the same faiss run.
    whole = kmeans_ray(blocks, 5, init_sample=10_000, assign_passes=0, seed=4, init="random")
    np.testing.assert_allclose(whole.centroids, spherical_kmeans(x, 5, seed=4), atol=1e-4)
    whole = kmeans_ray(blocks, 5, init_sample=10_000, assign_passes=0, seed=4)  # k-means++ start
    start = kmeans_plus_plus(x, 5, np.random.default_rng(4))
    np.testing.assert_allclose(whole.centroids, spherical_kmeans(x, 5, seed=4, init_centroids=start), atol=1e-4)
    # From a 20% sample plus two passes, the objective is as good as clustering everything.
    ref, _ = _mean_cosine(x, spherical_kmeans(x, 5, redo=3, seed=0))
    sampled = kmeans_ray(blocks, 5, init_sample=1200, assign_passes=2, redo=3, seed=0)
    assert sampled.mean_cosine == pytest.approx(ref, abs=2e-3)


def test_kmeans_plus_plus_seeds_one_point_per_separated_cluster():
    x, _, labels = _mixture(3_000, 8, 16, noise=0.02, seed=5)
    seeds = kmeans_plus_plus(x, 8, np.random.default_rng(0))
    assert seeds.shape == (8, 16)
    rows = [int(np.flatnonzero((x == s).all(1))[0]) for s in seeds]
    assert sorted(labels[rows].tolist()) == list(range(8))


def test_fewer_points_than_clusters(ray_local):
    blocks = _blocks(ray_local, _mixture(10, 2, 8, noise=0.1)[0], [4])
    with pytest.raises(ValueError, match="at least k=27 points, got 10"):
        kmeans_ray(blocks, 27, init_sample=100, assign_passes=1)
    with pytest.raises(ValueError, match="no blocks"):
        kmeans_ray([], 3, init_sample=100, assign_passes=1)
    with pytest.raises(ValueError, match="init must be"):
        kmeans_ray(blocks, 2, init_sample=100, assign_passes=1, init="kmeans||")
