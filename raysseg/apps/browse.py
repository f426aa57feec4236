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

Geometry is measured on the code map (the image at ``1/stride``): a segment's area is its
fraction of the map's cells, its centroid the mean of its cell centres, and its box the
cells it spans, all as fractions of the (square, centre-cropped) image in [0, 1].
Images are read exactly as the evaluation reads them (centre square resized to
``data.image_size``), so boxes and segment maps line up with the decoded pictures.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RELATIONS = ("left-of", "right-of", "above", "below", "next-to", "with")
INDEX_VERSION = 1
INDEX_ARRAYS = "segments.npz"
INDEX_META = "index.json"
COLOUR_A = (255, 140, 0)  # first concept of a query: orange
COLOUR_B = (0, 190, 255)  # second concept: sky blue


class BrowseError(ValueError):
    """A browsing request that cannot be served (empty split, bad argument); one line."""


class QueryError(BrowseError):
    """A malformed relation query or an unknown concept id."""


# --------------------------------------------------------------------------- the index


@dataclass
class SegmentIndex:
    """Segments of a split, one row per segment (columns are numpy arrays).

    Segments are ordered by image, then by their id in that image's segment map.
    ``box`` is (y0, x0, y1, x1) and ``centroid`` (cy, cx), fractions of the image side.
    ``pairs`` holds the adjacent segments (global row numbers, first < second): two
    segments are adjacent when a cell of one shares an edge with a cell of the other on
    the segment map (4-neighbourhood). ``maps`` (n_images, h, w) gives each cell's segment
    id within its image (row ``image_start[i] + maps[i, y, x]``); it may be None in a
    hand-built index (then no pictures can be drawn).
    """

    paths: list[str]
    image: np.ndarray  # (S,) int64 index into paths
    concept: np.ndarray  # (S,) int64
    area: np.ndarray  # (S,) float32, fraction of the image
    centroid: np.ndarray  # (S, 2) float32 (cy, cx)
    box: np.ndarray  # (S, 4) float32 (y0, x0, y1, x1)
    pairs: np.ndarray  # (P, 2) int64 adjacent segments, first < second
    n_concepts: int
    proto: np.ndarray | None = None  # (S, D) float32 unit prototypes
    maps: np.ndarray | None = None  # (n_images, h, w) int16 segment id within the image
    dictionary: np.ndarray | None = None  # (K, D) float32 concept vectors
    source: str = "dictionary"  # "dictionary" (the checkpoint's) or "kmeans" (of the prototypes)
    image_size: int = 0  # side of the decoded square image the maps cover
    meta: dict = field(default_factory=dict)  # checkpoint, split, key, skipped files

    def __post_init__(self):
        self.image = np.asarray(self.image, np.int64)
        self.concept = np.asarray(self.concept, np.int64)
        self.area = np.asarray(self.area, np.float32)
        self.centroid = np.asarray(self.centroid, np.float32).reshape(-1, 2)
        self.box = np.asarray(self.box, np.float32).reshape(-1, 4)
        self.pairs = np.asarray(self.pairs, np.int64).reshape(-1, 2)
        if len(self.image) and np.any(np.diff(self.image) < 0):
            raise BrowseError("SegmentIndex: segments must be ordered by image")
        if len(self.image) and (self.image.min() < 0 or self.image.max() >= len(self.paths)):
            raise BrowseError("SegmentIndex: a segment's image is outside paths")

    @property
    def n_images(self) -> int:
        return len(self.paths)

    @property
    def n_segments(self) -> int:
        return len(self.image)

    @property
    def image_start(self) -> np.ndarray:
        """(n_images + 1,) first segment row of each image (and the total at the end)."""
        return np.searchsorted(self.image, np.arange(self.n_images + 1))

    def counts(self) -> np.ndarray:
        """(K,) segments per concept."""
        return np.bincount(self.concept, minlength=self.n_concepts)

    def image_counts(self) -> np.ndarray:
        """(K,) images holding at least one segment of each concept."""
        if not self.n_segments:
            return np.zeros(self.n_concepts, np.int64)
        uniq = np.unique(self.image * self.n_concepts + self.concept)
        return np.bincount(uniq % self.n_concepts, minlength=self.n_concepts)

    def segment_mask(self, row: int, size: int | None = None) -> np.ndarray:
        """Boolean (size, size) mask of segment ``row`` (default size: the image size)."""
        if self.maps is None:
            raise BrowseError("this index has no segment maps; pictures need an index built by build_index")
        size = size or self.image_size
        i = int(self.image[row])
        local = row - int(self.image_start[i])
        return upsample_map(self.maps[i], size) == local

    def save(self, folder: str | Path) -> None:
        """``segments.npz`` (arrays) and ``index.json`` (paths, settings), written last."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"image": self.image, "concept": self.concept, "area": self.area, "centroid": self.centroid,
                  "box": self.box, "pairs": self.pairs}
        for name in ("proto", "maps", "dictionary"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        tmp = folder / (INDEX_ARRAYS + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, folder / INDEX_ARRAYS)
        meta = {"version": INDEX_VERSION, "n_concepts": self.n_concepts, "source": self.source,
                "image_size": self.image_size, "meta": self.meta, "paths": self.paths}
        tmp = folder / (INDEX_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, folder / INDEX_META)

    @classmethod
    def load(cls, folder: str | Path) -> "SegmentIndex":
        folder = Path(folder)
        if not (folder / INDEX_META).is_file() or not (folder / INDEX_ARRAYS).is_file():
            raise BrowseError(f"{folder} holds no segment index ({INDEX_META} and {INDEX_ARRAYS})")
        meta = json.loads((folder / INDEX_META).read_text())
        if meta.get("version") != INDEX_VERSION:
            raise BrowseError(f"{folder / INDEX_META} is index version {meta.get('version')}, expected {INDEX_VERSION}")
        with np.load(folder / INDEX_ARRAYS) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(paths=meta["paths"], n_concepts=meta["n_concepts"], source=meta["source"],
                   image_size=meta["image_size"], meta=meta["meta"], proto=arrays.pop("proto", None),
                   maps=arrays.pop("maps", None), dictionary=arrays.pop("dictionary", None), **arrays)


def saved_key(folder: str | Path) -> dict | None:
    """The build key of the index saved in ``folder``, or None when there is none."""
    path = Path(folder) / INDEX_META
    if not path.is_file() or not (Path(folder) / INDEX_ARRAYS).is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError:
        return None
    return meta.get("meta", {}).get("key") if meta.get("version") == INDEX_VERSION else None


# --------------------------------------------------------------------------- segment geometry


def upsample_map(seg_map: np.ndarray, size: int) -> np.ndarray:
    """Nearest upsampling of an (h, w) map to (size, size): pixel p takes cell p * h // size."""
    h, w = seg_map.shape
    rows = np.arange(size) * h // size
    cols = np.arange(size) * w // size
    return seg_map[rows][:, cols]


def segment_geometry(ids: np.ndarray, n_segments: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area, centroid and box of each segment of id maps (B, h, w) with ids in [0, n_segments).

    Returns area (S,) (fraction of one map's cells), centroid (S, 2) (cy, cx) of the cell
    centres and box (S, 4) (y0, x0, y1, x1) of the cells spanned, all as fractions in [0, 1].
    A segment id that does not occur gets area 0 and NaN geometry."""
    ids = np.asarray(ids)
    b, h, w = ids.shape
    flat = ids.reshape(-1).astype(np.int64)
    rows = np.broadcast_to(np.arange(h)[None, :, None], ids.shape).reshape(-1)
    cols = np.broadcast_to(np.arange(w)[None, None, :], ids.shape).reshape(-1)
    count = np.bincount(flat, minlength=n_segments).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=rows + 0.5, minlength=n_segments) / count / h
        cx = np.bincount(flat, weights=cols + 0.5, minlength=n_segments) / count / w
    y0 = np.full(n_segments, np.inf)
    x0 = np.full(n_segments, np.inf)
    y1 = np.full(n_segments, -np.inf)
    x1 = np.full(n_segments, -np.inf)
    np.minimum.at(y0, flat, rows)
    np.minimum.at(x0, flat, cols)
    np.maximum.at(y1, flat, rows + 1)
    np.maximum.at(x1, flat, cols + 1)
    box = np.stack([y0 / h, x0 / w, y1 / h, x1 / w], 1)
    box[count == 0] = np.nan
    area = count / (h * w)
    return area.astype(np.float32), np.stack([cy, cx], 1).astype(np.float32), box.astype(np.float32)


def adjacent_pairs(ids: np.ndarray) -> np.ndarray:
    """Pairs of segment ids that share an edge (4-neighbourhood) on id maps (h, w) or (B, h, w).

    Maps of a batch are never joined to each other. Returns (P, 2) int64, first < second,
    sorted and without repeats."""
    ids = np.asarray(ids).astype(np.int64)
    if ids.ndim == 2:
        ids = ids[None]
    pairs = [np.stack([ids[:, :, :-1].reshape(-1), ids[:, :, 1:].reshape(-1)], 1),
             np.stack([ids[:, :-1, :].reshape(-1), ids[:, 1:, :].reshape(-1)], 1)]
    p = np.concatenate(pairs)
    p = p[p[:, 0] != p[:, 1]]
    p = np.sort(p, axis=1)
    return np.unique(p, axis=0) if len(p) else np.zeros((0, 2), np.int64)


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


# --------------------------------------------------------------------------- building


def checkpoint_fingerprint(ckpt: dict) -> str:
    """A hash of a checkpoint's config and weights (the index is reused only for the same one)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(ckpt["config"], sort_keys=True, default=str).encode())
    for name, t in sorted(ckpt["state"].items()):
        h.update(name.encode())
        t = t.detach().cpu().reshape(-1).contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _dictionary_of(seg) -> tuple[np.ndarray | None, str]:
    """(dictionary, note): the checkpoint's concepts, or None and why k-means is used instead."""
    concepts = getattr(seg, "concepts", None)
    if concepts is None:
        return None, f"method {seg.cfg.method} has no concept dictionary"
    d = concepts.detach().float().numpy()
    if not np.any(np.linalg.norm(d, axis=1) > 0):
        return None, "the checkpoint's concept dictionary is all zero (not trained)"
    return d, ""


class SegmentIndexer:
    """Ray Data actor: a batch of decoded images -> its segments (one pickled payload row)."""

    def __init__(self, ckpt_ref):
        import ray
        import torch

        from raysseg.config import config_from_dict
        from raysseg.core.segmenter import Segmenter

        ckpt = ray.get(ckpt_ref[0])
        self.cfg = config_from_dict(ckpt["config"])
        self.seg = Segmenter(self.cfg, load_backbone_weights=False)
        self.seg.load_state_dict(ckpt["state"])
        self.seg.eval()
        torch.set_num_threads(1)

    def __call__(self, batch: dict) -> dict:
        from raysseg.io.images import valid_rows

        batch, skipped = valid_rows(batch)
        payload = segment_batch(self.seg, batch["image"], self.cfg.segments.grid, self.cfg.segments.iterations)
        payload["paths"] = [str(p) for p in batch["path"]]
        payload["skipped"] = skipped
        return {"payload": np.array([pickle.dumps(payload)], dtype=object)}


def segment_batch(seg, images: np.ndarray, grid: int, iterations: int) -> dict:
    """Segments of uint8 images (B, H, W, 3) with a Segmenter: per-image local maps (B, h, w),
    and per segment its image (in the batch), area, centroid, box and prototype; adjacent
    pairs as local segment rows of the batch."""
    import torch

    from raysseg.core.segments import image_segments

    if len(images) == 0:
        return {"maps": np.zeros((0, 1, 1), np.int16), "image": np.zeros(0, np.int64),
                "area": np.zeros(0, np.float32), "centroid": np.zeros((0, 2), np.float32),
                "box": np.zeros((0, 4), np.float32), "proto": np.zeros((0, seg.code_dim), np.float32),
                "pairs": np.zeros((0, 2), np.int64)}
    with torch.no_grad():
        codes = seg.codes(torch.from_numpy(np.ascontiguousarray(images)))
        ids, image, proto = image_segments(codes, grid, iterations)
        n = len(image)
    ids, image = ids.numpy(), image.numpy()
    first = np.searchsorted(image, np.arange(len(images)))
    area, centroid, box = segment_geometry(ids, n)
    return {"maps": (ids - first[:, None, None]).astype(np.int16), "image": image, "area": area,
            "centroid": centroid, "box": box, "proto": proto.numpy().astype(np.float32),
            "pairs": adjacent_pairs(ids)}


def _log(msg: str) -> None:
    print(f"[concepts] {msg}", flush=True)


def build_index(checkpoint, split: str | None = None, limit: int | None = None, n_concepts: int = 64,
                seed: int = 0) -> SegmentIndex:
    """Segment every image of ``split`` (default: the config's ``data.train``; the first
    ``limit`` images when given) with a Ray Data actor pool and index the segments.

    ``checkpoint``: a URI for :func:`raysseg.core.segmenter.read_checkpoint` or an already read
    checkpoint dict. Concepts are the checkpoint's dictionary, else a spherical k-means of
    the prototypes into ``n_concepts`` clusters (fewer when there are fewer segments)."""
    import ray

    from raysseg.config import config_from_dict
    from raysseg.runtime.datasets import make_dataset
    from raysseg.io.images import list_split
    from raysseg.core.segmenter import Segmenter, read_checkpoint
    from raysseg.runtime.driver import init_ray

    uri = checkpoint if isinstance(checkpoint, str) else checkpoint.get("uri", "<checkpoint>")
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    cfg = config_from_dict(ckpt["config"])
    split = split or cfg.data.train
    if limit is not None and limit < 1:
        raise BrowseError(f"--limit must be at least 1, got {limit}")
    if n_concepts < 1:
        raise BrowseError(f"--n-concepts must be at least 1, got {n_concepts}")
    seg = Segmenter(cfg, load_backbone_weights=False)
    seg.load_state_dict(ckpt["state"])
    dictionary, note = _dictionary_of(seg)
    del seg
    files = list_split(split, with_labels=False).images  # a clear error before Ray starts
    total = len(files) if limit is None else min(limit, len(files))
    workers = cfg.eval.workers
    init_ray(workers)
    t0 = time.time()
    _log(f"indexing {total} images of {split} with {workers} workers (segments: pixel sorting, "
         f"grid {cfg.segments.grid}, {cfg.segments.iterations} iterations)")
    ref = [ray.put(ckpt)]
    ds = make_dataset(split, image_size=cfg.data.image_size, train=False, with_labels=False, limit=limit)
    out = ds.map_batches(SegmentIndexer, fn_constructor_kwargs={"ckpt_ref": ref}, batch_size=cfg.eval.batch_size,
                         compute=ray.data.ActorPoolStrategy(size=workers), batch_format="numpy")
    parts, skipped, done, n_seg, last = [], [], 0, 0, 0.0
    for row in out.iter_batches(batch_size=1, batch_format="numpy"):
        part = pickle.loads(row["payload"][0])
        parts.append(part)
        skipped += part["skipped"]
        done += len(part["paths"]) + len(part["skipped"])
        n_seg += len(part["image"])
        if done == total or time.time() - last > 5:
            _log(f"indexed {done} images of {total} ({n_seg} segments)")
            last = time.time()
    del ref
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


# --------------------------------------------------------------------------- queries


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


# --------------------------------------------------------------------------- pictures


def load_view(path: str, size: int) -> np.ndarray:
    """An image as the index saw it: the centre square resized to size x size, uint8 (size, size, 3)."""
    from PIL import Image

    from raysseg.io.images import center_square_box, decode_image
    from raysseg.io.storage import read_bytes

    image = decode_image(read_bytes(path))
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=center_square_box(*image.size)))


class _Views:
    """Decoded images by index row, each read once; unreadable ones come back grey."""

    def __init__(self, index: SegmentIndex):
        self.index, self.cache = index, {}

    def __call__(self, image: int) -> np.ndarray:
        if image not in self.cache:
            s = self.index.image_size
            try:
                self.cache[image] = load_view(self.index.paths[image], s)
            except Exception as e:  # noqa: BLE001 - a picture must not fail on one unreadable file
                _log(f"warning: could not read {self.index.paths[image]} for a picture: {type(e).__name__}: {e}")
                self.cache[image] = np.full((s, s, 3), 128, np.uint8)
        return self.cache[image]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def segment_thumbnail(index: SegmentIndex, row: int, view: np.ndarray, size: int, dim: float = 0.3,
                      margin: float = 0.15, outline: tuple[int, int, int] | None = (255, 215, 0)) -> np.ndarray:
    """The segment's box (grown by ``margin`` and made square, inside the image) cropped from
    its image, pixels outside the segment dimmed to ``dim``, its border drawn in ``outline``
    (None: no border), resized to (size, size, 3)."""
    from PIL import Image

    s = index.image_size
    mask = index.segment_mask(row, s)
    y0, x0, y1, x1 = (index.box[row] * s).tolist()
    side = min(max(y1 - y0, x1 - x0) * (1 + 2 * margin), s)
    side = max(side, min(s, 8))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top = int(round(min(max(cy - side / 2, 0), s - side)))
    left = int(round(min(max(cx - side / 2, 0), s - side)))
    side = int(round(side))
    crop = view[top : top + side, left : left + side].astype(np.float32)
    m = mask[top : top + side, left : left + side]
    crop[~m] *= dim
    out = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((size, size), Image.BILINEAR)).copy()
    if outline is not None:  # the segment's border, visible on dark images too
        big = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST))
        out[_outline(big, max(1, size // 64))] = outline
    return out


def gallery(index: SegmentIndex, columns: int = 16, per_concept: int = 6, thumb: int = 96,
            seed: int = 0) -> np.ndarray:
    """Segments per concept: the ``columns`` most frequent concepts left to right, up to
    ``per_concept`` randomly sampled segments of each (seeded) top to bottom. A cell is the
    segment's box cropped from its image with the rest dimmed; the header gives the
    concept id, its segments and images. Returns uint8 (H, W, 3)."""
    from PIL import Image, ImageDraw

    counts, images = index.counts(), index.image_counts()
    order = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0][:columns]
    gap, title_h, head_h = 4, 40, 34
    width = max(max(len(order), 1) * (thumb + gap) + gap, 360)
    height = title_h + head_h + per_concept * (thumb + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    source = "learned dictionary" if index.source == "dictionary" else "k-means of the segment prototypes"
    used = int((counts > 0).sum())
    draw.text((gap, 3), f"{index.n_concepts} concepts: {source}", fill=(0, 0, 0), font=_font(13))
    draw.text((gap, 20), f"{len(order)} most frequent of {used} used; {index.n_segments} segments in "
              f"{index.n_images} images", fill=(60, 60, 60), font=_font(12))
    rng = np.random.default_rng(seed)
    views = _Views(index)
    small = _font(12)
    for col, c in enumerate(order):
        x = gap + col * (thumb + gap)
        draw.text((x + 2, title_h), f"concept {c}", fill=(0, 0, 0), font=small)
        draw.text((x + 2, title_h + 15), f"{counts[c]} seg / {images[c]} img", fill=(90, 90, 90), font=_font(10))
        rows = np.nonzero(index.concept == c)[0]
        pick = np.sort(rng.choice(rows, min(per_concept, len(rows)), replace=False))
        for r in range(per_concept):
            y = title_h + head_h + r * (thumb + gap)
            if r < len(pick):
                cell = segment_thumbnail(index, int(pick[r]), views(int(index.image[pick[r]])), thumb)
                canvas.paste(Image.fromarray(cell), (x, y))
            else:
                draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(235, 235, 235))
    return np.asarray(canvas)


def _concept_colours(k: int) -> np.ndarray:
    from raysseg.core.pictures import palette

    return palette(max(k, 1)).astype(np.float32) / 255.0


def tsne_map(index: SegmentIndex, max_points: int = 2000, thumbnails: int = 12, thumb: int = 64,
             seed: int = 0, labels: int = 24) -> np.ndarray:
    """t-SNE (scikit-learn, seeded, 500 iterations; PCA to 50 dimensions first when the
    codes are wider) of up to ``max_points`` randomly sampled segment prototypes: a scatter
    coloured by concept (colours follow the concepts' frequency rank) with the ids of the ``labels`` most frequent concepts at their median
    position, and ``thumbnails`` segment thumbnails at points spread over the map
    (farthest-point order). Returns uint8 (H, W, 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    if index.proto is None or not index.n_segments:
        raise BrowseError("t-SNE needs an index with prototypes and at least one segment")
    rng = np.random.default_rng(seed)
    n = min(max_points, index.n_segments)
    rows = np.sort(rng.choice(index.n_segments, n, replace=False))
    x = index.proto[rows].astype(np.float32)
    if n >= 5:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):  # OpenMP threads spin on a busy machine; one core does 2000 points in ~10 s
            if x.shape[1] > 50 and n > 50:
                x = PCA(50, random_state=seed).fit_transform(x)
            emb = TSNE(n_components=2, perplexity=float(min(30.0, (n - 1) / 3)), init="pca", random_state=seed,
                       learning_rate="auto", max_iter=500).fit_transform(x)
    else:  # too few points for t-SNE: a line
        emb = np.stack([np.arange(n, dtype=np.float64), np.zeros(n)], 1)
    concept = index.concept[rows]
    rank = np.empty(index.n_concepts, np.int64)  # colours by frequency rank: the largest concepts differ most
    rank[np.argsort(-index.counts(), kind="stable")] = np.arange(index.n_concepts)
    colours = _concept_colours(index.n_concepts)[rank]
    fig = Figure(figsize=(9, 9), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(emb[:, 0], emb[:, 1], c=colours[concept], s=10, alpha=0.8, linewidths=0)
    present = np.bincount(concept, minlength=index.n_concepts)
    for c in [int(c) for c in np.argsort(-present, kind="stable")[:labels] if present[c] > 0]:
        px, py = np.median(emb[concept == c], axis=0)
        ax.text(px, py, str(c), fontsize=9, ha="center", va="center", weight="bold", zorder=5,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": colours[c], "lw": 1.5, "alpha": 0.9})
    if thumbnails > 0 and index.maps is not None:
        views = _Views(index)
        for j in _spread(emb, min(thumbnails, n), rng):
            row = int(rows[j])
            cell = segment_thumbnail(index, row, views(int(index.image[row])), thumb)
            box = AnnotationBbox(OffsetImage(cell, zoom=1.0), tuple(emb[j]), frameon=True, pad=0.1,
                                 bboxprops={"edgecolor": colours[index.concept[row]], "linewidth": 2}, zorder=3)
            ax.add_artist(box)
    ax.set_xticks([])
    ax.set_yticks([])
    source = "dictionary" if index.source == "dictionary" else "k-means"
    ax.set_title(f"t-SNE of {n} of {index.n_segments} segment prototypes, coloured by concept ({source})",
                 fontsize=11)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _spread(points: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k indices of points, greedily farthest from those already chosen (starting at random)."""
    chosen = [int(rng.integers(len(points)))]
    dist = np.linalg.norm(points - points[chosen[0]], axis=1)
    while len(chosen) < k:
        j = int(np.argmax(dist))
        if dist[j] <= 0:
            break
        chosen.append(j)
        dist = np.minimum(dist, np.linalg.norm(points - points[j], axis=1))
    return chosen


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _pairs(n: int) -> str:
    return _count(n, "pair")


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` of its border (or of the image border)."""
    inner = mask.copy()
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def query_picture(index: SegmentIndex, result: QueryResult, max_images: int = 8, size: int = 192,
                  per_row: int = 4) -> np.ndarray:
    """The first ``max_images`` matches of a query, each image with its best pair: the first
    concept's segment tinted and outlined orange, the second's blue, the rest dimmed; the
    caption gives the file name and the number of matching pairs. Returns uint8 (H, W, 3)."""
    from PIL import Image, ImageDraw

    shown = result.matches[:max_images]
    gap, title_h, caption_h = 6, 48, 18
    cols = max(1, min(per_row, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    width = max(cols * (size + gap) + gap, 460)
    height = title_h + rows * (size + caption_h + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), f'"{result.text}": {_count(len(result.matches), "image")}'
              + (f", first {len(shown)} shown" if len(result.matches) > len(shown) else ""),
              fill=(0, 0, 0), font=_font(15))
    draw.rectangle([gap, 28, gap + 12, 40], fill=COLOUR_A)
    draw.text((gap + 18, 26), f"concept {result.a}", fill=(0, 0, 0), font=_font(12))
    draw.rectangle([gap + 120, 28, gap + 132, 40], fill=COLOUR_B)
    draw.text((gap + 138, 26), f"concept {result.b}", fill=(0, 0, 0), font=_font(12))
    draw.text((gap + 240, 26), "best pair of each image", fill=(90, 90, 90), font=_font(12))
    views = _Views(index)
    for i, m in enumerate(shown):
        s, t = m.pairs[0]
        view = views(m.image).astype(np.float32)
        mask_a, mask_b = index.segment_mask(s), index.segment_mask(t)
        out = view * 0.45
        for mask, colour in ((mask_a, COLOUR_A), (mask_b, COLOUR_B)):
            out[mask] = 0.7 * view[mask] + 0.3 * np.asarray(colour, np.float32)
        big = np.asarray(Image.fromarray(out.astype(np.uint8)).resize((size, size), Image.NEAREST)).copy()
        for mask, colour in ((mask_a, COLOUR_A), (mask_b, COLOUR_B)):
            big_mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
            big[_outline(big_mask, max(2, size // 96))] = colour
        x = gap + (i % cols) * (size + gap)
        y = title_h + (i // cols) * (size + caption_h + gap)
        canvas.paste(Image.fromarray(big), (x, y))
        name = m.path.rstrip("/").rsplit("/", 1)[-1]
        name = name if len(name) <= size // 7 else "..." + name[-(size // 7 - 3):]
        draw.text((x, y + size + 2), f"{name}  ({_pairs(len(m.pairs))})", fill=(0, 0, 0), font=_font(11))
    if not shown:
        draw.text((gap, title_h + 4), "no matching images", fill=(120, 0, 0), font=_font(13))
    return np.asarray(canvas)


# --------------------------------------------------------------------------- summary + the command


def concepts_summary(index: SegmentIndex, examples: int = 5) -> dict:
    """Per used concept (most frequent first): segments, images, mean area and example paths
    (the images with its largest segments)."""
    counts, images = index.counts(), index.image_counts()
    concepts = []
    for c in [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]:
        rows = np.nonzero(index.concept == c)[0]
        rows = rows[np.argsort(-index.area[rows], kind="stable")]
        ex, seen = [], set()
        for r in rows:
            img = int(index.image[r])
            if img not in seen:
                seen.add(img)
                ex.append(index.paths[img])
            if len(ex) == examples:
                break
        concepts.append({"id": c, "segments": int(counts[c]), "images": int(images[c]),
                         "mean_area": round(float(index.area[rows].mean()), 5), "examples": ex})
    return {
        "checkpoint": index.meta.get("checkpoint"), "split": index.meta.get("split"), "source": index.source,
        "note": index.meta.get("note", ""), "n_concepts": index.n_concepts,
        "used_concepts": len(concepts), "n_images": index.n_images, "n_segments": index.n_segments,
        "skipped_files": len(index.meta.get("skipped", [])), "concepts": concepts,
    }


def browse(checkpoint: str, split: str | None = None, limit: int | None = None, out: str = "outputs/concepts",
           queries=(), n_concepts: int = 64, log_to_mlflow: bool = True, rebuild: bool = False,
           seed: int = 0) -> dict:
    """Index ``split`` with the checkpoint's concepts (or reuse the index saved in ``out`` for
    the same checkpoint weights, split, limit and concept setting), then write ``gallery.png``,
    ``tsne.png``, ``concepts.json``, and for each query ``query_<i>.png`` (1-based) and
    ``queries.json``; log them into the checkpoint's MLflow run under ``concepts/<split name>/``.
    Returns a summary dict (paths of the outputs, counts, query results)."""
    from raysseg.io import tracking
    from raysseg.config import config_from_dict
    from raysseg.core.segmenter import Segmenter, read_checkpoint
    from raysseg.core.pictures import save_png

    if limit is not None and limit < 1:
        raise BrowseError(f"--limit must be at least 1, got {limit}")
    if n_concepts < 1:
        raise BrowseError(f"--n-concepts must be at least 1, got {n_concepts}")
    queries = [str(q) for q in queries]
    for q in queries:
        parse_query(q)  # syntax errors before anything is read
    ckpt = read_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"])
    split = split or cfg.data.train
    seg = Segmenter(cfg, load_backbone_weights=False)
    seg.load_state_dict(ckpt["state"])
    dictionary, _ = _dictionary_of(seg)
    del seg
    for q in queries:
        parse_query(q, len(dictionary) if dictionary is not None else n_concepts)
    key = {"checkpoint": checkpoint_fingerprint(ckpt), "split": split, "limit": limit,
           "concepts": "dictionary" if dictionary is not None else f"kmeans-{n_concepts}-seed{seed}"}
    out_dir = Path(out)
    t0 = time.time()
    reused = not rebuild and saved_key(out_dir) == key
    if reused:
        index = SegmentIndex.load(out_dir)
        _log(f"reusing the index in {out_dir}: {index.n_segments} segments in {index.n_images} images "
             f"(--rebuild to index again)")
    else:
        index = build_index(ckpt, split=split, limit=limit, n_concepts=n_concepts, seed=seed)
        index.meta.update({"checkpoint": checkpoint, "key": key})
        index.save(out_dir)
        _log(f"index written to {out_dir / INDEX_ARRAYS}")
    if reused and index.source == "kmeans":
        _log(f"note: {index.meta.get('note')}; concepts are a spherical k-means of the segment prototypes "
             f"({index.n_concepts} clusters, numbered by frequency)")
    results = [query(index, q) for q in queries]  # ids checked against the built index

    summary = concepts_summary(index)
    (out_dir / "concepts.json").write_text(json.dumps(summary, indent=1))
    pictures = {}
    _log("drawing the gallery")
    pictures["gallery.png"] = gallery(index, seed=seed)
    _log("t-SNE of the segment prototypes")
    pictures["tsne.png"] = tsne_map(index, seed=seed)
    query_out = []
    for i, r in enumerate(results, 1):
        entry = r.to_dict()
        _log(f'query {i} "{r.text}": {_count(len(r.matches), "image")}')
        for m in r.matches[:20]:
            print(f"  {m.path}  ({_pairs(len(m.pairs))})")
        if len(r.matches) > 20:
            print(f"  ... and {len(r.matches) - 20} more (queries.json)")
        if r.matches:
            name = f"query_{i}.png"
            pictures[name] = query_picture(index, r)
            entry["picture"] = str(out_dir / name)
        query_out.append(entry)
    for name, image in pictures.items():
        save_png(image, out_dir / name)
    if results:
        (out_dir / "queries.json").write_text(json.dumps(query_out, indent=1))
    top = summary["concepts"][:8]
    _log("most frequent concepts: " + ", ".join(f"{c['id']} ({c['segments']} seg, {c['images']} img)" for c in top))
    _log(f"wrote {', '.join(pictures)} and concepts.json to {out_dir}")

    logged = None
    run_id = ckpt.get("run_id")
    if log_to_mlflow and run_id:
        uri = ckpt.get("tracking_uri") or tracking.tracking_uri(cfg.mlflow.tracking_uri)
        folder = f"concepts/{Path(split.rstrip('/')).name}"
        try:
            logger = tracking.RunLogger(uri, run_id)
            for name, image in pictures.items():
                logger.log_image(image, f"{folder}/{name}")
            logger.log_bytes(json.dumps(summary, indent=1).encode(), f"{folder}/concepts.json")
            if results:
                logger.log_bytes(json.dumps(query_out, indent=1).encode(), f"{folder}/queries.json")
            logged = folder
            _log(f"logged to MLflow run {run_id} at {uri} under {folder}/")
        except Exception as e:  # noqa: BLE001 - the files are written; a tracking problem must not lose them
            print(f"warning: could not log to MLflow run {run_id} at {uri}: {e}")
    return {
        "out": str(out_dir), "index": str(out_dir / INDEX_ARRAYS), "reused": reused, "source": index.source,
        "n_concepts": index.n_concepts, "n_images": index.n_images, "n_segments": index.n_segments,
        "gallery": str(out_dir / "gallery.png"), "tsne": str(out_dir / "tsne.png"),
        "concepts_json": str(out_dir / "concepts.json"), "queries": query_out, "mlflow_folder": logged,
        "seconds": round(time.time() - t0, 1),
    }
