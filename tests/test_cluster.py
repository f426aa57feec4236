"""Spherical k-means: over blocks (``raysseg.core.kmeans.blockwise_kmeans``; on a real local Ray,
``raysseg.runtime.kmeans.kmeans_ray``) and in one process (faiss, or its torch fallback)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from raysseg.core.kmeans import (
    LocalExecutor, _allocate, _update, blockwise_kmeans, kmeans_plus_plus, spherical_kmeans,
)
from raysseg.runtime.kmeans import kmeans_ray


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


def test_torch_fallback_agrees_with_faiss():
    pytest.importorskip("faiss")
    # Well-separated clusters, random starts: both find the same partition and centroids.
    x, centres, labels = _mixture(4_000, 6, 24, noise=0.05, seed=6)
    fa = spherical_kmeans(x, 6, redo=3, seed=1, backend="faiss")
    to = spherical_kmeans(x, 6, redo=3, seed=1, backend="torch")
    for c in (fa, to):
        assert c.shape == (6, 24) and c.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    rows, cols = linear_sum_assignment(-(fa @ to.T))
    np.testing.assert_allclose(to[cols], fa[rows], atol=1e-4)
    _, lab_fa = _mean_cosine(x, fa)
    _, lab_to = _mean_cosine(x, to)
    assert (cols[lab_fa] == lab_to).all()  # the same partition, up to the order of the clusters
    _, truth = linear_sum_assignment(-(fa @ centres.T))
    assert (truth[lab_fa] == labels).all()
    # No structure, the same k-means++ start (redo 2: both start there twice): the same objective.
    y = _normalise(np.random.default_rng(7).normal(size=(3_000, 16)))
    start = kmeans_plus_plus(y, 10, np.random.default_rng(0))
    obj_fa, _ = _mean_cosine(y, spherical_kmeans(y, 10, redo=2, init_centroids=start, backend="faiss"))
    to = spherical_kmeans(y, 10, redo=2, init_centroids=start, backend="torch")
    obj_to, _ = _mean_cosine(y, to)
    assert obj_to == pytest.approx(obj_fa, abs=1e-3)
    # From random starts (other random streams than faiss's: other local optima), about as good,
    # and deterministic for a seed.
    obj_fa, _ = _mean_cosine(y, spherical_kmeans(y, 10, redo=3, seed=2, backend="faiss"))
    to = spherical_kmeans(y, 10, redo=3, seed=2, backend="torch")
    obj_to, _ = _mean_cosine(y, to)
    assert obj_to == pytest.approx(obj_fa, abs=1e-2)
    np.testing.assert_array_equal(to, spherical_kmeans(y, 10, redo=3, seed=2, backend="torch"))
    with pytest.raises(ValueError, match="backend must be"):
        spherical_kmeans(y, 10, backend="sklearn")


def test_local_executor_gives_the_result_of_ray(ray_local):
    x, _, _ = _mixture(9_000, 5, 16, noise=0.4, seed=8)
    cuts = [2000, 2100, 4000, 6000, 6500, 8000]
    for init in ("k-means++", "random"):
        kw = dict(init_sample=1500, assign_passes=2, iterations=5, redo=2, seed=3, init=init)
        local = blockwise_kmeans(np.split(x, cuts), 7, **kw)
        assert blockwise_kmeans(np.split(x, cuts), 7, executor=LocalExecutor(), **kw).centroids.tobytes() \
            == local.centroids.tobytes()
        on_ray = kmeans_ray(_blocks(ray_local, x, cuts), 7, **kw)  # results arrive in any order on Ray
        np.testing.assert_allclose(on_ray.centroids, local.centroids, rtol=0, atol=1e-6)
        assert on_ray.counts.tolist() == local.counts.tolist()
        assert on_ray.mean_cosine == pytest.approx(local.mean_cosine, abs=1e-9)
        assert on_ray.n_points == local.n_points == 9_000


class _ReversedExecutor(LocalExecutor):
    """Hands the per-block results back last block first (as Ray may, in any order)."""

    def map(self, fn, arg_lists):
        return reversed(list(super().map(fn, arg_lists)))


def test_order_of_the_block_results_changes_only_rounding():
    # Many blocks of very different sizes: float64 sums in another order round differently, no more.
    x, _, _ = _mixture(8_000, 6, 20, noise=0.5, seed=9)
    cuts = [1, 3, 50, 51, 700, 2000, 2001, 5000, 7990]
    kw = dict(init_sample=800, assign_passes=3, iterations=4, seed=5)
    fwd = blockwise_kmeans(np.split(x, cuts), 9, executor=LocalExecutor(), **kw)
    rev = blockwise_kmeans(np.split(x, cuts), 9, executor=_ReversedExecutor(), **kw)
    np.testing.assert_allclose(fwd.centroids, rev.centroids, rtol=0, atol=1e-6)
    assert fwd.counts.tolist() == rev.counts.tolist() and fwd.mean_cosine == pytest.approx(rev.mean_cosine, abs=1e-9)
    ref, lab = _mean_cosine(x, fwd.centroids)
    assert fwd.mean_cosine == pytest.approx(ref, abs=1e-6)
    assert fwd.counts.tolist() == np.bincount(lab, minlength=9).tolist()


def test_blockwise_kmeans_checks_its_blocks():
    x = _mixture(100, 2, 8, noise=0.1)[0]
    with pytest.raises(ValueError, match="same D"):
        blockwise_kmeans([x, x[:, :4]], 2, init_sample=50, assign_passes=1)


def test_works_without_faiss():
    code = textwrap.dedent("""
        import sys
        sys.modules["faiss"] = None
        import numpy as np
        from raysseg.core.kmeans import blockwise_kmeans, spherical_kmeans

        rng = np.random.default_rng(0)
        centres = rng.normal(size=(4, 12))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = centres[rng.integers(0, 4, 2000)] + 0.05 * rng.normal(size=(2000, 12))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        for c in (spherical_kmeans(x, 4, redo=2, seed=0),
                  blockwise_kmeans(np.split(x, [700]), 4, init_sample=500, assign_passes=1).centroids):
            assert c.shape == (4, 12) and np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
            assert (c @ centres.T).max(0).min() > 0.99, c @ centres.T
        assert "faiss" not in sys.modules or sys.modules["faiss"] is None
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
