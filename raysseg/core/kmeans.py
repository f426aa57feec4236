"""Spherical k-means on L2-normalised codes (centroids re-normalised after every update).

- :func:`spherical_kmeans`: every point in one process, with faiss when it is importable, else
  an equivalent torch implementation;
- :func:`blockwise_kmeans`: the rows of many feature blocks, wherever the blocks live: an
  *executor* runs the per-block tasks and hands back small per-block results. :class:`LocalExecutor`
  runs them in this process on numpy arrays; ``raysseg.runtime.kmeans.RayExecutor`` runs them as
  Ray tasks on blocks in the object store (``raysseg.runtime.kmeans.kmeans_ray``). Both draw the
  same samples from the same seeds; their sums differ only by float64 rounding (the order in
  which per-block results arrive).

torch and numpy only here: faiss and threadpoolctl are used when importable, never required.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

_CHUNK_ROWS = 65536  # rows handled at a time: bounds the temporaries
_ONE_HOT_ELEMENTS = 1 << 23  # at most this many (64 MiB) in the (k, rows) one-hot matrix of a chunk
_SPLIT_EPS = 1.0 / 1024.0  # faiss's perturbation when an empty cluster takes half of another one


def _faiss():
    """The faiss module, or None where it is not installed (e.g. the GPU image)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@contextlib.contextmanager
def limit_threads(n: int | None):
    """Within the block, at most ``n`` threads for faiss (OpenMP), BLAS (via threadpoolctl, when
    installed) and torch (when imported, or when it stands in for a missing faiss); ``None``: no limit.
    The previous settings come back on exit."""
    if n is None:
        yield
        return
    n = max(1, int(n))
    with contextlib.ExitStack() as stack:
        faiss = _faiss()
        if faiss is not None:
            stack.callback(faiss.omp_set_num_threads, faiss.omp_get_max_threads())
            faiss.omp_set_num_threads(n)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            stack.enter_context(threadpool_limits(n, user_api="blas"))
        if faiss is None or "torch" in sys.modules:
            import torch

            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(n)
        yield


def spherical_kmeans(x: np.ndarray, k: int, iterations: int = 20, redo: int = 1, seed: int = 0,
                     init_centroids: np.ndarray | None = None, backend: str = "auto", device: str = "cpu") -> np.ndarray:
    """x (N, D) L2-normalised float -> centroids (k, D) L2-normalised.

    Uses every point (faiss would otherwise subsample to 256*k points). Starts from
    ``init_centroids`` (k, D) if given (then, as in faiss, each further redo carries on from where
    the previous one ended), else from k random points (other ones in each redo); of the ``redo``
    runs, the one with the highest sum of cosines (at its last assignment) wins.
    An update re-normalises the per-cluster means; a cluster left empty takes half of a populated
    one (chosen with probability growing with its size), both nudged apart, as faiss does.

    ``backend``: ``"faiss"`` (``faiss.Kmeans(spherical=True)``), ``"torch"`` (the same algorithm
    in torch on the CPU, deterministic for a seed; its random starts and splits use other random
    streams than faiss's, so from random starts the two may reach different local optima), or
    ``"auto"`` (default): faiss when it is importable, else torch.
    ``device``: ``"cuda"`` runs faiss on the GPU when faiss was built with GPUs (the ``gpu`` extra),
    else the torch implementation on that device (in exact fp32: no TF32).
    """
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"k-means needs a 2-D (N, D) array, got shape {x.shape}")
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}; use more images or pixels")
    if init_centroids is not None:
        init_centroids = np.ascontiguousarray(init_centroids, dtype=np.float32)
        if init_centroids.shape != (k, x.shape[1]):
            raise ValueError(f"init_centroids must have shape {(k, x.shape[1])}, got {init_centroids.shape}")
    faiss = _faiss() if backend != "torch" else None
    if backend == "faiss" and faiss is None:
        raise ImportError("spherical_kmeans(backend='faiss') needs faiss; use backend='auto' or 'torch'")
    on_gpu = str(device).startswith("cuda")
    if faiss is None or (on_gpu and backend == "auto" and not _faiss_gpus(faiss)):
        return _spherical_kmeans_torch(x, k, iterations, redo, seed, init_centroids, device)
    km = faiss.Kmeans(
        x.shape[1], k, niter=iterations, nredo=redo, spherical=True, seed=seed,
        max_points_per_centroid=max(256, x.shape[0] // k + 1), verbose=False, gpu=on_gpu and _faiss_gpus(faiss),
    )
    km.train(x, init_centroids=init_centroids)
    return km.centroids.copy()


def _faiss_gpus(faiss) -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _spherical_kmeans_torch(x: np.ndarray, k: int, iterations: int, redo: int, seed: int,
                            init_centroids: np.ndarray | None, device: str = "cpu") -> np.ndarray:
    """:func:`spherical_kmeans` in torch: x (N, D) float32 contiguous, N >= k."""
    from raysseg.core.precision import exact_fp32

    with exact_fp32():
        return _lloyd_torch(x, k, iterations, redo, seed, init_centroids, device)


def _lloyd_torch(x, k, iterations, redo, seed, init_centroids, device):
    import torch

    xt = torch.from_numpy(x).to(device)
    n, d = x.shape
    flip = torch.ones(d, dtype=torch.float32, device=device)
    flip[1::2] = -1.0  # faiss's split: even coordinates of the new centroid up, odd down
    best, best_obj = None, -math.inf
    c = None if init_centroids is None else torch.from_numpy(init_centroids.copy()).to(device)
    for run in range(max(1, redo)):
        run_seed = seed + 1 + run * 15486557  # one seed per run, as faiss derives them
        if init_centroids is None:  # else: the input, then where the previous run ended (as faiss)
            gen = torch.Generator().manual_seed(run_seed)
            c = xt[torch.randperm(n, generator=gen)[:k].to(device)].clone()
        c = _normalise_rows_torch(c)
        split_rng = np.random.default_rng(run_seed)
        obj = -math.inf
        for _ in range(max(1, iterations)):
            sums = torch.zeros(k, d, dtype=torch.float64, device=device)
            counts = torch.zeros(k, dtype=torch.int64, device=device)
            total = 0.0
            for start in range(0, n, _CHUNK_ROWS):
                chunk = xt[start:start + _CHUNK_ROWS]
                sim, lab = (chunk @ c.T).max(1)
                total += float(sim.sum(dtype=torch.float64))
                counts += torch.bincount(lab, minlength=k)
                sums.index_add_(0, lab, chunk.to(torch.float64))
            obj = total
            if iterations < 1:  # no update: just the objective of the start
                break
            new = (sums / counts.clamp(min=1)[:, None].to(torch.float64)).to(torch.float32)
            sizes = counts.tolist()
            for ci in range(k):  # faiss's split_clusters
                if sizes[ci] > 0:
                    continue
                cj = 0
                while True:
                    if split_rng.random() < (sizes[cj] - 1.0) / max(n - k, 1):
                        break
                    cj = (cj + 1) % k
                new[ci] = new[cj] * (1 + _SPLIT_EPS * flip)
                new[cj] = new[cj] * (1 - _SPLIT_EPS * flip)
                sizes[ci] = sizes[cj] // 2
                sizes[cj] -= sizes[ci]
            c = _normalise_rows_torch(new)
        if best is None or obj > best_obj:
            best, best_obj = c, obj
    return best.cpu().numpy().copy()


def _normalise_rows_torch(c):
    import torch

    norms = torch.linalg.vector_norm(c, dim=1, keepdim=True)
    return c / torch.where(norms > 0, norms, torch.ones_like(norms))


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


def mean_max_cosine(x: np.ndarray, centroids: np.ndarray) -> float:
    total = 0.0
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        total += float((x[start:start + _CHUNK_ROWS] @ centroids.T).max(1).sum(dtype=np.float64))
    return total / x.shape[0]


# --------------------------------------------------------------------------------------------
# k-means over feature blocks, run by an executor.


class Executor(Protocol):
    """Where the per-block tasks of :func:`blockwise_kmeans` run. ``fn`` is a module-level
    function of this module (picklable by reference); its arguments are blocks, handles from
    :meth:`put` or :meth:`submit`, and small plain values."""

    def put(self, obj: Any) -> Any:
        """A handle to ``obj`` that tasks take in its place (so it is shipped once)."""

    def submit(self, fn: Callable, *args: Any) -> Any:
        """Starts ``fn(*args)`` as one task; returns a handle to its result, which stays with the
        executor (it is only ever passed to later tasks, never fetched by the caller)."""

    def call(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` as one task; returns its result."""

    def map(self, fn: Callable, arg_lists: Iterable[tuple]) -> Iterator[Any]:
        """``fn(*args)`` for every ``args`` in ``arg_lists`` as separate tasks; yields their results
        one at a time, in any order (as they finish)."""


class LocalExecutor:
    """Runs every task in this process, one after another, on the objects themselves (blocks
    are plain numpy arrays). ``threads``: at most this many faiss/BLAS/torch threads inside a
    task (:func:`limit_threads`); ``None`` (default): the process's own settings."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def put(self, obj: Any) -> Any:
        return obj

    def submit(self, fn: Callable, *args: Any) -> Any:
        return self.call(fn, *args)

    def call(self, fn: Callable, *args: Any) -> Any:
        with limit_threads(self.threads):
            return fn(*args)

    def map(self, fn: Callable, arg_lists: Iterable[tuple]) -> Iterator[Any]:
        for args in arg_lists:  # lazily: the caller holds one result at a time
            yield self.call(fn, *args)


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, D) float32, L2-normalised
    counts: np.ndarray  # (k,) int64 points per cluster after the last assignment pass
    mean_cosine: float  # mean cosine of every point to its centroid (higher is better)
    n_points: int
    time_init_s: float  # block sizes + sample + k-means on the sample (tasks)
    time_assign_s: float  # every assignment pass, the final one included


def _block_shape(i: int, x: np.ndarray) -> tuple[int, int, int]:
    """(i, rows, D), with D = -1 if x is not 2-D."""
    return i, (int(x.shape[0]) if x.ndim else 0), (int(x.shape[1]) if x.ndim == 2 else -1)


def _sample_block(x: np.ndarray, m: int, seed: tuple[int, int]) -> np.ndarray:
    """m distinct rows of x drawn at random (sorted, so the read is sequential), as a float32 copy."""
    rng = np.random.default_rng(list(seed))
    idx = np.sort(rng.choice(x.shape[0], m, replace=False)) if m < x.shape[0] else np.arange(x.shape[0])
    return np.ascontiguousarray(x[idx], dtype=np.float32)


def _fit_sample(k: int, iterations: int, redo: int, seed: int, init: str, *parts: np.ndarray) -> np.ndarray:
    """Spherical k-means of the concatenated sample ``parts``: ``redo`` runs, the best mean cosine wins."""
    sample = np.concatenate(parts)
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


def _assign_block(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Nearest centroid (inner product) of every row of x -> (per-cluster sums (k, D) float64,
    counts (k,) int64, sum of the max cosines). faiss finds the nearest when importable, else numpy."""
    faiss = _faiss()
    k, d = centroids.shape
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    index = None
    if faiss is not None:
        index = faiss.IndexFlatIP(d)
        index.add(centroids)
    sums = np.zeros((k, d), np.float64)
    counts = np.zeros(k, np.int64)
    cos_sum = 0.0
    rows = int(np.clip(_ONE_HOT_ELEMENTS // k, 1024, _CHUNK_ROWS))
    one_hot = np.zeros((k, rows), np.float64)
    for start in range(0, x.shape[0], rows):
        chunk = np.ascontiguousarray(x[start:start + rows], dtype=np.float32)
        n = len(chunk)
        if index is not None:
            sim, lab = index.search(chunk, 1)
            sim, lab = sim[:, 0], lab[:, 0]
        else:
            full = chunk @ centroids.T
            lab = full.argmax(1)
            sim = full[np.arange(n), lab]
        cos_sum += float(sim.sum(dtype=np.float64))
        counts += np.bincount(lab, minlength=k)
        # per-cluster sums as a one-hot matrix product (BLAS): several times faster than sort + reduceat
        one_hot[:, :n] = 0.0
        one_hot[lab, np.arange(n)] = 1.0
        sums += one_hot[:, :n] @ chunk.astype(np.float64)
    return sums, counts, cos_sum


def _reduce_pass(executor: Executor, blocks: list, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """One assignment pass: per-block (sums, counts, cosine sum) added up as they arrive, so the
    caller holds one (k, D) partial at a time."""
    k, d = centroids.shape
    cref = executor.put(np.ascontiguousarray(centroids, dtype=np.float32))
    sums, counts, cos_sum = np.zeros((k, d), np.float64), np.zeros(k, np.int64), 0.0
    for s, c, cs in executor.map(_assign_block, [(b, cref) for b in blocks]):
        sums += s
        counts += c
        cos_sum += cs
    return sums, counts, cos_sum


def _block_sizes(executor: Executor, blocks: list) -> np.ndarray:
    """Rows per block (block order), checking the blocks are 2-D with one D."""
    shapes = sorted(executor.map(_block_shape, list(enumerate(blocks))))
    if len({d for _, _, d in shapes}) != 1 or shapes[0][2] == -1:
        raise ValueError(f"every block must be a 2-D (n, D) array with the same D, got shapes "
                         f"{sorted({(n, d) for _, n, d in shapes})[:5]}")
    return np.array([n for _, n, _ in shapes], np.int64)


def assign_pass(blocks: list, centroids: np.ndarray, executor: Executor | None = None
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Assigns every row of ``blocks`` to its nearest centroid (inner product) -> per-cluster sums
    (k, D) float64, counts (k,) int64 and the sum of the max cosines."""
    return _reduce_pass(LocalExecutor() if executor is None else executor, blocks, centroids)


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


def blockwise_kmeans(blocks: list, k: int, *, init_sample: int, assign_passes: int, iterations: int = 20,
                     redo: int = 1, seed: int = 0, init: str = "k-means++",
                     executor: Executor | None = None) -> KMeansResult:
    """Spherical k-means of the rows of ``blocks`` (float (n_i, D) arrays of L2-normalised features,
    or the executor's handles to them), with every pass over the data done by one ``executor``
    task per block (default :class:`LocalExecutor`: in this process, on numpy arrays).

    1. one task per block reads its shape; ``init_sample`` points (at least k),
       spread over the blocks proportionally to their sizes, are drawn in tasks (block i with
       seed ``(seed, i)``) and clustered by :func:`spherical_kmeans` in one more task, ``redo``
       times from different starts, keeping the run with the best mean cosine on the sample; a
       start is a greedy k-means++ seeding (``init="k-means++"``) or k random points
       (``init="random"``: faiss's own, as in PiCIE);
    2. ``assign_passes`` times, one task per block assigns its rows to the nearest centroid and
       returns per-cluster sums and counts; the centroids become the re-normalised sums (an empty
       cluster keeps its centroid);
    3. a final assignment pass against the returned centroids gives ``counts`` and ``mean_cosine``
       (so ``assign_passes + 1`` passes over the data in all).

    Per-block results are added up (float64) as they arrive; executors that return them in another
    order agree to float64 rounding.
    """
    executor = LocalExecutor() if executor is None else executor
    if k < 1:
        raise ValueError(f"k-means needs k >= 1 clusters, got k={k}")
    if assign_passes < 0:
        raise ValueError(f"assign_passes must be >= 0, got {assign_passes}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    if not blocks:
        raise ValueError(f"k-means needs at least k={k} points, got no blocks")
    t0 = time.perf_counter()
    sizes = _block_sizes(executor, blocks)
    n_total = int(sizes.sum())
    if n_total < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n_total} in {len(blocks)} blocks; "
                         "use more images or pixels, or fewer clusters")
    alloc = _allocate(sizes, max(int(init_sample), k))
    parts = [executor.submit(_sample_block, b, int(m), (seed, i))
             for i, (b, m) in enumerate(zip(blocks, alloc)) if m]
    # The sample goes straight from the sampling tasks to one more task (with Ray: never through
    # the caller), and the clustering there runs on the CPUs the executor gave that task.
    centroids = executor.call(_fit_sample, k, iterations, redo, seed, init, *parts)
    del parts
    t1 = time.perf_counter()

    for _ in range(assign_passes):
        sums, counts, _ = _reduce_pass(executor, blocks, centroids)
        centroids = _update(centroids, sums, counts)
    _, counts, cos_sum = _reduce_pass(executor, blocks, centroids)
    t2 = time.perf_counter()
    return KMeansResult(centroids=np.ascontiguousarray(centroids, dtype=np.float32), counts=counts,
                        mean_cosine=cos_sum / n_total, n_points=n_total, time_init_s=t1 - t0,
                        time_assign_s=t2 - t1)
