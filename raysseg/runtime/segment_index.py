"""The Ray pass of concept browsing: a split's images cut into segments by a Ray Data actor pool.

Each batch comes back as one pickled payload of :func:`raysseg.core.segment_geometry.segment_batch`
(plus its paths and skipped files); :func:`raysseg.apps.browse.build.build_index` joins them.
"""
from __future__ import annotations

import pickle
import time
from typing import Callable

import numpy as np
import ray

from raysseg.core.segment_geometry import segment_batch


class SegmentIndexer:
    """Ray Data actor: a batch of decoded images -> its segments (one pickled payload row)."""

    def __init__(self, ckpt_ref):
        import torch

        from raysseg.io.checkpoints import segmenter_from

        self.seg = segmenter_from(ray.get(ckpt_ref[0]))
        self.cfg = self.seg.cfg
        torch.set_num_threads(1)

    def __call__(self, batch: dict) -> dict:
        from raysseg.core.batches import valid_rows

        batch, skipped = valid_rows(batch)
        payload = segment_batch(self.seg, batch["image"], self.cfg.segments.grid, self.cfg.segments.iterations)
        payload["paths"] = [str(p) for p in batch["path"]]
        payload["skipped"] = skipped
        return {"payload": np.array([pickle.dumps(payload)], dtype=object)}


def segment_split(ckpt: dict, split: str, limit: int | None = None,
                  log: Callable[[str], None] = print) -> tuple[list[dict], list, float]:
    """Segment the images of ``split`` (the first ``limit`` when given) with the checkpoint's
    Segmenter in a pool of ``eval.workers`` :class:`SegmentIndexer` actors, logging progress.

    Returns the batch payloads (in arrival order), the skipped files, and the time the pass
    started (after Ray was up). The split is listed before Ray starts, for a clear error."""
    from raysseg.config import config_from_dict
    from raysseg.io.images import list_split
    from raysseg.runtime.datasets import make_dataset
    from raysseg.runtime.driver import init_ray

    cfg = config_from_dict(ckpt["config"])
    listing = list_split(split, with_labels=False)  # a clear error before Ray starts
    if listing.left_out:
        log(f"warning: {split}: {listing.left_out_line()}")
    files = listing.images
    total = len(files) if limit is None else min(limit, len(files))
    workers = cfg.eval.workers
    init_ray(workers)
    t0 = time.time()
    log(f"indexing {total} images of {split} with {workers} workers (segments: pixel sorting, "
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
            log(f"indexed {done} images of {total} ({n_seg} segments)")
            last = time.time()
    del ref
    return parts, skipped, t0
