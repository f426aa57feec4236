"""The Ray Data input pipeline: decoded, cropped rows of a split (decoding itself is in :mod:`raysseg.io.images`,
the prepared-data cache in :mod:`raysseg.io.prepared`), and Ray tasks that build that cache."""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterator

import pyarrow as pa
import ray
import ray.data

from raysseg.io.images import EPOCH_SEED, Rows, SplitListing, read_plan
from raysseg.io.prepared import PreparedSplit

# Rows per Ray Data block, i.e. per map task. Each task costs ~10-20 ms of Ray overhead; decoding a file
# takes ~1.5-2.5 ms and cropping a cached image ~0.5 ms, so cached reads take bigger blocks.
ROWS_PER_BLOCK = 32
CACHED_ROWS_PER_BLOCK = 96
# The driver keeps about 7 kB per block (object ref, Ray Data's metadata, the put's bookkeeping; measured at
# 100,000 paths: 225 B per image in blocks of 32 rows, 161 in blocks of 196). Past TARGET_BLOCKS blocks a
# dataset takes bigger blocks, up to MAX_BLOCK_BYTES of decoded rows each (224 px: 1,337 rows, about 3 s of
# decoding per task; 10M images then make 7,480 blocks, about 5 bytes per image on the driver).
TARGET_BLOCKS = 512
MAX_BLOCK_BYTES = 256 << 20


def rows_per_block(images: int, image_size: int, cached: bool) -> int:
    """Rows per Ray Data block for a split of ``images``: small blocks for small splits (parallel decoding),
    at most TARGET_BLOCKS blocks while a block's decoded rows (RGB + label, uint8) fit MAX_BLOCK_BYTES."""
    base = CACHED_ROWS_PER_BLOCK if cached else ROWS_PER_BLOCK
    largest = max(base, MAX_BLOCK_BYTES // (4 * image_size * image_size))
    return max(base, min(math.ceil(images / TARGET_BLOCKS), largest))


def make_dataset(
    split_uri: str, *, image_size: int, train: bool, with_labels: bool, crop_scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = True, seed: int | None = 0, limit: int | None = None, files: list[str] | None = None,
    shuffle: bool = False, segments: dict | None = None, n_classes: int | None = None, ignore_index: int = 255,
    prepared: PreparedSplit | None = None, epoch_clock=None, train_seed: int = 0, partners: dict | None = None,
    listing: SplitListing | None = None, image_decoder=None,
) -> "ray.data.Dataset":
    """A Ray Dataset of decoded, cropped rows of a split: see :func:`raysseg.io.images.read_plan`
    (``prepared``: read from that cache instead of decoding the files; ``listing``: the split's one listing).
    ``seed=EPOCH_SEED``: the crops of each epoch come from (``train_seed``, the epoch that ``epoch_clock``, the
    run's concept bank, says), so a resumed run draws the same crops as an uninterrupted one.
    ``shuffle`` visits the images in a fresh random order every epoch (the file list is shuffled, not pixels;
    Ray Data draws that order, not reproducibly)."""
    per_epoch = seed == EPOCH_SEED
    items, fn = read_plan(split_uri, image_size=image_size, train=train, with_labels=with_labels,
                          crop_scale=crop_scale, hflip=hflip, seed=None if per_epoch else seed, limit=limit,
                          files=files, segments=segments, n_classes=n_classes, ignore_index=ignore_index,
                          prepared=prepared, partners=partners, listing=listing, image_decoder=image_decoder)
    if per_epoch:
        if epoch_clock is None:
            raise ValueError("seed=EPOCH_SEED needs the run's epoch_clock")
        fn = functools.partial(_epoch_seeded, read=fn, clock=epoch_clock, train_seed=train_seed)
    block_rows = rows_per_block(len(items), image_size, cached=prepared is not None)
    if isinstance(items, Rows):  # relative paths in Arrow: no Python object per file on the driver
        ds = _source_blocks(items.table(), block_rows)
    else:
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / block_rows)))
    # Ray Data's default reserves half the CPUs per operator: with one map operator on a small machine
    # (2 cores) that runs one decoding task at a time. This pipeline has a single map, nothing to starve.
    ds.context.op_resource_reservation_enabled = False
    if shuffle:
        ds = ds.random_shuffle()
    return ds.map_batches(fn, batch_size=None, batch_format="numpy")


_SOURCES: list[tuple[str, pa.Table, int, "ray.data.Dataset"]] = []  # (Ray job, rows, rows per block, dataset)
_SOURCES_KEPT = 4


def _source_blocks(table: pa.Table, block_rows: int) -> "ray.data.Dataset":
    """A dataset of ``table``'s rows in blocks of ``block_rows``, put into the object store once per Ray job: the
    reads of one split (the cluster read, the training read) map the same blocks (at 10M images each copy
    of the paths is about 200 MB of shared memory the driver writes). ``from_blocks`` makes the blocks'
    metadata here (``from_arrow`` runs a Ray task per block)."""
    job = ray.get_runtime_context().get_job_id()
    for known_job, known, rows, ds in _SOURCES:
        if known_job == job and rows == block_rows and known.equals(table):
            return ds
    ds = ray.data.from_blocks([table.slice(i, block_rows) for i in range(0, max(1, table.num_rows), block_rows)])
    _SOURCES.insert(0, (job, table, block_rows, ds))
    del _SOURCES[_SOURCES_KEPT:]
    return ds


def _epoch_seeded(batch: dict, *, read, clock, train_seed: int) -> dict:
    """``read`` with the crops of the run's current epoch: one call to the bank per block of rows."""
    return read(batch, seed=(train_seed, ray.get(clock.epoch.remote())))


def run_tasks(fn: Callable, jobs: list) -> Iterator:
    """``fn`` over ``jobs`` as Ray tasks (one CPU each), results as they finish: how the driver builds the
    prepared-data cache (:func:`raysseg.io.prepared.prepare`)."""
    remote = ray.remote(num_cpus=1)(fn)
    pending = [remote.remote(job) for job in jobs]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:  # the task's own error (e.g. a one-line StorageError)
            for ref in pending:
                ray.cancel(ref)
            raise exc.cause from None
        yield result
