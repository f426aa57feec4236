"""Concept browsing (``raysseg concepts``): a dataset seen through a checkpoint's concepts.

As in the visual-concepts supplement (A.3, Figures 1-3): every image is cut into segments
(pixel sorting of the checkpoint's codes with the config's ``segments.grid`` /
``segments.iterations``), each segment gets the concept whose vector is closest (cosine) to
its prototype, and the result is a columnar :class:`SegmentIndex` that answers

- a gallery: randomly sampled segments of the most frequent concepts, one column each;
- a t-SNE map of sampled segment prototypes, coloured by concept;
- relation queries such as ``"3 left-of 7"`` or ``"12 next-to 4"`` (:func:`query`).

Concepts are the learned dictionary (``Segmenter.concepts``) of a ``concepts`` checkpoint.
Other methods have no dictionary: their concepts are a spherical k-means of all segment
prototypes (``n_concepts`` clusters, numbered by decreasing frequency), and the outputs say so.

Modules: ``index`` (the store and errors), ``geometry``, ``build`` (the index; its Ray pass is
:mod:`raysseg.runtime.segment_index`), ``query``, ``pictures`` and ``command`` (:func:`browse`).
"""
from raysseg.apps.browse.build import build_index
from raysseg.apps.browse.command import browse, concepts_summary
from raysseg.apps.browse.geometry import (
    adjacent_pairs, assign_concepts, segment_batch, segment_geometry, upsample_map,
)
from raysseg.apps.browse.index import (
    INDEX_ARRAYS, INDEX_META, INDEX_VERSION, BrowseError, QueryError, SegmentIndex, checkpoint_fingerprint,
    saved_key,
)
from raysseg.apps.browse.pictures import (
    COLOUR_A, COLOUR_B, gallery, load_view, query_picture, segment_thumbnail, tsne_map,
)
from raysseg.apps.browse.query import RELATIONS, Match, QueryResult, parse_query, query

__all__ = [
    "COLOUR_A", "COLOUR_B", "INDEX_ARRAYS", "INDEX_META", "INDEX_VERSION", "RELATIONS", "BrowseError", "Match",
    "QueryError", "QueryResult", "SegmentIndex", "adjacent_pairs", "assign_concepts", "browse", "build_index",
    "checkpoint_fingerprint", "concepts_summary", "gallery", "load_view", "parse_query", "query", "query_picture",
    "saved_key", "segment_batch", "segment_geometry", "segment_thumbnail", "tsne_map", "upsample_map",
]
