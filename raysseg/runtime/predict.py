"""``raysseg predict``: segment a whole image collection (folder or s3:// prefix) with Ray Data.

The driver streams the listing of SRC (:func:`raysseg.io.storage.iter_files`) in chunks of ``chunk``
relative paths, the most it ever holds. Each chunk is one Ray Data dataset:

1. ``PrepareRows`` tasks (many in parallel): an image whose outputs are already complete is not decoded;
   its row (pixel count per cluster) is read back from its label PNG. Every other image is read, decoded
   and resized to the model's input (:func:`raysseg.io.decode_large.decode_for_model`: a large JPEG is decoded
   at a reduced scale; an image of more than ``data.max_pixels`` is refused from its header); an unreadable or
   refused one becomes a skipped row with its reason.
2. ``Predictor`` actors (``workers`` model replicas, ``gpus_per_worker`` GPUs each): batched inference,
   the label map at each image's full size (the logits upsampled a strip of rows at a time:
   :mod:`raysseg.core.label_strips`, so an image of any size needs about one byte per pixel), its outputs
   written atomically (overlay first, the label PNG last: a label PNG marks an image as done), one row per
   image back to the driver.

Under DST: ``labels/<relative path without suffix>.png``, ``overlays/...`` (with ``overlays``),
``predictions.parquet`` (path, height, width, ``cluster_<k>`` pixel counts) and ``manifest.json``
(checkpoint, config hash, counts, skipped files with reasons, files under SRC that are not images, start and
end). Running the same command again resumes: complete images are not run through the model again, and the
temporary ``predictions.parquet`` a killed run left behind is removed. A DST written with another checkpoint
is refused.

The label maps of a batch of images (:func:`image_label_maps`) are the single source: the single-process loop
(:mod:`raysseg.apps.predict`) uses them as well.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    import ray.data

LABELS, OVERLAYS, MANIFEST, PREDICTIONS = "labels", "overlays", "manifest.json", "predictions.parquet"
CHUNK = 10_000  # relative paths per Ray Data dataset: the most of the listing the driver holds at once
ROWS_PER_TASK = 8  # images per decoding task (~10-20 ms of Ray overhead against ~5-15 ms per decode)
DECODE_MEMORY = 256 * 2**20  # bytes a decoding task reserves: 8 decoded photos of up to ~10 megapixels
OVERLAY_ROWS = 256  # image rows an overlay is blended in at a time
TMP_PREFIX, TMP_SUFFIX = ".predictions.", ".parquet.tmp"  # predictions.parquet while it is written
ROW_GROUP = 10_000  # parquet rows the driver buffers before writing them


# ---------------------------------------------------------------- the label map of one image

from raysseg.core.label_maps import input_size, label_dtype, label_map, label_maps, model_input  # noqa: E402,F401
from raysseg.core.label_strips import counts_in_strips, label_map_in_strips  # noqa: E402


@torch.inference_mode()
def image_label_maps(seg, inputs: np.ndarray, sizes: list[tuple[int, int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Model inputs of one size, uint8 (B, h, w, 3) -> per image (cluster ids at its own size ``sizes[b]``,
    pixels per cluster): one forward pass, then the logits of each image upsampled a strip of rows at a time
    (:func:`raysseg.core.label_strips.label_map_in_strips`; :func:`label_map`'s map, up to near-ties)."""
    logits = seg.cluster_logits(seg.codes(torch.from_numpy(np.array(inputs))))  # a writable copy
    dtype = label_dtype(seg.cfg.n_clusters)
    for b, size in enumerate(sizes):
        yield label_map_in_strips(logits[b], tuple(size), dtype)


def overlay_png(image: np.ndarray, labels: np.ndarray) -> bytes:
    """The colour overlay of a label map as PNG bytes, blended ``OVERLAY_ROWS`` rows at a time into the picture
    that is saved (neither its float arithmetic nor a second copy of it ever spans the whole image)."""
    from raysseg.core.pictures import overlay

    picture = Image.new("RGB", labels.shape[::-1])
    for start in range(0, labels.shape[0], OVERLAY_ROWS):
        rows = slice(start, start + OVERLAY_ROWS)
        picture.paste(Image.fromarray(overlay(image[rows], labels[rows])), (0, start))
    buf = io.BytesIO()
    picture.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def output_name(rel: str) -> str:
    """'a/b.jpg' -> 'a/b.png': the name of an image's label PNG and overlay."""
    return os.path.splitext(rel)[0] + ".png"


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------- the Ray Data stages


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays of different shapes (Ray Data stores it as a variable-shaped tensor)."""
    column = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        column[i] = a
    return column


@dataclass(frozen=True)
class JobPaths:
    """Where a job reads and writes, and how (shipped to every task and actor)."""

    src: str
    out: str
    overlays: bool
    n_clusters: int
    settings: object = None  # S3Settings captured on the driver, or None for local folders
    max_pixels: int = 250_000_000  # larger images are refused from their header (data.max_pixels, its default)

    def label(self, rel: str) -> str:
        from raysseg.io.storage import join

        return join(self.out, LABELS, *output_name(rel).split("/"))

    def overlay(self, rel: str) -> str:
        from raysseg.io.storage import join

        return join(self.out, OVERLAYS, *output_name(rel).split("/"))


def _done_counts(paths: JobPaths, rel: str) -> tuple[int, int, np.ndarray] | None:
    """(height, width, pixels per cluster) of an image whose outputs are complete, else None."""
    from raysseg.io.decode_large import own_pixel_bound
    from raysseg.io.storage import exists, read_if_exists

    data = read_if_exists(paths.label(rel), paths.settings)
    if data is None or (paths.overlays and not exists(paths.overlay(rel))):
        return None
    try:
        with own_pixel_bound(), Image.open(io.BytesIO(data)) as png:
            if png.width * png.height > paths.max_pixels:
                return None  # not one of this job's label maps
            labels = np.asarray(png)
    except OSError:
        return None  # damaged by hand: predict it again
    if labels.ndim != 2:
        return None  # not a label map
    counts = counts_in_strips(labels, paths.n_clusters)
    if len(counts) > paths.n_clusters:
        return None  # not a label map of this model
    return labels.shape[0], labels.shape[1], counts


def prepare_rows(batch: dict, *, paths: JobPaths, short_side: int, multiple: int, overwrite: bool) -> dict:
    """Ray Data task: per relative path, status ``done`` (outputs complete; counts read back from its label),
    ``bad`` (unreadable or too large; ``error`` says why) or ``todo`` (decoded; ``input`` resized for the model,
    ``image`` kept for the overlay)."""
    from raysseg.io.decode_large import decode_for_model
    from raysseg.io.storage import StorageError, join, read_bytes

    empty = np.zeros((1, 1, 3), np.uint8)
    rows = {"path": [], "status": [], "error": [], "height": [], "width": [], "counts": [], "input": [], "image": []}
    for rel in batch["path"]:
        rel = str(rel)
        status, error, h, w = "todo", "", 0, 0
        counts, inputs, image = np.zeros(paths.n_clusters, np.int64), empty, empty
        done = None if overwrite else _done_counts(paths, rel)
        if done is not None:
            status, (h, w, counts) = "done", done
        else:
            try:
                decoded = decode_for_model(read_bytes(join(paths.src, *rel.split("/")), paths.settings), short_side,
                                           multiple, paths.max_pixels, full=paths.overlays)
                (h, w), inputs = decoded.size, decoded.input
                image = decoded.full if paths.overlays else empty
            except (ValueError, StorageError) as e:
                status, error = "bad", " ".join(str(e).split())
        for key, value in (("path", rel), ("status", status), ("error", error), ("height", h), ("width", w),
                           ("counts", counts), ("input", inputs), ("image", image)):
            rows[key].append(value)
    return {"path": np.array(rows["path"], dtype=object), "status": np.array(rows["status"]),
            "error": np.array(rows["error"], dtype=object), "height": np.array(rows["height"], np.int64),
            "width": np.array(rows["width"], np.int64), "counts": np.stack(rows["counts"]).astype(np.int64),
            "input": _objects(rows["input"]), "image": _objects(rows["image"])}


class Predictor:
    """Actor: one model replica. Runs the model on the ``todo`` rows of a batch (one forward per input
    size), writes their outputs and returns every row without its pixels (``todo`` becomes ``predicted``)."""

    def __init__(self, ckpt_ref: list, paths: JobPaths, threads: int):
        import ray

        from raysseg.io.checkpoints import segmenter_from

        torch.set_num_threads(threads)
        self.seg = segmenter_from(ray.get(ckpt_ref[0]))
        if torch.cuda.is_available() and ray.get_gpu_ids():
            self.seg = self.seg.cuda()
        self.paths = paths

    def __call__(self, batch: dict) -> dict:
        return predict_batch(self.seg, self.paths, batch)


def predict_batch(seg, paths: JobPaths, batch: dict) -> dict:
    """What a :class:`Predictor` does with a batch of :func:`prepare_rows` rows (one forward per input size)."""
    from raysseg.io.storage import write_bytes_atomic

    todo = [i for i, s in enumerate(batch["status"]) if s == "todo"]
    by_size: dict[tuple, list[int]] = {}
    for i in todo:
        by_size.setdefault(tuple(batch["input"][i].shape), []).append(i)
    counts, status = batch["counts"].copy(), batch["status"].astype(object)
    for rows in by_size.values():
        inputs = np.stack([batch["input"][i] for i in rows])
        sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in rows]
        for i, (labels, pixels) in zip(rows, image_label_maps(seg, inputs, sizes)):
            rel = str(batch["path"][i])
            if paths.overlays:  # the overlay first: a label PNG marks the image as done
                write_bytes_atomic(paths.overlay(rel), overlay_png(batch["image"][i], labels), paths.settings)
            write_bytes_atomic(paths.label(rel), png_bytes(labels), paths.settings)
            counts[i] = pixels
            status[i] = "predicted"
            del labels  # freed before the next image's map is made
    return {"path": batch["path"], "status": status.astype(str), "error": batch["error"],
            "height": batch["height"], "width": batch["width"], "counts": counts}


# ---------------------------------------------------------------- the driver


@dataclass
class PredictSummary:
    """What one run of the job did."""

    out: str
    listed: int = 0
    predicted: int = 0  # images the model ran on in this run
    reused: int = 0  # images whose outputs were already complete
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    n_left_out: int = 0  # files under SRC that are not images, as train and evaluate leave them out
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason) of the first ones
    seconds: float = 0.0
    log: str = ""


def checkpoint_identity(ckpt: dict) -> tuple[str, str]:
    """(config hash, model hash) of a loaded checkpoint: the same weights and config give the same pair,
    whichever URI (path, s3://, runs:/, models:/) it came from."""
    config = json.dumps(ckpt["config"], sort_keys=True, default=str).encode()
    model = hashlib.sha256(config)
    for name, tensor in sorted(ckpt["state"].items()):
        model.update(name.encode())
        model.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hashlib.sha256(config).hexdigest()[:12], model.hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_destination(out: str, model_hash: str) -> dict | None:
    """The manifest of an earlier run into ``out`` (None for a fresh DST); one line when ``out`` holds
    predictions of another checkpoint or outputs without a manifest."""
    from raysseg.io.storage import StorageError, exists, join, read_if_exists

    data = read_if_exists(join(out, MANIFEST))
    if data is None:
        if exists(join(out, LABELS)):
            raise StorageError(f"{out} holds labels/ but no {MANIFEST} (not written by raysseg predict): "
                               "write to another --out or remove that folder")
        return None
    previous = json.loads(data)
    if previous.get("model_hash") != model_hash:
        raise StorageError(f"{out} holds predictions of another checkpoint ({previous.get('checkpoint')}, model "
                           f"{previous.get('model_hash')}): write to another --out or remove {out} first")
    return previous


def _earlier_runs(previous: dict | None) -> list[dict]:
    """The runs an earlier manifest records (a crashed run: ``finished`` None), oldest first."""
    if previous is None:
        return []
    return previous.get("earlier_runs", []) + [{k: previous.get(k) for k in ("started", "finished", "status", "counts")}]


def _images_only(rels: Iterator[str], summary: PredictSummary) -> Iterator[str]:
    """The images among the relative paths of every file under SRC; the others are counted in ``summary``, the
    first ``LEFT_OUT_KEPT`` named with their reason (the reasons of a split's images/ folder)."""
    from raysseg.io.images import LEFT_OUT_KEPT, _left_out_reason

    for rel in rels:
        reason = _left_out_reason(rel)
        if reason is None:
            yield rel
            continue
        summary.n_left_out += 1
        if len(summary.left_out) < LEFT_OUT_KEPT:
            summary.left_out.append((rel, reason))


def left_out_line(summary: PredictSummary) -> str:
    """One line counting and naming the files under SRC that are not images, as train and evaluate do."""
    from raysseg.io.images import FORMATS

    names = ", ".join(p for p, _ in summary.left_out[:3]) + (", ..." if summary.n_left_out > 3 else "")
    reasons = "; ".join(sorted({r for _, r in summary.left_out}))
    return (f"{summary.n_left_out} file(s) left out ({reasons}): {names}: convert them to {FORMATS} or move "
            "them elsewhere")


def chunks(paths: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(islice(paths, size)):
        yield chunk


class _Total:
    """The number of images under SRC, counted by a second streaming listing in a background thread
    (for the time left); None until known."""

    def __init__(self, src: str, settings):
        from raysseg.io.storage import iter_files

        self.value: int | None = None

        def count() -> None:
            try:
                self.value = sum(1 for _ in iter_files(src, settings=settings))
            except Exception:  # noqa: BLE001 - the main listing reports listing errors
                pass

        threading.Thread(target=count, daemon=True).start()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _ProgressLine:
    """One progress line, rewritten in place on a terminal (a new line every 10 s otherwise)."""

    def __init__(self, total: _Total):
        self.total, self.start, self.last = total, time.time(), 0.0
        self.tty = sys.stdout.isatty()

    def show(self, s: PredictSummary, final: bool = False) -> None:
        """Rewrite the line (at most once a second; ``final``: the last time, ending the line on a terminal)."""
        now = time.time()
        if final and not self.tty or not final and now - self.last < (1.0 if self.tty else 10.0):
            return
        self.last = now
        handled = s.predicted + s.reused + len(s.skipped)
        rate = s.predicted / max(now - self.start, 1e-9)
        total = self.total.value
        left = (total - handled) / max(handled / max(now - self.start, 1e-9), 1e-9) if total else float("nan")
        of = f"/{total:,}" if total else ""
        line = (f"[predict] {handled:,}{of} images ({s.predicted:,} predicted, {s.reused:,} already done, "
                f"{len(s.skipped):,} skipped) {rate:.1f} images/s, {_duration(left)} left")
        print(("\r" + line.ljust(100)) if self.tty else line, end="\n" if final or not self.tty else "", flush=True)


@contextlib.contextmanager
def _stderr_to(path: str) -> Iterator[None]:
    """Send everything written to this process's stderr (file descriptor 2) to ``path`` meanwhile: Ray's
    start-up lines, its C++ core's warnings and Ray Data's execution reports. The terminal keeps stdout
    (the progress line and the summary)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class _PredictionsFile:
    """``predictions.parquet`` written row group by row group into a local temporary file and put in place
    whole (renamed into a local DST, uploaded once to S3) by :meth:`commit`. The temporary file lies in a
    local DST (``.predictions.<random>.parquet.tmp``), or in the system's temporary folder for an S3 DST (named
    after a hash of DST): a killed run's one is removed when the next run into the same DST starts."""

    def __init__(self, out: str, n_clusters: int):
        import pyarrow as pa

        from raysseg.io.storage import is_s3, resolve

        self.uri = out.rstrip("/") + "/" + PREDICTIONS
        self.schema = pa.schema([("path", pa.string()), ("height", pa.int32()), ("width", pa.int32())]
                                + [(f"cluster_{k}", pa.int64()) for k in range(n_clusters)])
        folder = None if is_s3(out) else resolve(out)[1]
        if folder:
            os.makedirs(folder, exist_ok=True)
        prefix = TMP_PREFIX if folder else f"{TMP_PREFIX}{hashlib.sha256(self.uri.encode()).hexdigest()[:12]}."
        place = folder or tempfile.gettempdir()
        for stale in glob.glob(os.path.join(glob.escape(place), glob.escape(prefix) + "*" + TMP_SUFFIX)):
            os.unlink(stale)  # left by a killed run into this DST
        fd, self.tmp = tempfile.mkstemp(dir=place, prefix=prefix, suffix=TMP_SUFFIX)
        os.close(fd)
        self.writer, self.rows = None, []

    def add(self, path: str, height: int, width: int, counts: np.ndarray) -> None:
        self.rows.append((path, height, width, counts))
        if len(self.rows) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        counts = np.stack([r[3] for r in self.rows])
        columns = [pa.array([r[0] for r in self.rows]), pa.array([r[1] for r in self.rows], pa.int32()),
                   pa.array([r[2] for r in self.rows], pa.int32())] + [pa.array(counts[:, k]) for k in
                                                                        range(counts.shape[1])]
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.rows = []

    def commit(self) -> None:
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        from raysseg.io.storage import is_s3, resolve

        self._flush()
        if self.writer is None:
            pq.write_table(self.schema.empty_table(), self.tmp)
        else:
            self.writer.close()
        fs, path = resolve(self.uri)
        if is_s3(self.uri):  # one upload: the object appears when it completes
            pafs.copy_files(self.tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            os.unlink(self.tmp)
        else:
            os.replace(self.tmp, path)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _user_error(exc: BaseException) -> BaseException | None:
    """The project's one-line error inside a Ray task failure, if that is what it is."""
    from raysseg.io.images import DatasetError
    from raysseg.io.storage import StorageError

    seen = exc
    while seen is not None:
        cause = getattr(seen, "cause", None)  # RayTaskError keeps the task's own exception here
        for candidate in (cause, seen):
            if isinstance(candidate, (StorageError, DatasetError)):
                return type(candidate)(str(candidate.args[0]) if candidate.args else str(candidate))
        seen = seen.__cause__
    return None


def chunk_dataset(rels: list[str], paths: JobPaths, ckpt_ref: list, *, short_side: int, multiple: int,
                   overwrite: bool, workers: int, threads: int, gpus_per_worker: float,
                   batch_size: int) -> "ray.data.Dataset":
    """The plan for one chunk of relative paths (nothing runs until it is iterated): decoding tasks, then the
    model replicas; its rows are the images' statuses and pixel counts."""
    import ray
    import ray.data

    ds = ray.data.from_items([{"path": r} for r in rels], override_num_blocks=max(1, math.ceil(len(rels) / ROWS_PER_TASK)))
    ds.context.op_resource_reservation_enabled = False  # as in runtime.datasets: on 2 cores it starves decoding
    # Decoding tasks reserve the memory of their block; remote args unlike the actors' also keep Ray Data from
    # fusing decoding into the model actors: it stays in tasks of its own, as many as there are free CPUs.
    ds = ds.map_batches(prepare_rows, batch_size=None, batch_format="numpy", num_cpus=1, memory=DECODE_MEMORY,
                        fn_kwargs={"paths": paths, "short_side": short_side, "multiple": multiple,
                                   "overwrite": overwrite})
    ds = ds.map_batches(Predictor, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads, num_gpus=gpus_per_worker,
                        fn_constructor_kwargs={"ckpt_ref": ckpt_ref, "paths": paths, "threads": threads})
    return ds


def predict_job(checkpoint: str, images: str, out: str, *, workers: int = 2, gpus_per_worker: float = 0.0,
                batch_size: int = 8, overlays: bool = False, overwrite: bool = False,
                chunk: int = CHUNK, max_pixels: int | None = None) -> PredictSummary:
    """Segment every image under ``images`` (folder or s3:// prefix, sub-folders too) into ``out`` (folder or
    s3:// prefix): see the module docstring. ``overwrite`` runs the model on complete images too; images of more
    than ``max_pixels`` pixels (default: the checkpoint's ``data.max_pixels``) are skipped."""
    import ray

    from raysseg.io.checkpoints import load_segmenter
    from raysseg.io.storage import (IMAGE_SUFFIXES, StorageError, is_s3, iter_files, join, makedirs, require_bucket,
                                    s3_settings, write_bytes_atomic)
    from raysseg.runtime import logs
    from raysseg.runtime.driver import init_ray
    from raysseg.settings import ConfigError

    if workers < 1 or gpus_per_worker < 0 or batch_size < 1 or max_pixels is not None and max_pixels < 1:
        raise ConfigError(f"--workers {workers}, --gpus-per-worker {gpus_per_worker}, --batch-size {batch_size}, "
                          f"--max-pixels {max_pixels}: give at least 1 worker, a batch of at least 1, no negative "
                          "GPUs and a positive pixel bound")
    src, out = images.rstrip("/"), out.rstrip("/")
    if out == src or out.startswith(src + "/"):
        raise StorageError(f"--out {out} lies inside --images {src}: its outputs would be read as images; "
                           "write them elsewhere")
    settings = s3_settings() if is_s3(src) or is_s3(out) else None
    require_bucket(src)
    makedirs(out)  # S3: the bucket must exist
    if next(iter_files(src, settings=settings), None) is None:
        raise StorageError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) under {src}, sub-folders included: "
                           "point --images at your images")
    seg, ckpt = load_segmenter(checkpoint)  # a bad checkpoint fails here, before Ray starts
    config_hash, model_hash = checkpoint_identity(ckpt)
    previous = _check_destination(out, model_hash)
    started = _now()
    log = logs.log_file() or os.path.abspath(os.path.join("outputs", "logs", f"predict-{started.replace(':', '')}.log"))
    manifest = {"checkpoint": checkpoint, "config_hash": config_hash, "model_hash": model_hash,
                "method": seg.cfg.method, "n_clusters": seg.cfg.n_clusters, "images": src, "overlays": overlays,
                "status": "running", "started": started, "finished": None, "log": log,
                "earlier_runs": _earlier_runs(previous)}
    write_bytes_atomic(join(out, MANIFEST), json.dumps(manifest, indent=2).encode())
    paths = JobPaths(src, out, overlays, seg.cfg.n_clusters, settings, max_pixels or seg.cfg.data.max_pixels)
    short_side, multiple = seg.cfg.data.image_size, seg.input_multiple
    del seg

    local = not os.environ.get("RAY_ADDRESS")
    threads = max(1, (os.cpu_count() or 1) // workers) if local and not gpus_per_worker else 1
    print(f"[predict] {src} -> {out}: {workers} worker(s) of {threads} CPU(s) and {gpus_per_worker:g} GPU(s), "
          f"batches of {batch_size}; Ray's logs: {log}", flush=True)
    summary = PredictSummary(out=out, log=log)
    progress = _ProgressLine(_Total(src, settings))
    table = _PredictionsFile(out, paths.n_clusters)
    t0 = time.time()
    own_ray = not ray.is_initialized()  # a local Ray this job starts is stopped when it ends
    try:
        with _stderr_to(log):
            init_ray(workers)
            ckpt_ref = [ray.put(ckpt)]
            for rels in chunks(_images_only(iter_files(src, suffixes=("",), settings=settings), summary), chunk):
                summary.listed += len(rels)
                ds = chunk_dataset(rels, paths, ckpt_ref, short_side=short_side, multiple=multiple,
                                   overwrite=overwrite, workers=workers, threads=threads,
                                   gpus_per_worker=gpus_per_worker, batch_size=batch_size)
                for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for i, rel in enumerate(b["path"]):
                        status = str(b["status"][i])
                        if status == "bad":
                            summary.skipped.append((str(rel), str(b["error"][i])))
                            continue
                        summary.predicted += status == "predicted"
                        summary.reused += status == "done"
                        table.add(str(rel), int(b["height"][i]), int(b["width"][i]), b["counts"][i])
                    progress.show(summary)
        table.commit()
    except BaseException as e:
        table.discard()
        cause = _user_error(e)
        if cause is not None:
            raise cause from None
        raise
    finally:
        if own_ray:
            with _stderr_to(log):
                ray.shutdown()
    summary.seconds = time.time() - t0
    progress.show(summary, final=True)
    manifest.update(status="finished", finished=_now(), seconds=round(summary.seconds, 1),
                    counts={"listed": summary.listed, "predicted": summary.predicted, "already_done": summary.reused,
                            "skipped": len(summary.skipped), "left_out": summary.n_left_out},
                    skipped=[{"path": p, "reason": r} for p, r in summary.skipped],
                    left_out=[{"path": p, "reason": r} for p, r in summary.left_out])
    write_bytes_atomic(join(out, MANIFEST), json.dumps(manifest, indent=2).encode())
    if summary.n_left_out:
        print(f"warning: {src}: {left_out_line(summary)}")
    for rel, reason in summary.skipped:
        print(f"skipped {rel}: {reason}")
    print(f"[predict] {summary.listed:,} images: {summary.predicted:,} predicted, {summary.reused:,} already done, "
          f"{len(summary.skipped):,} skipped in {_duration(summary.seconds)} "
          f"({summary.predicted / max(summary.seconds, 1e-9):.1f} images/s); {out}/{PREDICTIONS}, {out}/{MANIFEST}")
    return summary
