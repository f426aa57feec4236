"""Precomputed tables: a method's per-split tables (:class:`raysseg.methods.base.PrecomputedTable`, e.g.
STEGO's nearest neighbours), computed once before training and stored beside the prepared data.

Two parallel passes, each a list of jobs run by ``run(fn, jobs)`` (Ray tasks on the driver,
:func:`raysseg.runtime.datasets.run_tasks`; a thread per core in one process):
1. vectors: the split's centre crops at ``data.image_size`` in chunks of ``CHUNK`` images; each job builds
   the run's backbone (the same random init as the run's workers: seeded by ``train.seed``) and writes the
   chunk's vectors (``vectors-NNNNN.npy``) and its valid paths;
2. rows: blocks of ``CHUNK`` table rows, each computed from every vector (``rows-NNNNN.npy``).
``manifest.json`` is written last. A killed build resumes: a file already written is not computed again.

Where: with ``data.cache`` on, in the prepared split's folder (``<cache>/<key>/tables/``, beside its
shards and pseudo segments); else under ``<train.storage>/tables/<key>/`` (the split may be read-only).
The key is the prepared-data key of the split (its listing and ``data.image_size``); the table's folder
name hashes its settings, the backbone and its weights, so any change gives a new table.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from raysseg.io import storage
from raysseg.io.images import SplitListing, list_split, read_plan
from raysseg.io.prepared import MANIFEST, PreparedSplit, cache_key, run_in_threads
from raysseg.io.weights import read_weights
from raysseg.methods.registry import spec

CHUNK = 256  # images per vectors job, rows per rows job
FORMAT_VERSION = 1


@dataclass(frozen=True)
class _Job:
    index: int
    uri: str  # the file this job writes
    cfg: object
    name: str
    settings: storage.S3Settings | None  # the driver's, for workers whose environment predates them
    items: tuple[dict, ...] = ()  # vectors: the chunk's rows to read, and how to read them
    decode: Callable | None = None
    vectors_uris: tuple[str, ...] = ()  # rows: every vectors file
    start: int = 0
    stop: int = 0


def tables_folder(cfg, prepared: PreparedSplit | None, listing: SplitListing | None = None) -> str:
    """Where the tables of ``cfg``'s training split live (see the module docstring); ``listing``: the
    split's, when the command has it (listed here otherwise)."""
    if prepared is not None:
        return storage.join(prepared.folder, "tables")
    if listing is None or listing.uri != cfg.data.train:
        listing = list_split(cfg.data.train)
    return storage.join(cfg.train.storage, "tables", cache_key(listing.stats(), cfg.data.image_size))


def table_folder(cfg, name: str, settings: dict, prepared: PreparedSplit | None,
                 listing: SplitListing | None = None) -> str:
    """The folder of one table: its name and a hash of its settings, backbone and weights."""
    key = json.dumps([FORMAT_VERSION, name, sorted(settings.items()), cfg.model.backbone, cfg.model.weights,
                      cfg.train.seed if not cfg.model.weights else 0, cfg.data.limit], default=str)
    return storage.join(tables_folder(cfg, prepared, listing), f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def _save(uri: str, array: np.ndarray, settings: storage.S3Settings | None) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    storage.write_bytes_atomic(uri, buf.getvalue(), settings)


def _load(uri: str, settings: storage.S3Settings | None = None) -> np.ndarray | None:
    """The array in ``uri``, or None when it is missing or unreadable (then it is computed again)."""
    data = storage.read_if_exists(uri, settings)
    if data is None:
        return None
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError:
        return None


_BUILDING = threading.Lock()  # jobs on threads share torch's global generator: one build at a time


def _model(cfg_json: str):
    with _BUILDING:
        return _built(cfg_json)


@functools.lru_cache(maxsize=2)
def _built(cfg_json: str):
    import torch

    from raysseg.config import config_from_dict
    from raysseg.methods.registry import build_segmenter

    cfg = config_from_dict(json.loads(cfg_json))
    torch.manual_seed(cfg.train.seed)  # a random-init backbone equals the one the run's workers build
    return build_segmenter(cfg, read_bytes=read_weights).eval(), cfg


def _vectors_job(job: _Job) -> int:
    """Compute and write one chunk's vectors (``.npy``) and the paths of its valid images (``.json``)."""
    import torch

    seg, cfg = _model(json.dumps(job.cfg.to_dict(), sort_keys=True))
    table = spec(cfg.method).tables(cfg)[job.name]
    vectors, valid = [], []
    for start in range(0, len(job.items), cfg.eval.batch_size):
        chunk = job.items[start:start + cfg.eval.batch_size]
        batch = job.decode({k: np.array([item[k] for item in chunk], dtype=object) for k in chunk[0]})
        keep = np.asarray(batch["valid"], bool)
        valid += [str(p) for p, ok in zip(batch["path"], keep) if ok]
        if keep.any():
            with torch.no_grad():
                vectors.append(table.vectors(seg, batch["image"][keep]).float().cpu().numpy())
    dim = vectors[0].shape[1] if vectors else 0
    _save(job.uri, np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32), job.settings)
    storage.write_bytes_atomic(job.uri[:-4] + ".json", json.dumps(valid).encode(), job.settings)
    return job.index


def _rows_job(job: _Job) -> int:
    """Compute and write rows ``start:stop`` of the table from every vector."""
    import torch

    cfg = job.cfg
    table = spec(cfg.method).tables(cfg)[job.name]
    vectors = torch.from_numpy(np.concatenate([_load(uri, job.settings) for uri in job.vectors_uris]))
    _save(job.uri, np.asarray(table.rows(vectors, job.start, job.stop)), job.settings)
    return job.index


def build_table(cfg, name: str, prepared: PreparedSplit | None = None, run: Callable | None = None,
                log: Callable = functools.partial(print, flush=True), listing: SplitListing | None = None) -> dict:
    """``{"paths": valid image URIs in listing order, "rows": the table (one row per path)}`` of the table
    ``name`` of ``cfg``'s method, read from its folder or computed first (resuming a killed build)."""
    table = spec(cfg.method).tables(cfg)[name]
    folder = table_folder(cfg, name, table.settings, prepared, listing)
    settings = storage.s3_settings() if storage.is_s3(folder) or storage.is_s3(cfg.data.train) else None
    manifest_uri = storage.join(folder, MANIFEST)
    found = storage.read_if_exists(manifest_uri, settings)
    if found is not None:
        manifest = json.loads(found)
        rows = [_load(storage.join(folder, block), settings) for block in manifest["rows"]]
        if all(r is not None for r in rows):
            log(f"[tables] {name}: {len(manifest['paths'])} rows read from {folder}")
            return {"paths": manifest["paths"], "rows": np.concatenate(rows) if rows else np.zeros((0, 0), np.int64)}
    run = run or run_in_threads
    items, decode = read_plan(cfg.data.train, image_size=cfg.data.image_size, train=False, with_labels=False,
                              limit=cfg.data.limit or None, prepared=prepared, listing=listing)
    chunks = [tuple(items[i:i + CHUNK]) for i in range(0, len(items), CHUNK)]
    vec_uris = [storage.join(folder, f"vectors-{i:05d}.npy") for i in range(len(chunks))]
    todo = [_Job(i, vec_uris[i], cfg, name, settings, items=chunk, decode=decode) for i, chunk in enumerate(chunks)
            if _load(vec_uris[i], settings) is None or storage.read_if_exists(vec_uris[i][:-4] + ".json", settings) is None]
    log(f"[tables] {name}: vectors of {len(items)} images in {len(chunks)} chunk(s) into {folder} "
        f"({len(chunks) - len(todo)} done before)")
    for _ in run(_vectors_job, todo):
        pass
    valid = sum((json.loads(storage.read_bytes(uri[:-4] + ".json", settings)) for uri in vec_uris), [])
    blocks = [(i, min(i + CHUNK, len(valid))) for i in range(0, len(valid), CHUNK)]
    row_names = [f"rows-{k:05d}.npy" for k in range(len(blocks))]
    todo = [_Job(k, storage.join(folder, row_names[k]), cfg, name, settings, vectors_uris=tuple(vec_uris), start=a,
                 stop=b) for k, (a, b) in enumerate(blocks) if _load(storage.join(folder, row_names[k]), settings) is None]
    log(f"[tables] {name}: {len(valid)} rows in {len(blocks)} block(s) ({len(blocks) - len(todo)} done before)")
    for _ in run(_rows_job, todo):
        pass
    storage.write_bytes_atomic(manifest_uri, json.dumps({"paths": valid, "rows": row_names}).encode(), settings)
    rows = [_load(storage.join(folder, n), settings) for n in row_names]
    return {"paths": valid, "rows": np.concatenate(rows) if rows else np.zeros((0, 0), np.int64)}


def build_tables(cfg, prepared: PreparedSplit | None = None, run: Callable | None = None,
                 listing: SplitListing | None = None) -> dict[str, dict]:
    """Every table of ``cfg``'s method (:func:`build_table`), by name; {} for methods without tables."""
    return {name: build_table(cfg, name, prepared, run, listing=listing) for name in spec(cfg.method).tables(cfg)}
