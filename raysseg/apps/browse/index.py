"""The segment index of a split (:class:`SegmentIndex`), its files and build key, and the browsing errors."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raysseg.core.segment_geometry import upsample_map

INDEX_VERSION = 1
INDEX_ARRAYS = "segments.npz"
INDEX_META = "index.json"


class BrowseError(ValueError):
    """A browsing request that cannot be served (empty split, bad argument); one line."""


class QueryError(BrowseError):
    """A malformed relation query or an unknown concept id."""


def _log(msg: str) -> None:
    print(f"[concepts] {msg}", flush=True)


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
