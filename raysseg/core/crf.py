"""Dense CRF refinement of per-pixel class/cluster probabilities (Kraehenbuehl & Koltun)."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf

from raysseg.core.metrics import EvalInputError


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    iterations: int = 10,
    gauss_sxy: float = 1,
    gauss_compat: float = 3,
    bilateral_sxy: float = 67,
    bilateral_srgb: float = 3,
    bilateral_compat: float = 4,
) -> np.ndarray:
    """Refine probabilities with a fully connected CRF (defaults from METHODS.md).

    image: uint8 (H, W, 3) RGB; probs: float (K, H, W), already at image resolution.
    Unary = -log(probs clipped to >= 1e-8). Returns float32 (K, H, W) marginals
    summing to 1 over K.
    """
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise EvalInputError(f"dense_crf: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise EvalInputError(
            f"dense_crf: probs must be (K, H, W) with (H, W) = {image.shape[:2]} (upsample them first), got {probs.shape}"
        )
    if not np.isfinite(probs).all() or probs.min() < 0:
        raise EvalInputError("dense_crf: probs must be finite and non-negative")
    n_labels, height, width = probs.shape
    unary = -np.log(np.clip(probs, 1e-8, None)).reshape(n_labels, -1)
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image), compat=bilateral_compat
    )
    marginals = np.asarray(crf.inference(iterations), dtype=np.float32)
    return marginals.reshape(n_labels, height, width)
