"""Segment geometry for browsing: the map geometry of :mod:`raysseg.core.segment_geometry`, and
each segment's concept (:func:`assign_concepts`)."""
from __future__ import annotations

import numpy as np

from raysseg.core.segment_geometry import adjacent_pairs, segment_batch, segment_geometry, upsample_map

__all__ = ["adjacent_pairs", "assign_concepts", "segment_batch", "segment_geometry", "upsample_map"]


def assign_concepts(protos: np.ndarray, dictionary: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Concept of each prototype: argmax cosine with the (normalised) dictionary rows.

    protos (S, D) unit, dictionary (K, D) -> (S,) int64 (``segsort_core.quantize`` in chunks)."""
    import torch
    import torch.nn.functional as F

    from raysseg.methods.segsort.core import quantize

    d = F.normalize(torch.as_tensor(np.asarray(dictionary, np.float32)), dim=1)
    x = torch.as_tensor(np.asarray(protos, np.float32))
    out = [quantize(F.normalize(x[i : i + chunk], dim=1), d) for i in range(0, len(x), chunk)]
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)
