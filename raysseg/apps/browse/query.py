"""Relation queries on a :class:`SegmentIndex`, such as ``"3 left-of 7"`` or ``"12 next-to 4"``."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from raysseg.apps.browse.index import QueryError, SegmentIndex

RELATIONS = ("left-of", "right-of", "above", "below", "next-to", "with")


@dataclass
class Match:
    """One matching image and its matching segment pairs (rows of the index), best first."""

    path: str
    image: int
    pairs: list[tuple[int, int]]


@dataclass
class QueryResult:
    text: str
    a: int
    relation: str
    b: int
    matches: list[Match]

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.matches]

    def to_dict(self) -> dict:
        return {"query": self.text, "a": self.a, "relation": self.relation, "b": self.b,
                "n_images": len(self.matches),
                "matches": [{"path": m.path, "pairs": [list(p) for p in m.pairs]} for m in self.matches]}


def parse_query(text: str, n_concepts: int | None = None) -> tuple[int, str, int]:
    """``"<a> <relation> <b>"`` -> (a, relation, b). Relations: left-of, right-of, above,
    below, next-to, with (``_`` works for ``-``; case is ignored). With ``n_concepts``,
    a and b must lie in [0, n_concepts). Raises :class:`QueryError` with a one-line message."""
    tokens = str(text).strip().split()
    usage = '"<concept> <relation> <concept>", e.g. "3 left-of 7"; relations: ' + ", ".join(RELATIONS)
    if len(tokens) != 3:
        raise QueryError(f'query "{text}": expected {usage}')
    a, rel, b = tokens
    rel = rel.lower().replace("_", "-")
    if rel not in RELATIONS:
        raise QueryError(f'query "{text}": unknown relation "{tokens[1]}"; use one of {", ".join(RELATIONS)}')
    ids = []
    for tok in (a, b):
        if not re.fullmatch(r"\d+", tok):
            raise QueryError(f'query "{text}": "{tok}" is not a concept id (a number); expected {usage}')
        c = int(tok)
        if n_concepts is not None and c >= n_concepts:
            raise QueryError(f'query "{text}": unknown concept {c}; this index has concepts 0..{n_concepts - 1}')
        ids.append(c)
    return ids[0], rel, ids[1]


def query(index: SegmentIndex, text: str) -> QueryResult:
    """Images where ``"<a> <relation> <b>"`` holds for some segment s of concept a and some
    *other* segment t of concept b in the same image. With centroids (cy, cx) and boxes
    (y0, x0, y1, x1) as image fractions (y grows downwards):

    - ``a left-of b``: cx(s) < cx(t), and the vertical extents overlap:
      max(y0(s), y0(t)) < min(y1(s), y1(t));
    - ``a right-of b``: cx(s) > cx(t), vertical extents overlapping (= ``b left-of a``);
    - ``a above b``: cy(s) < cy(t), and the horizontal extents overlap:
      max(x0(s), x0(t)) < min(x1(s), x1(t));
    - ``a below b``: cy(s) > cy(t), horizontal extents overlapping (= ``b above a``);
    - ``a next-to b``: s and t are adjacent (some cell of s shares an edge with a cell of t
      on the segment map);
    - ``a with b``: both occur in the image (any s, t).

    a may equal b (two different segments of one concept); then each unordered pair of a
    symmetric relation (next-to, with) is listed once. Matches are ordered by their best
    pair, the one with the largest smaller area min(area(s), area(t)), then by path; each
    match's pairs are ordered the same way. Raises :class:`QueryError` for a malformed
    query or a concept id outside the index's concepts.
    """
    a, rel, b = parse_query(text, index.n_concepts)
    seg_a = np.nonzero(index.concept == a)[0]
    seg_b = np.nonzero(index.concept == b)[0]  # ordered by image (the index is)
    img_b = index.image[seg_b]
    start = np.searchsorted(img_b, index.image[seg_a], side="left")
    stop = np.searchsorted(img_b, index.image[seg_a], side="right")
    lens = stop - start
    ia = np.repeat(seg_a, lens)
    pos = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(start, lens)
    ib = seg_b[pos.astype(np.int64)]
    keep = ia != ib
    if a == b and rel in ("next-to", "with"):
        keep &= ia < ib
    ia, ib = ia[keep], ib[keep]
    (cya, cxa), (cyb, cxb) = index.centroid[ia].T, index.centroid[ib].T
    ba, bb = index.box[ia], index.box[ib]
    overlap_y = np.maximum(ba[:, 0], bb[:, 0]) < np.minimum(ba[:, 2], bb[:, 2])
    overlap_x = np.maximum(ba[:, 1], bb[:, 1]) < np.minimum(ba[:, 3], bb[:, 3])
    if rel == "left-of":
        ok = (cxa < cxb) & overlap_y
    elif rel == "right-of":
        ok = (cxa > cxb) & overlap_y
    elif rel == "above":
        ok = (cya < cyb) & overlap_x
    elif rel == "below":
        ok = (cya > cyb) & overlap_x
    elif rel == "next-to":
        n = max(index.n_segments, 1)
        adjacent = index.pairs[:, 0] * n + index.pairs[:, 1]
        ok = np.isin(np.minimum(ia, ib) * n + np.maximum(ia, ib), adjacent)
    else:  # with
        ok = np.ones(len(ia), bool)
    ia, ib = ia[ok], ib[ok]
    score = np.minimum(index.area[ia], index.area[ib])
    by_image: dict[int, list[tuple[float, int, int]]] = {}
    for s, t, sc in zip(ia.tolist(), ib.tolist(), score.tolist()):
        by_image.setdefault(int(index.image[s]), []).append((-sc, s, t))
    matches = []
    for img, items in by_image.items():
        items.sort()
        matches.append((items[0][0], index.paths[img], Match(index.paths[img], img, [(s, t) for _, s, t in items])))
    matches.sort(key=lambda m: (m[0], m[1]))
    return QueryResult(str(text).strip(), a, rel, b, [m[2] for m in matches])
