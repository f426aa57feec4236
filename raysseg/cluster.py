"""k-means on L2-normalised codes with faiss (spherical: centroids re-normalised)."""
from __future__ import annotations

import numpy as np


def spherical_kmeans(x: np.ndarray, k: int, iterations: int = 20, redo: int = 1, seed: int = 0) -> np.ndarray:
    """x (N, D) L2-normalised float -> centroids (k, D) L2-normalised.

    Uses every point: faiss would otherwise subsample to 256*k points.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}; use more images or pixels")
    km = faiss.Kmeans(
        x.shape[1], k, niter=iterations, nredo=redo, spherical=True, seed=seed,
        max_points_per_centroid=max(256, x.shape[0] // k + 1), verbose=False,
    )
    km.train(x)
    return km.centroids.copy()


def sample_locations(codes: np.ndarray, per_image: int, rng: np.random.Generator) -> np.ndarray:
    """codes (B, D, h, w) -> (B * min(per_image, h*w), D) codes at random locations of each image."""
    b, d, h, w = codes.shape
    flat = codes.reshape(b, d, h * w).transpose(0, 2, 1)
    n = min(per_image, h * w)
    idx = np.stack([rng.choice(h * w, n, replace=False) for _ in range(b)])
    return np.take_along_axis(flat, idx[:, :, None], axis=1).reshape(-1, d)
