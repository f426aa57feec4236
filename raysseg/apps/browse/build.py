"""Building a :class:`SegmentIndex`: the Ray pass (:mod:`raysseg.runtime.segment_index`), then each
segment's concept from the checkpoint's dictionary or a spherical k-means of the prototypes."""
from __future__ import annotations

import time

import numpy as np

from raysseg.apps.browse.geometry import assign_concepts
from raysseg.apps.browse.index import BrowseError, SegmentIndex, _log


def _check_args(limit: int | None, n_concepts: int) -> None:
    if limit is not None and limit < 1:
        raise BrowseError(f"--limit must be at least 1, got {limit}")
    if n_concepts < 1:
        raise BrowseError(f"--n-concepts must be at least 1, got {n_concepts}")


def _dictionary_of(ckpt: dict) -> tuple[np.ndarray | None, str]:
    """(dictionary, note): the checkpoint's concepts, or None and why k-means is used instead."""
    from raysseg.io.checkpoints import segmenter_from

    seg = segmenter_from(ckpt)
    concepts = getattr(seg, "concepts", None)
    if concepts is None:
        return None, f"method {seg.cfg.method} has no concept dictionary"
    d = concepts.detach().float().numpy()
    if not np.any(np.linalg.norm(d, axis=1) > 0):
        return None, "the checkpoint's concept dictionary is all zero (not trained)"
    return d, ""


def build_index(checkpoint, split: str | None = None, limit: int | None = None, n_concepts: int = 64,
                seed: int = 0) -> SegmentIndex:
    """Segment every image of ``split`` (default: the config's ``data.train``; the first
    ``limit`` images when given) with a Ray Data actor pool and index the segments.

    ``checkpoint``: a URI for :func:`raysseg.io.checkpoints.read_checkpoint` or an already read
    checkpoint dict. Concepts are the checkpoint's dictionary, else a spherical k-means of
    the prototypes into ``n_concepts`` clusters (fewer when there are fewer segments)."""
    from raysseg.config import config_from_dict
    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.runtime.segment_index import segment_split

    uri = checkpoint if isinstance(checkpoint, str) else checkpoint.get("uri", "<checkpoint>")
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    cfg = config_from_dict(ckpt["config"])
    split = split or cfg.data.train
    _check_args(limit, n_concepts)
    dictionary, note = _dictionary_of(ckpt)
    parts, skipped, t0 = segment_split(ckpt, split, limit, log=_log)
    index = _assemble(parts, cfg, n_concepts if dictionary is None else len(dictionary), dictionary, seed)
    if not index.n_images:
        raise BrowseError(f"no readable images in {split} ({len(skipped)} skipped)")
    index.meta.update({"checkpoint": uri, "split": split, "limit": limit, "skipped": skipped,
                       "note": note, "seconds": round(time.time() - t0, 1)})
    if skipped:
        _log(f"skipped {len(skipped)} unreadable files (first: {skipped[0][0]}: {skipped[0][1]})")
    if index.source == "kmeans":
        _log(f"note: {note}; concepts are a spherical k-means of the segment prototypes ({index.n_concepts} "
             f"clusters, numbered by frequency)")
    _log(f"index: {index.n_segments} segments in {index.n_images} images, {int((index.counts() > 0).sum())} "
         f"of {index.n_concepts} concepts used ({time.time() - t0:.1f} s)")
    return index


def _assemble(parts: list[dict], cfg, k: int, dictionary: np.ndarray | None, seed: int) -> SegmentIndex:
    """Join batch payloads in path order, then give each segment its concept."""
    from raysseg.core.kmeans import spherical_kmeans

    images = sorted(((p, j, b) for j, part in enumerate(parts) for b, p in enumerate(part["paths"])))
    paths, maps, rows, pairs = [], [], [], []
    offset = 0
    for i, (path, j, b) in enumerate(images):
        part = parts[j]
        sel = np.nonzero(part["image"] == b)[0]  # the image's segments, in local id order
        paths.append(path)
        maps.append(part["maps"][b])
        rows.append((j, sel, i))
        lo, hi = sel[0], sel[-1]
        p = part["pairs"]
        p = p[(p[:, 0] >= lo) & (p[:, 0] <= hi)]
        pairs.append(p - lo + offset)
        offset += len(sel)
    if not rows:
        return SegmentIndex(paths=[], image=np.zeros(0), concept=np.zeros(0), area=np.zeros(0), centroid=np.zeros(0),
                            box=np.zeros(0), pairs=np.zeros(0), n_concepts=k, image_size=cfg.data.image_size)

    def cat(name):
        return np.concatenate([parts[j][name][sel] for j, sel, _ in rows])

    image = np.concatenate([np.full(len(sel), i, np.int64) for _, sel, i in rows])
    proto = cat("proto")
    source = "dictionary"
    if dictionary is None:
        source = "kmeans"
        k = min(k, len(proto))  # every image has at least one segment, so k >= 1
        rng = np.random.default_rng(seed)
        sample = proto[np.sort(rng.choice(len(proto), min(len(proto), 200_000), replace=False))]
        dictionary = spherical_kmeans(sample, k, iterations=20, seed=seed)
        order = np.argsort(-np.bincount(assign_concepts(proto, dictionary), minlength=k), kind="stable")
        dictionary = dictionary[order]  # concept 0 is the most frequent
    concept = assign_concepts(proto, dictionary)
    return SegmentIndex(
        paths=paths, image=image, concept=concept, area=cat("area"), centroid=cat("centroid"), box=cat("box"),
        pairs=np.concatenate(pairs), n_concepts=int(len(dictionary)),
        proto=proto, maps=np.stack(maps), dictionary=np.asarray(dictionary, np.float32),
        source=source, image_size=cfg.data.image_size)
