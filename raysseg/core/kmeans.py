"""k-means on L2-normalised codes with faiss (spherical: centroids re-normalised), in one process
(:func:`spherical_kmeans`) or over feature blocks in the Ray object store (:func:`kmeans_ray`)."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np


def spherical_kmeans(x: np.ndarray, k: int, iterations: int = 20, redo: int = 1, seed: int = 0,
                     init_centroids: np.ndarray | None = None) -> np.ndarray:
    """x (N, D) L2-normalised float -> centroids (k, D) L2-normalised.

    Uses every point: faiss would otherwise subsample to 256*k points. Starts from
    ``init_centroids`` (k, D) if given (then every redo starts there), else from k random points.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}; use more images or pixels")
    km = faiss.Kmeans(
        x.shape[1], k, niter=iterations, nredo=redo, spherical=True, seed=seed,
        max_points_per_centroid=max(256, x.shape[0] // k + 1), verbose=False,
    )
    km.train(x, init_centroids=None if init_centroids is None else np.ascontiguousarray(init_centroids, np.float32))
    return km.centroids.copy()


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator, trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding on the sphere (as scikit-learn's): x (N, D) L2-normalised -> (k, D) rows of x.

    Each new centre is the best of ``trials`` (default 2 + log k) candidates drawn with probability
    proportional to the squared chord distance 2 - 2 cos to the nearest centre so far."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}; use more images or pixels")
    trials = trials or 2 + int(np.log(k))
    chosen = [int(rng.integers(n))]
    best = x @ x[chosen[0]]  # cosine to the nearest centre so far
    for _ in range(k - 1):
        d2 = np.maximum(2.0 - 2.0 * best.astype(np.float64), 0.0)
        total = d2.sum()
        cand = rng.choice(n, trials, p=d2 / total) if total > 0 else rng.choice(n, trials)
        nearest = np.maximum(best[:, None], x @ x[cand].T)
        j = int(np.argmin((2.0 - 2.0 * nearest.astype(np.float64)).sum(0)))
        chosen.append(int(cand[j]))
        best = nearest[:, j]
    return x[chosen].copy()


def sample_locations(codes: np.ndarray, per_image: int, rng: np.random.Generator) -> np.ndarray:
    """codes (B, D, h, w) -> (B * min(per_image, h*w), D) codes at random locations of each image."""
    b, d, h, w = codes.shape
    flat = codes.reshape(b, d, h * w).transpose(0, 2, 1)
    n = min(per_image, h * w)
    idx = np.stack([rng.choice(h * w, n, replace=False) for _ in range(b)])
    return np.take_along_axis(flat, idx[:, :, None], axis=1).reshape(-1, d)


# --------------------------------------------------------------------------------------------
# Distributed spherical k-means over feature blocks held in the Ray object store.

_CHUNK_ROWS = 65536  # rows assigned at a time inside a task: bounds the temporaries
_ONE_HOT_ELEMENTS = 1 << 23  # at most this many (64 MiB) in the (k, rows) one-hot matrix of a chunk


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, D) float32, L2-normalised
    counts: np.ndarray  # (k,) int64 points per cluster after the last assignment pass
    mean_cosine: float  # mean cosine of every point to its centroid (higher is better)
    n_points: int
    time_init_s: float  # sizes + sample (Ray tasks) + faiss k-means on the sample
    time_assign_s: float  # every assignment pass, the final one included


def _task_threads() -> int:
    """The CPUs Ray gave this task (at least 1): faiss must not use every core of a shared node."""
    import ray

    if not ray.is_initialized():  # called outside Ray (asking the runtime context would start one)
        return 1
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def _block_shape(x: np.ndarray) -> tuple[int, int, str]:
    return int(x.shape[0]), int(x.shape[1]) if x.ndim == 2 else -1, str(x.dtype)


def _sample_block(x: np.ndarray, m: int, seed: tuple[int, int]) -> np.ndarray:
    """m distinct rows of x drawn at random (sorted, so the read is sequential), as a float32 copy."""
    rng = np.random.default_rng(list(seed))
    idx = np.sort(rng.choice(x.shape[0], m, replace=False)) if m < x.shape[0] else np.arange(x.shape[0])
    return np.ascontiguousarray(x[idx], dtype=np.float32)


def _assign_block(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Nearest centroid (inner product) of every row of x -> (per-cluster sums (k, D) float64,
    counts (k,) int64, sum of the max cosines)."""
    import faiss
    from threadpoolctl import threadpool_limits

    threads = _task_threads()
    faiss.omp_set_num_threads(threads)
    with threadpool_limits(threads, user_api="blas"):  # the one-hot products below
        return _assign_rows(x, centroids)


def _assign_rows(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    import faiss

    k, d = centroids.shape
    index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sums = np.zeros((k, d), np.float64)
    counts = np.zeros(k, np.int64)
    cos_sum = 0.0
    rows = int(np.clip(_ONE_HOT_ELEMENTS // k, 1024, _CHUNK_ROWS))
    one_hot = np.zeros((k, rows), np.float64)
    for start in range(0, x.shape[0], rows):
        chunk = np.ascontiguousarray(x[start:start + rows], dtype=np.float32)
        sim, lab = index.search(chunk, 1)
        lab = lab[:, 0]
        cos_sum += float(sim.sum(dtype=np.float64))
        counts += np.bincount(lab, minlength=k)
        # per-cluster sums as a one-hot matrix product (BLAS): several times faster than sort + reduceat
        n = len(lab)
        one_hot[:, :n] = 0.0
        one_hot[lab, np.arange(n)] = 1.0
        sums += one_hot[:, :n] @ chunk.astype(np.float64)
    return sums, counts, cos_sum


@functools.lru_cache(maxsize=None)
def _remote(fn):
    """``fn`` as a 1-CPU Ray task, made once per process."""
    import ray

    return ray.remote(num_cpus=1)(fn)


def _assign_pass(assign, blocks: list, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    import ray

    cref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
    k, d = centroids.shape
    sums, counts, cos_sum = np.zeros((k, d), np.float64), np.zeros(k, np.int64), 0.0
    pending = [assign.remote(b, cref) for b in blocks]
    while pending:  # reduce as the blocks finish: the caller holds one (k, D) partial at a time
        done, pending = ray.wait(pending, num_returns=1)
        s, c, cs = ray.get(done[0])
        sums += s
        counts += c
        cos_sum += cs
    return sums, counts, cos_sum


def _fit_sample(k: int, iterations: int, redo: int, seed: int, init: str, *parts: np.ndarray) -> np.ndarray:
    """Spherical k-means of the concatenated sample ``parts``: ``redo`` runs, the best mean cosine wins."""
    import faiss
    from threadpoolctl import threadpool_limits

    sample = np.concatenate(parts)
    threads = _task_threads()
    faiss.omp_set_num_threads(threads)
    with threadpool_limits(threads, user_api="blas"):
        if init == "random":
            return spherical_kmeans(sample, k, iterations, redo, seed)
        rng, best, centroids = np.random.default_rng(seed), -np.inf, None
        for run in range(max(1, redo)):
            start = kmeans_plus_plus(sample, k, rng)
            cand = spherical_kmeans(sample, k, iterations, 1, seed + run, init_centroids=start)
            score = mean_max_cosine(sample, cand)
            if score > best:
                centroids, best = cand, score
        return centroids


def mean_max_cosine(x: np.ndarray, centroids: np.ndarray) -> float:
    total = 0.0
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        total += float((x[start:start + _CHUNK_ROWS] @ centroids.T).max(1).sum(dtype=np.float64))
    return total / x.shape[0]


def _update(centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """New centroids: the re-normalised per-cluster sums; a cluster with no points (or a zero sum) keeps its own."""
    norms = np.linalg.norm(sums, axis=1)
    keep = (counts == 0) | (norms <= 0)
    updated = sums / np.where(keep, 1.0, norms)[:, None]
    return np.ascontiguousarray(np.where(keep[:, None], centroids, updated), dtype=np.float32)


def _allocate(sizes: np.ndarray, m: int) -> np.ndarray:
    """Split m sample points over blocks proportionally to their sizes (largest remainder), capped by size."""
    total = int(sizes.sum())
    if m >= total:
        return sizes.copy()
    exact = sizes * (m / total)
    alloc = np.floor(exact).astype(np.int64)
    rest = m - int(alloc.sum())
    if rest:
        alloc[np.argsort(-(exact - alloc), kind="stable")[:rest]] += 1
    return np.minimum(alloc, sizes)


def kmeans_ray(blocks: list, k: int, *, init_sample: int, assign_passes: int, iterations: int = 20,
               redo: int = 1, seed: int = 0, init: str = "k-means++") -> KMeansResult:
    """Spherical k-means of the rows of ``blocks`` (``ray.ObjectRef``s to float32 (n_i, D) arrays
    of L2-normalised features), without bringing the blocks to the caller.

    1. ``init_sample`` points (at least k), spread over the blocks proportionally to their sizes,
       are drawn in Ray tasks and clustered with faiss (:func:`spherical_kmeans`) in one more task, ``redo``
       times from different starts, keeping the run with the best mean cosine on the sample; a
       start is a greedy k-means++ seeding (``init="k-means++"``) or k random points
       (``init="random"``: faiss's own, as in PiCIE);
    2. ``assign_passes`` times, one task per block assigns its rows to the nearest centroid and
       returns per-cluster sums and counts; the centroids become the re-normalised sums (an empty
       cluster keeps its centroid);
    3. a final assignment pass against the returned centroids gives ``counts`` and ``mean_cosine``
       (so ``assign_passes + 1`` passes over the data in all).
    """
    import ray

    if k < 1:
        raise ValueError(f"k-means needs k >= 1 clusters, got k={k}")
    if assign_passes < 0:
        raise ValueError(f"assign_passes must be >= 0, got {assign_passes}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    if not blocks:
        raise ValueError(f"k-means needs at least k={k} points, got no blocks")
    t0 = time.perf_counter()
    shapes = ray.get([_remote(_block_shape).remote(b) for b in blocks])
    dims = {d for _, d, _ in shapes}
    if len(dims) != 1 or -1 in dims:
        raise ValueError(f"every block must be a 2-D (n, D) array with the same D, got shapes "
                         f"{sorted({(n, d) for n, d, _ in shapes})[:5]}")
    sizes = np.array([n for n, _, _ in shapes], np.int64)
    n_total = int(sizes.sum())
    if n_total < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n_total} in {len(blocks)} blocks; "
                         "use more images or pixels, or fewer clusters")
    alloc = _allocate(sizes, max(int(init_sample), k))
    sample_task = _remote(_sample_block)
    parts = [sample_task.remote(b, int(m), (seed, i)) for i, (b, m) in enumerate(zip(blocks, alloc)) if m]
    # The sample goes straight from the sampling tasks to one more task: faiss there runs on the
    # CPU Ray gave it, not on every core of a node the caller may share with other workers.
    centroids = ray.get(_remote(_fit_sample).remote(k, iterations, redo, seed, init, *parts))
    del parts
    t1 = time.perf_counter()

    assign = _remote(_assign_block)
    for _ in range(assign_passes):
        sums, counts, _ = _assign_pass(assign, blocks, centroids)
        centroids = _update(centroids, sums, counts)
    _, counts, cos_sum = _assign_pass(assign, blocks, centroids)
    t2 = time.perf_counter()
    return KMeansResult(centroids=np.ascontiguousarray(centroids, dtype=np.float32), counts=counts,
                        mean_cosine=cos_sum / n_total, n_points=n_total, time_init_s=t1 - t0,
                        time_assign_s=t2 - t1)
