"""The k-means baseline: nothing to train; the offline k-means of the backbone's features."""
from __future__ import annotations

from raysseg.methods.base import MethodSpec

KMEANS = MethodSpec(name="kmeans", summary="baseline: k-means of the backbone's features (nothing trained)")
