"""The prepared-data cache: every image of a training split decoded and resized once, kept as uint8 shards.

Later epochs and runs read the shards instead of decoding the image files. Crops and flips are done
on the cached pixels with the geometry a direct decode uses (:func:`raysseg.io.images.crop_geometry`:
the box is drawn in the original image's pixels, then scaled onto the cached image), so the rows are
those of :func:`raysseg.io.images.read_plan` up to resampling.

Where: ``data.cache`` = ``auto`` puts it beside the split (``<split>/.raysseg-cache``); a folder or an
s3:// prefix puts it there. Under that root, ``<key>/shard-00000.npy ...`` and ``<key>/manifest.json``,
written last, so a half-written cache is never read (the next run builds it again).

What: each shard is a .npy file of one 1-D uint8 array, the HWC pixels of its images back to back.
An image is stored with its short side at ``min(original, ceil(image_size * MARGIN))``: never enlarged,
and with a margin so that centre crops and most random crops (area down to about 1/MARGIN^2 of the
square) are downscaled from the cache, never upsampled. The manifest lists every image of the split in
sorted order: its URI, ``valid`` and ``error`` (an image that does not decode stays a row, invalid, with
its one-line error, so it is counted and listed like any skipped file) and where its pixels are.

The key hashes FORMAT_VERSION, image_size, MARGIN and the split's listing (URI, size and modification
time of each image): an image added, removed or changed, or another image size, gives a new key, so a
new cache is built beside the old one. The cache covers the whole split (``data.limit`` selects rows
from it). Labels are never cached.

Pseudo segments (SegSort, visual concepts) of centre-crop reads are deterministic, so they are cached
too, the first time a read asks for them: ``<key>/segments-<hash of the settings>/shard-*.npy``
(int32 S x S maps, one file per image shard) and a manifest written last. Random-crop reads with
segments still compute them in the read.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from raysseg.io import storage
from raysseg.io.images import (
    BadFileError, DatasetError, SplitListing, _decoded, crop_geometry, decode_image, list_split, partner_candidates,
    pick_partner, row_error, select_rows, with_partners,
)

FORMAT_VERSION = 2  # 2: images turned upright by their EXIF orientation
MARGIN = 1.25  # cached short side = ceil(image_size * MARGIN), at most the original's
IMAGES_PER_SHARD = 256
AUTO = "auto"
AUTO_FOLDER = ".raysseg-cache"
MANIFEST = "manifest.json"


_say = functools.partial(print, flush=True)


@dataclass
class PreparedSplit:
    """A built cache of ``split`` at ``image_size``: its folder and one manifest row per image (sorted)."""

    split: str
    image_size: int
    folder: str
    rows: list[dict]
    run: Callable | None = None  # how build jobs run (Ray tasks on the driver; None: a thread per core)

    @property
    def invalid(self) -> list[dict]:
        """Rows of the images that did not decode, each with its one-line ``error``."""
        return [row for row in self.rows if not row["valid"]]

    def read_plan(self, split_uri: str, **options) -> tuple[list[dict], functools.partial]:
        """:func:`cached_read_plan` of this cache: how :func:`raysseg.io.images.read_plan` reads it."""
        return cached_read_plan(self, split_uri, **options)


@dataclass(frozen=True)
class ShardJob:
    """One shard to build: the images it holds and the file it is written to."""

    index: int
    uri: str
    paths: tuple[str, ...]
    short_side: int
    settings: storage.S3Settings | None  # the driver's S3 settings, for workers whose environment predates them


def check_setting(setting: str) -> None:
    """A one-line DatasetError unless ``setting`` is '', 'auto', a local folder or an s3://bucket/prefix."""
    if setting in ("", AUTO):
        return
    try:
        storage.resolve(setting)
    except storage.StorageError as exc:
        raise DatasetError(f"data.cache: {exc}; use '' (off), 'auto', a folder or s3://bucket/prefix") from None


def cache_root(split_uri: str, setting: str) -> str:
    """The folder/prefix that holds a split's caches: ``auto`` -> ``<split>/.raysseg-cache``."""
    if setting == AUTO:
        return storage.join(split_uri, AUTO_FOLDER)
    if storage.is_s3(setting):
        return setting.rstrip("/")
    path = setting[len("file://"):] if setting.startswith("file://") else setting
    return os.path.abspath(os.path.expanduser(path))  # Ray workers run in other folders


def cache_key(files: Iterable[storage.FileStat], image_size: int) -> str:
    """``<image_size>px-<hash>`` of the format version, image size, margin and every file's URI, size, mtime."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, image_size, MARGIN]).encode())
    for f in files:
        digest.update(f"{f.uri}\0{f.size}\0{f.mtime_ns}\n".encode())
    return f"{image_size}px-{digest.hexdigest()[:16]}"


def cached_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(W, H) of an image stored with its short side at most ``short_side`` (never enlarged)."""
    short = min(width, height)
    if short <= short_side:
        return width, height
    scale = short_side / short
    return (short_side if width == short else max(1, round(width * scale)),
            short_side if height == short else max(1, round(height * scale)))


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


def build_shard(job: ShardJob) -> tuple[int, list[dict], int]:
    """Decode and resize the images of one shard and write it: (its index, its manifest rows, its file size).

    An image that does not decode becomes an invalid row with its error; storage errors propagate."""
    pixels, rows, offset = [], [], 0
    for path in job.paths:
        try:
            image = _decoded("image", path, job.settings, decode_image)
            size = cached_size(image.width, image.height, job.short_side)
            array = np.asarray(image if size == image.size else image.resize(size, Image.BILINEAR))
        except storage.StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decode failure is an invalid row, as in a direct read
            rows.append({"path": path, "valid": False, "error": row_error(exc)})
            continue
        rows.append({"path": path, "valid": True, "error": "", "offset": offset, "w": size[0], "h": size[1],
                     "ow": image.width, "oh": image.height})
        pixels.append(array.reshape(-1))
        offset += array.size
    blob = np.concatenate(pixels) if pixels else np.zeros(0, np.uint8)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, blob, allow_pickle=False)
    header = buf.tell() - blob.nbytes
    for row in rows:
        if row["valid"]:
            row["offset"] += header  # byte offsets in the file
    storage.write_bytes_atomic(job.uri, buf.getvalue(), job.settings)
    return job.index, rows, buf.tell()


def run_in_threads(fn: Callable, jobs: list) -> Iterator:
    """``fn`` over ``jobs`` on a thread per core (PIL decodes and resizes outside the GIL), results as they finish."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        for future in as_completed([pool.submit(fn, job) for job in jobs]):
            yield future.result()


def _damaged_shard(folder: str, sizes: dict[str, int]) -> str | None:
    """The first shard of ``folder`` that is missing or whose size is not the manifest's, or None."""
    on_disk = {f.uri.rstrip("/").rsplit("/", 1)[-1]: f.size for f in storage.list_file_stats(folder, (".npy",))}
    return next((name for name, size in sizes.items() if on_disk.get(name) != size), None)


def open_cache(split_uri: str, image_size: int, folder: str, key: str, log: Callable = _say) -> PreparedSplit | None:
    """The complete cache in ``folder`` with this ``key``, or None (missing, half-written or damaged)."""
    manifest_uri = storage.join(folder, MANIFEST)
    if not storage.exists(manifest_uri):
        return None
    try:
        manifest = json.loads(storage.read_bytes(manifest_uri))
        shards, rows = manifest["shards"], manifest["rows"]
    except (ValueError, KeyError, TypeError):
        log(f"[data cache] {manifest_uri} is not a readable manifest; building the cache again")
        return None
    if manifest.get("version") != FORMAT_VERSION or manifest.get("key") != key:
        return None
    damaged = _damaged_shard(folder, {s["name"]: s["bytes"] for s in shards})
    if damaged:
        log(f"[data cache] {storage.join(folder, damaged)} is missing or has the wrong size; building the cache "
            "again")
        return None
    return PreparedSplit(split_uri, image_size, folder, rows)


def prepare(split_uri: str, image_size: int, setting: str, run: Callable | None = None,
            log: Callable = _say, listing: SplitListing | None = None) -> PreparedSplit:
    """The cache of a split's images at ``image_size`` (``setting``: ``auto``, a folder or an s3:// prefix),
    built first if there is none for the split as it is now.

    ``run(fn, jobs)`` yields ``fn(job)`` of every job as they finish (default: a thread per core; the Ray
    driver passes Ray tasks). Prints a line when it opens the cache, and progress while it builds it.
    ``listing``: the split's :func:`raysseg.io.images.list_split` (listed here when not given; a missing or
    empty split fails with its one line)."""
    if listing is None or listing.uri != split_uri:
        listing = list_split(split_uri)
    files = listing.images
    key = cache_key(listing.stats(), image_size)
    folder = storage.join(cache_root(split_uri, setting), key)
    found = open_cache(split_uri, image_size, folder, key, log)
    if found is not None:
        log(f"[data cache] reading {len(found.rows)} prepared images of {split_uri} from {folder}")
        found.run = run
        return found

    short_side = math.ceil(image_size * MARGIN)
    n_shards = math.ceil(len(files) / IMAGES_PER_SHARD)
    per_shard = math.ceil(len(files) / n_shards)
    settings = storage.s3_settings() if storage.is_s3(split_uri) or storage.is_s3(folder) else None
    jobs = [ShardJob(i, storage.join(folder, _shard_name(i)),
                     tuple(files[i * per_shard:(i + 1) * per_shard]), short_side, settings)
            for i in range(n_shards)]
    log(f"[data cache] decoding {len(files)} images of {split_uri} once (short side {short_side} px) into "
        f"{folder}, {n_shards} shard(s)")
    t0 = time.perf_counter()
    built: dict[int, tuple[list[dict], int]] = {}
    for index, rows, nbytes in (run or run_in_threads)(build_shard, jobs):
        built[index] = (rows, nbytes)
        if len(built) == n_shards or len(built) % max(1, n_shards // 10) == 0:
            done = sum(len(r) for r, _ in built.values())
            log(f"[data cache] {done}/{len(files)} images prepared ({len(built)}/{n_shards} shards, "
                f"{time.perf_counter() - t0:.1f} s)")
    rows = [dict(row, shard=i) for i in range(n_shards) for row in built[i][0]]
    manifest = {"version": FORMAT_VERSION, "key": key, "split": split_uri, "image_size": image_size,
                "margin": MARGIN, "short_side": short_side,
                "shards": [{"name": _shard_name(i), "bytes": built[i][1]} for i in range(n_shards)], "rows": rows}
    storage.write_bytes_atomic(storage.join(folder, MANIFEST), json.dumps(manifest).encode(), settings)
    prepared = PreparedSplit(split_uri, image_size, folder, rows, run)
    if prepared.invalid:
        log(f"[data cache] {len(prepared.invalid)} of {len(rows)} images do not decode; kept as invalid rows, "
            f"listed in {storage.join(folder, MANIFEST)} (first: {prepared.invalid[0]['error']})")
    return prepared


# --------------------------------------------------------------------------- reading


def cached_read_plan(
    prepared: PreparedSplit, split_uri: str, *, image_size: int, train: bool, crop_scale: tuple[float, float],
    hflip: bool, seed: int | None, limit: int | None, files: list[str] | None, segments: dict | None,
    partners: dict[str, list[str]] | None = None,
) -> tuple[list[dict], functools.partial]:
    """:func:`raysseg.io.images.read_plan` (no labels) served from a prepared split: (rows of shard
    locations, the batch function that crops them). ``partners``: each candidate is passed as its location
    (JSON: shard, offset, w, h, ow, oh, path)."""
    if prepared.split != split_uri or prepared.image_size != image_size:
        raise DatasetError(f"the cache {prepared.folder} holds {prepared.split} at {prepared.image_size} px, "
                           f"not {split_uri} at {image_size} px: prepare this split and size")
    items = [{"path": r["path"], "valid": r["valid"], "error": r["error"],
              "shard": storage.join(prepared.folder, _shard_name(r["shard"])), "offset": r.get("offset", 0),
              "w": r.get("w", 0), "h": r.get("h", 0), "ow": r.get("ow", 0), "oh": r.get("oh", 0)}
             for r in prepared.rows]
    if segments is not None and not train:  # centre crops: their pseudo segments are computed once, cached
        offsets = prepare_segments(prepared, segments)
        for item in items:
            item["segments_shard"], item["segments_offset"] = offsets.get(item["path"], ("", 0))
        segments = None
    if partners is not None:
        where = {i["path"]: json.dumps([i[k] for k in ("shard", "offset", "w", "h", "ow", "oh", "path")])
                 for i in items if i["valid"]}
        wanted = {path: [c for c in found if c in where] for path, found in partners.items()}
        items = with_partners(items, wanted, where.__getitem__)
    items = select_rows(items, limit, files)
    settings = storage.s3_settings() if storage.is_s3(prepared.folder) else None
    fn = functools.partial(_crop_cached_batch, settings=settings, image_size=image_size, train=train,
                           crop_scale=tuple(crop_scale), hflip=hflip, seed=seed, segments=segments)
    return items, fn


# --------------------------------------------------------------------------- cached pseudo segments


@dataclass(frozen=True)
class SegmentsJob:
    """The pseudo segments of one image shard's centre crops, to compute and write."""

    index: int
    uri: str
    image_shard: str
    rows: tuple[tuple, ...]  # (offset, w, h, ow, oh) of each valid image of the shard, in order
    image_size: int
    segments: tuple[tuple[str, object], ...]  # oversegment keyword arguments
    settings: storage.S3Settings | None


def segments_folder(prepared: PreparedSplit, segments: dict) -> str:
    """Where the pseudo segments of ``prepared``'s centre crops with these settings live."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, sorted(segments.items())], default=str).encode())
    return storage.join(prepared.folder, f"segments-{digest.hexdigest()[:12]}")


def build_segments_shard(job: SegmentsJob) -> tuple[int, int]:
    """Centre-crop each image of a shard as a read does and oversegment it; write one int32 .npy of
    (n, S, S). Returns (the job's index, the file's size)."""
    from raysseg.core.segments import oversegment

    s = job.image_size
    blob = np.frombuffer(storage.read_bytes(job.image_shard, job.settings), np.uint8)
    out = np.zeros((len(job.rows), s, s), np.int32)
    for i, (offset, w, h, ow, oh) in enumerate(job.rows):
        out[i] = oversegment(_centre_crop(blob[offset:offset + 3 * w * h], w, h, ow, oh, s), **dict(job.segments))
    buf = io.BytesIO()
    np.save(buf, out, allow_pickle=False)
    storage.write_bytes_atomic(job.uri, buf.getvalue(), job.settings)
    return job.index, buf.tell()


def prepare_segments(prepared: PreparedSplit, segments: dict, log: Callable = _say) -> dict[str, tuple[str, int]]:
    """The cached pseudo segments of every valid image's centre crop (built first when missing, with
    ``prepared.run``): path -> (segments shard URI, byte offset of its S x S int32 map)."""
    folder = segments_folder(prepared, segments)
    settings = storage.s3_settings() if storage.is_s3(folder) else None
    by_shard: dict[int, list[dict]] = {}
    for row in prepared.rows:
        if row["valid"]:
            by_shard.setdefault(row["shard"], []).append(row)
    shards = sorted(by_shard)
    names = {i: storage.join(folder, _shard_name(i)) for i in shards}
    manifest_uri = storage.join(folder, MANIFEST)
    done = {}
    if storage.exists(manifest_uri):
        try:
            done = {int(k): v for k, v in json.loads(storage.read_bytes(manifest_uri))["bytes"].items()}
        except (ValueError, KeyError, TypeError):
            done = {}
        if set(done) != set(shards) or _damaged_shard(folder, {_shard_name(i): done[i] for i in shards}):
            done = {}
    if not done:
        jobs = [SegmentsJob(i, names[i], storage.join(prepared.folder, _shard_name(i)),
                            tuple((r["offset"], r["w"], r["h"], r["ow"], r["oh"]) for r in by_shard[i]),
                            prepared.image_size, tuple(sorted(segments.items())), settings)
                for i in shards]
        n = sum(len(j.rows) for j in jobs)
        log(f"[data cache] computing the pseudo segments of {n} centre crops once into {folder}")
        t0 = time.perf_counter()
        done = dict((prepared.run or run_in_threads)(build_segments_shard, jobs))
        storage.write_bytes_atomic(manifest_uri, json.dumps({"segments": segments, "bytes": done}).encode(), settings)
        log(f"[data cache] pseudo segments of {n} images in {time.perf_counter() - t0:.1f} s")
    plane = 4 * prepared.image_size ** 2
    offsets = {}
    for i in shards:
        header = done[i] - plane * len(by_shard[i])  # the .npy header comes first
        for k, row in enumerate(by_shard[i]):
            offsets[row["path"]] = (names[i], header + k * plane)
    return offsets


def _crop(pixels: np.ndarray, w: int, h: int, ow: int, oh: int, box: tuple, size: int) -> np.ndarray:
    """``box`` (in the original image's pixels, ``ow`` x ``oh``) of a cached ``w`` x ``h`` image, resized to
    ``size`` x ``size``."""
    sx, sy = w / ow, h / oh
    cached = Image.fromarray(pixels.reshape(h, w, 3))
    return np.asarray(cached.resize((size, size), Image.BILINEAR,
                                    box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)))


def _centre_crop(pixels: np.ndarray, w: int, h: int, ow: int, oh: int, size: int) -> np.ndarray:
    """The centre crop a read (``train=False``) takes of a cached image."""
    box, _ = crop_geometry("", (ow, oh), False, (1.0, 1.0), False, None)
    return _crop(pixels, w, h, ow, oh, box, size)


# S3 reads: ranged GETs spanning at most S3_PIECE_BYTES, several at once, cropped as each arrives. A request
# costs about as much as 1.4 MB more of transfer (local SeaweedFS: 2.7 ms + 1.9 ms per MB), so rows of a
# shard less than S3_GAP_BYTES apart (shuffled reads) share a request; the bytes between them are dropped.
S3_PIECE_BYTES = 4 << 20
S3_GAP_BYTES = 1 << 20


def _pixel_pieces(batch: dict, rows: np.ndarray,
                  settings: storage.S3Settings | None) -> Iterator[dict[int, np.ndarray]]:
    """Flat uint8 pixels of the given rows of a batch, ``{row: pixels}`` per read. Adjacent rows of a shard
    are read in one request; from S3 see S3_PIECE_BYTES, in parallel, yielded as they arrive."""
    wanted = sorted((str(batch["shard"][i]), int(batch["offset"][i]), 3 * int(batch["h"][i]) * int(batch["w"][i]),
                     int(i)) for i in rows)
    s3 = bool(wanted) and storage.is_s3(wanted[0][0])
    span, gap = (S3_PIECE_BYTES, S3_GAP_BYTES) if s3 else (math.inf, 0)
    runs: list[list] = []  # [shard, start, end, [(row, offset, nbytes), ...]]
    for shard, offset, nbytes, i in wanted:
        if (runs and runs[-1][0] == shard and runs[-1][2] <= offset <= runs[-1][2] + gap
                and offset + nbytes - runs[-1][1] <= span):
            runs[-1][2] = offset + nbytes
            runs[-1][3].append((i, offset, nbytes))
        else:
            runs.append([shard, offset, offset + nbytes, [(i, offset, nbytes)]])

    def read(run: list) -> dict[int, np.ndarray]:
        shard, start, end, members = run
        data = np.frombuffer(storage.read_range(shard, start, end - start, settings), np.uint8)
        return {i: data[offset - start:offset - start + nbytes] for i, offset, nbytes in members}

    if s3 and len(runs) > 1:
        with ThreadPoolExecutor(max_workers=min(8, len(runs))) as pool:
            yield from pool.map(read, runs)
    else:
        yield from map(read, runs)


def _crop_cached_batch(
    batch: dict, *, settings: storage.S3Settings | None, image_size: int, train: bool,
    crop_scale: tuple[float, float], hflip: bool, seed: int | None, segments: dict | None = None,
) -> dict:
    """Ray Data map_batches function: cached rows -> the rows :func:`raysseg.io.images._decode_batch` gives
    (``image``, ``path``, ``valid``, ``error`` and ``segments`` when asked)."""
    paths = [str(p) for p in batch["path"]]
    n, s = len(paths), image_size
    images = np.zeros((n, s, s, 3), np.uint8)
    pseudo = np.zeros((n, s, s), np.int32) if segments is not None else None
    valid = np.array([bool(v) for v in batch["valid"]], dtype=bool)
    errors = [str(e) for e in batch["error"]]
    for piece in _pixel_pieces(batch, np.flatnonzero(valid), settings):
        for i, pixels in piece.items():
            w, h, ow, oh = (int(batch[k][i]) for k in ("w", "h", "ow", "oh"))
            box, flip = crop_geometry(paths[i], (ow, oh), train, crop_scale, hflip, seed)
            crop = _crop(pixels, w, h, ow, oh, box, s)
            images[i] = crop[:, ::-1] if flip else crop
            if pseudo is not None:
                from raysseg.core.segments import oversegment

                pseudo[i] = oversegment(images[i], **segments)
    partner = None
    if "partners" in batch:
        partner, partner_paths = np.zeros((n, s, s, 3), np.uint8), [""] * n
        for i in np.flatnonzero(valid):
            try:
                picks = partner_candidates(paths[i], str(batch["partners"][i]))
                shard, offset, w, h, ow, oh, partner_paths[i] = json.loads(
                    picks[pick_partner(seed, paths[i], len(picks))])
            except BadFileError as exc:
                valid[i], errors[i] = False, row_error(exc)
                continue
            pixels = np.frombuffer(storage.read_range(shard, offset, 3 * w * h, settings), np.uint8)
            box, flip = crop_geometry(partner_paths[i], (ow, oh), train, crop_scale, hflip, seed)
            crop = _crop(pixels, w, h, ow, oh, box, s)
            partner[i] = crop[:, ::-1] if flip else crop
    if "segments_shard" in batch:
        pseudo = np.zeros((n, s, s), np.int32)
        for i in np.flatnonzero(valid):
            data = storage.read_range(str(batch["segments_shard"][i]), int(batch["segments_offset"][i]), 4 * s * s,
                                      settings)
            pseudo[i] = np.frombuffer(data, np.int32).reshape(s, s)
    out = {"image": images, "path": np.array(paths, dtype=object), "valid": valid,
           "error": np.array(errors, dtype=object)}
    if pseudo is not None:
        out["segments"] = pseudo
    if partner is not None:
        out["partner"], out["partner_path"] = partner, np.array(partner_paths, dtype=object)
    return out
