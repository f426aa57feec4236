"""Image splits: layout, listing and decoding rows (the Ray Data pipeline is in :mod:`raysseg.runtime.datasets`).

A split is a local folder or s3:// prefix holding ``images/`` (PNG, JPEG, WebP, TIFF or BMP, sub-folders
allowed; any other file there is left out, counted and listed) and, optionally, ``labels/`` (single-channel
PNG, one class index per pixel, at its image's relative path with .png).
Pipeline rows are dicts of numpy arrays: ``image`` uint8 (S,S,3), ``label`` int64 (S,S) when
labels are requested, ``path`` str, ``valid`` bool and ``error`` str. Unreadable images or
labels (empty, truncated, corrupt, a label of the wrong size or, when ``n_classes`` is given,
with values outside the classes) do not raise: their row has ``valid=False``, zeroed arrays and
a one-line error naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from raysseg.io import storage


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the URI and what to do."""


class BadFileError(DatasetError):
    """One image or label file cannot be used; its pipeline row is marked invalid with this one line."""


def read_classes(root_uri: str) -> list[str]:
    """Class names from ``classes.txt`` in a dataset root (one per line)."""
    return [line.strip() for line in storage.read_bytes(storage.join(root_uri, "classes.txt")).decode().splitlines() if line.strip()]


def upload(local_dir: str, s3_uri: str) -> int:
    """Copy a dataset folder into a bucket/prefix, with one progress line (:class:`ProgressLine`). Returns the
    number of files."""
    from raysseg.core.progress import ProgressLine

    return storage.copy_tree(local_dir, s3_uri, progress=ProgressLine(f"upload to {s3_uri}", "files").update)



# --------------------------------------------------------------------------- split listing


FORMATS = "PNG, JPEG, WebP, TIFF or BMP"
LEFT_OUT_KEPT = 20  # left-out files named in a listing (all of them are counted)


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _relative(root_uri: str, uri: str) -> str:
    """``uri`` relative to the folder ``root_uri``, with '/' separators."""
    root = root_uri.rstrip("/").rstrip(os.sep)
    return uri[len(root):].lstrip("/").lstrip(os.sep).replace(os.sep, "/")


def _left_out_reason(rel: str) -> str | None:
    """Why a file at ``rel`` (relative to images/) is not read as an image, or None when it is."""
    if any(part.startswith(".") for part in rel.split("/")):
        return "hidden file"
    ext = os.path.splitext(rel)[1].lower()
    if ext not in storage.IMAGE_SUFFIXES:
        return f"{ext or 'no extension'} is not an image format raysseg reads"
    return None


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


class Uris(Sequence):
    """The URIs ``<root>/<rel>`` of a column of relative paths, made one at a time: a compact, picklable
    sequence (an Arrow string array and the root) instead of a Python string per file."""

    def __init__(self, root: str, rel: pa.Array):
        self.root, self.rel = root, rel

    def __len__(self) -> int:
        return len(self.rel)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self.rel))
            rel = self.rel.slice(start, max(0, stop - start)) if step == 1 else self.rel.take(np.arange(start, stop, step))
            return Uris(self.root, rel)
        return storage.join(self.root, *str(self.rel[int(i)]).split("/"))

    def __iter__(self):
        for start in range(0, len(self.rel), 4096):
            for rel in self.rel.slice(start, 4096).to_pylist():
                yield storage.join(self.root, *rel.split("/"))

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"Uris({self.root!r}, {len(self)} files)"

    def relative(self, uris) -> list[str]:
        """The relative paths of ``uris`` (URIs under this root)."""
        return [_relative(self.root, uri) for uri in uris]


@dataclass(frozen=True)
class SplitListing:
    """One listing of a split (``images/`` and ``labels/`` together), kept compact: per image its path relative
    to ``images/`` (an Arrow string array, sorted), size and modification time (int64 arrays), and the path of
    its label relative to ``labels/`` (null when it has none; ``label_rel`` None when there is no labels/).
    ``labels`` is set once pairing is checked (:meth:`with_labels`). Files under ``images/`` that are not read
    are counted (``n_left_out``) and the first ``LEFT_OUT_KEPT`` named in ``left_out`` (URI, reason).
    ``pages``: the listing pages read (on S3, LIST requests)."""

    uri: str
    rel: pa.Array
    size: np.ndarray
    mtime_ns: np.ndarray
    label_rel: pa.Array | None
    unmatched_labels: tuple[int, tuple[str, ...]] = (0, ())  # (count, first few) of labels that match no image
    left_out: list[tuple[str, str]] = field(default_factory=list)
    n_left_out: int = 0
    left_out_reasons: tuple[str, ...] = ()
    pages: int = 0
    labelled: bool = False

    def __len__(self) -> int:
        return len(self.rel)

    @property
    def images_uri(self) -> str:
        return storage.join(self.uri, "images")

    @property
    def labels_uri(self) -> str:
        return storage.join(self.uri, "labels")

    @property
    def images(self) -> Uris:
        """The image URIs, in sorted relative-path order."""
        return Uris(self.images_uri, self.rel)

    @property
    def labels(self) -> Uris | None:
        """The label URI of each image (:meth:`with_labels` checked that every image has one), else None."""
        return Uris(self.labels_uri, self.label_rel) if self.labelled else None

    def stats(self) -> Iterator[storage.FileStat]:
        """URI, size and modification time of each image, one at a time (the prepared-data cache's key)."""
        for i, uri in enumerate(self.images):
            yield storage.FileStat(uri, int(self.size[i]), int(self.mtime_ns[i]))

    def left_out_line(self) -> str:
        """One line counting and naming the files of ``images/`` that are not read ('' when there are none)."""
        if not self.n_left_out:
            return ""
        names = ", ".join(_name(uri) for uri, _ in self.left_out[:3]) + (", ..." if self.n_left_out > 3 else "")
        return (f"{self.n_left_out} file(s) under images/ left out ({'; '.join(self.left_out_reasons)}): {names}: "
                f"convert them to {FORMATS} or move them out of images/")

    def with_labels(self) -> "SplitListing":
        """This listing with ``labels`` set; a DatasetError line unless every image has a label PNG at its
        relative path (images/city/a.jpg -> labels/city/a.png)."""
        if self.labelled:
            return self
        if self.label_rel is None:
            raise DatasetError(f"{self.uri} has no labels/ folder but labels were requested: add labels/*.png or "
                               "use a split with labels")
        missing = self.label_rel.is_null()
        n_missing = pc.sum(missing.cast(pa.int64())).as_py() or 0
        if n_missing:
            first = self.rel.filter(missing).slice(0, 4).to_pylist()
            count, unmatched = self.unmatched_labels
            others = f"; {count} label file(s) match no image (first: {_first(list(unmatched))})" if count else ""
            raise DatasetError(
                f"{n_missing} of {len(self)} images in {self.images_uri} have no label PNG at the same relative path "
                f"in {self.labels_uri} (first: {_first(first)}){others}: name each label like its image with .png "
                "(images/x/a.jpg -> labels/x/a.png), add the missing labels or remove those images"
            )
        return dataclasses.replace(self, labelled=True)

    def rows(self, limit: int | None = None, files=None) -> "Rows":
        """The read plan's rows: the first ``limit`` images (sorted order), then only those among ``files``
        (image URIs); with their labels when :meth:`with_labels` was called."""
        n = len(self) if limit is None else min(limit, len(self))
        columns = {"rel": self.rel.slice(0, n)}
        if self.labelled:
            columns["label_rel"] = self.label_rel.slice(0, n)
        table = pa.table(columns)
        if files is not None:
            table = table.filter(pc.is_in(table["rel"], value_set=pa.array(self.images.relative(files), pa.string())))
        return Rows(table, self.images_uri, self.labels_uri if self.labelled else None)


class Rows(Sequence):
    """Rows of a read plan kept as an Arrow table of relative paths (``rel``, and ``label_rel``); each row
    reads as the dict ``{"path": URI}`` (plus ``label_path``) that :func:`_decode_batch` takes. Ray Data gets
    the table itself (:meth:`table`), whose rows the batch function resolves against the same roots."""

    def __init__(self, table: pa.Table, images_root: str, labels_root: str | None):
        self._table, self.images_root, self.labels_root = table, images_root, labels_root

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[k] for k in range(start, stop, step)]
            return Rows(self._table.slice(start, max(0, stop - start)), self.images_root, self.labels_root)
        i = int(i)
        row = {"path": storage.join(self.images_root, *str(self._table["rel"][i]).split("/"))}
        if self.labels_root is not None:
            row["label_path"] = storage.join(self.labels_root, *str(self._table["label_rel"][i]).split("/"))
        return row

    def __iter__(self):
        for start in range(0, len(self), 4096):
            yield from self[start:start + 4096]._rows()

    def _rows(self) -> Iterator[dict]:
        labels = self._table["label_rel"].to_pylist() if self.labels_root is not None else None
        for i, rel in enumerate(self._table["rel"].to_pylist()):
            row = {"path": storage.join(self.images_root, *rel.split("/"))}
            if labels is not None:
                row["label_path"] = storage.join(self.labels_root, *labels[i].split("/"))
            yield row

    def table(self) -> pa.Table:
        """The rows as Arrow: ``rel`` (and ``label_rel``), relative to ``images_root`` (and ``labels_root``)."""
        return self._table


def _pages(uri: str) -> Iterator[list[tuple[str, int, int]]]:
    """The listing pages of a split: everything under it on S3 (one prefix, so one listing), ``images/`` and
    ``labels/`` of a local folder."""
    return storage.list_pages(uri, subfolders=("images", "labels"))


def list_split(uri: str, with_labels: bool = False) -> SplitListing:
    """List a split once: ``images/`` and ``labels/`` together, streamed a page at a time, each image kept as
    its relative path, size and modification time; its label (the same relative path with .png) paired by
    vectorised lookups. ``with_labels``: every image must have a label (:meth:`SplitListing.with_labels`).
    A missing or empty ``images/`` is one DatasetError line; a missing bucket one StorageError line."""
    local = not storage.is_s3(uri)
    if local and not os.path.isdir(storage.join(uri, "images")):
        raise DatasetError(f"{uri} has no images/ folder: a split needs images/ ({FORMATS} files, sub-folders "
                           "allowed) and, for evaluation, labels/*.png")
    image_chunks, size_chunks, time_chunks, label_chunks = [], [], [], []
    left_out: list[tuple[str, str]] = []
    n_left_out, reasons, pages, anything_in_images = 0, set(), 0, False
    images_uri = storage.join(uri, "images")
    for page in _pages(uri):
        pages += 1
        rels, sizes, times, labels = [], [], [], []
        for path, size, mtime in page:
            top, _, rel = path.partition("/")
            if top == "images" and rel:
                anything_in_images = True
                reason = _left_out_reason(rel)
                if reason is None:
                    rels.append(rel)
                    sizes.append(size)
                    times.append(mtime)
                else:
                    n_left_out += 1
                    reasons.add(reason)
                    if len(left_out) < LEFT_OUT_KEPT:
                        left_out.append((storage.join(images_uri, *rel.split("/")), reason))
            elif top == "labels" and rel.lower().endswith(".png"):
                labels.append(rel)
        if rels:
            image_chunks.append(pa.array(rels, pa.string()))
            size_chunks.append(np.array(sizes, np.int64))
            time_chunks.append(np.array(times, np.int64))
        if labels:
            label_chunks.append(pa.array(labels, pa.string()))
    if not local and not anything_in_images:  # S3 has no empty folders (a missing bucket raised already)
        raise DatasetError(f"{uri} has no images/ folder: a split needs images/ ({FORMATS} files, sub-folders "
                           "allowed) and, for evaluation, labels/*.png")
    if not image_chunks:
        found = f" (only {n_left_out} other file(s): {_first([_name(u) for u, _ in left_out])})" if n_left_out else ""
        raise DatasetError(f"{images_uri} holds no {FORMATS} images{found}: put the split's images there")
    # one column at a time, each page's chunks dropped once joined: the listing's peak stays near what it keeps
    size = np.concatenate(size_chunks)
    del size_chunks
    mtime = np.concatenate(time_chunks)
    del time_chunks
    rel = pa.concat_arrays(image_chunks)
    del image_chunks
    if len(rel) > 1 and not pc.all(pc.less_equal(rel.slice(0, len(rel) - 1), rel.slice(1))).as_py():
        order = pc.sort_indices(rel)  # both listings come in path order; this is a safeguard
        rel, size, mtime = rel.take(order), size[order.to_numpy()], mtime[order.to_numpy()]
    label_rel, unmatched = None, (0, ())
    if label_chunks or (local and os.path.isdir(storage.join(uri, "labels"))):
        labels = pa.concat_arrays(label_chunks) if label_chunks else pa.array([], pa.string())
        label_keys = _stems(labels)
        at = pc.index_in(_stems(rel), value_set=label_keys)
        label_rel = labels.take(at)
        matched = pc.is_in(label_keys, value_set=_stems(rel))
        unmatched_rel = labels.filter(pc.invert(matched))
        unmatched = (len(unmatched_rel), tuple(unmatched_rel.slice(0, 4).to_pylist()))
    listing = SplitListing(uri, rel, size, mtime, label_rel, unmatched, left_out, n_left_out, tuple(sorted(reasons)),
                           pages)
    return listing.with_labels() if with_labels else listing


def _stems(rel: pa.Array) -> pa.Array:
    """What pairs an image with its label: the relative path without its extension ('city/a')."""
    return pc.replace_substring_regex(rel, pattern=r"\.[^./]*$", replacement="")


def list_image_stats(split_uri: str) -> tuple[list[storage.FileStat], list[tuple[str, str]]]:
    """(the images of a split with size and modification time, in sorted order; (URI, reason) of the first
    files under images/ that are left out): a listing as Python objects, for small splits."""
    listing = list_split(split_uri)
    return list(listing.stats()), listing.left_out


# --------------------------------------------------------------------------- decoding + geometry


def _open_image(data: bytes) -> Image.Image:
    """PIL image of ``data``, fully loaded; unreadable bytes raise ValueError with a short reason.
    TIFFs that PIL cannot read (float RGB, many channels) are read with tifffile."""
    from PIL import UnidentifiedImageError

    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff_image(data)
        raise ValueError(f"not a readable image: {len(data)} bytes of no known format, or a corrupt header") from None
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's truncated/broken-file errors
        im.close()
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"truncated or corrupt {im.format or 'image'} file ({reason})") from None
    return im


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """8-bit pixels of an integer or float array: 16-bit scaled by 1/257, floats in [0, 1] by 255."""
    if pixels.dtype == np.uint8:
        return pixels
    values = pixels.astype(np.float64)
    if np.issubdtype(pixels.dtype, np.floating):
        values = np.nan_to_num(values) * (255.0 if values.max(initial=0) <= 1.0 else 1.0)
    else:  # 16-bit (or wider) integers: the 16-bit range onto 0..255
        values = values / 257.0
    return values.clip(0, 255).round().astype(np.uint8)


def _tiff_image(data: bytes) -> Image.Image:
    """The first page of a TIFF PIL cannot open, as an 8-bit L or RGB image (extra channels dropped)."""
    try:
        import tifffile

        pixels = tifffile.imread(io.BytesIO(data), key=0)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for bad files
        raise ValueError(f"unreadable TIFF ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    pixels = np.squeeze(pixels)
    if pixels.ndim == 3 and pixels.shape[0] in (3, 4) and pixels.shape[-1] not in (3, 4):  # planar: C x H x W
        pixels = np.moveaxis(pixels, 0, -1)
    if pixels.ndim == 3:
        pixels = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., 0]
    if pixels.ndim != 2 and not (pixels.ndim == 3 and pixels.shape[-1] == 3):
        raise ValueError(f"TIFF of shape {pixels.shape}: expected a grayscale or RGB image")
    return Image.fromarray(_to_uint8(pixels))


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an 8-bit RGB PIL image: turned upright by its EXIF
    orientation (cameras, phones); alpha dropped (the colour under it kept); 16-bit (PNG, TIFF) scaled to 8 bits;
    float TIFFs in [0, 1] scaled by 255; grayscale, palette, CMYK and other modes converted to RGB.

    Empty, truncated or corrupt bytes raise ValueError with a short reason."""
    from PIL import ImageOps

    with _open_image(data) as opened:
        try:
            im = ImageOps.exif_transpose(opened)
        except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels as stored
            im = opened.copy()
        if im.mode.startswith("I") or im.mode == "F":
            return Image.fromarray(_to_uint8(np.asarray(im))).convert("RGB")
        return im.convert("RGB")


def decode_label(data: bytes) -> Image.Image:
    """Decode a label PNG (single channel of class indices: L, P, I or I;16) without changing values."""
    with _open_image(data) as im:
        if im.mode in ("L", "P"):
            return im.copy()
        if im.mode.startswith("I"):
            return Image.fromarray(np.asarray(im).astype(np.int32))
        raise ValueError(f"label has mode {im.mode}: labels must be single-channel PNGs of class indices")


EPOCH_SEED = "epoch"  # a dataset's seed option: new crops every epoch, drawn from (train.seed, epoch) by the runtime


def _row_rng(seed: int | tuple | None, path: str) -> np.random.Generator:
    """The crop generator of one row: from ``seed`` (an int, or a tuple such as (train seed, epoch)) and the path."""
    if seed is None:  # fresh crops every time the row is read, from the OS (not reproducible)
        return np.random.default_rng()
    digest = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([*(seed if isinstance(seed, tuple) else (seed,)), digest])


def pick_partner(seed: int | tuple | None, path: str, n: int) -> int:
    """Which of its ``n`` partner candidates the row ``path`` reads (the ``partners`` option of :func:`read_plan`):
    drawn from (``seed``, path) as its crop is, so a seed per epoch draws a new partner every epoch."""
    return int(_row_rng(seed, "partner\0" + path).integers(n))


def random_resized_crop_box(
    rng: np.random.Generator, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[float, float, float, float]:
    """A crop box (x0, y0, x1, y1) covering a random area fraction in ``scale`` with a log-uniform
    aspect ratio in ``ratio``; falls back to the centred largest square after 10 tries."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if cw <= width and ch <= height:
            x0, y0 = rng.uniform(0, width - cw), rng.uniform(0, height - ch)
            return x0, y0, x0 + cw, y0 + ch
    return center_square_box(width, height)


def center_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centred square of side min(width, height): resizing it to S equals 'resize the short side
    to S, then centre-crop S x S'."""
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def check_label_values(label: np.ndarray, n_classes: int, ignore_index: int) -> str | None:
    """None when every value of ``label`` is a class in [0, n_classes) or ``ignore_index``;
    otherwise a one-line reason listing (up to 5 of) the bad values."""
    label = np.asarray(label)
    bad = np.unique(label[((label < 0) | (label >= n_classes)) & (label != ignore_index)])
    if bad.size == 0:
        return None
    shown = ", ".join(str(int(v)) for v in bad[:5]) + (f", ... ({bad.size} values)" if bad.size > 5 else "")
    return (f"label values [{shown}] outside 0..{n_classes - 1} (ignore {ignore_index}): "
            "fix data.n_classes or the label file")


def crop_geometry(
    path: str, size: tuple[int, int], train: bool, crop_scale: tuple[float, float], hflip: bool, seed: int | None,
) -> tuple[tuple[float, float, float, float], bool]:
    """(crop box in the pixels of an image of ``size`` (W, H), horizontal flip?) of the row ``path``:
    a random resized crop (seeded per image, see :func:`read_plan`) when ``train``, else the centred square."""
    if not train:
        return center_square_box(*size), False
    rng = _row_rng(seed, path)
    box = random_resized_crop_box(rng, *size, crop_scale)
    return box, hflip and rng.random() < 0.5


def row_error(exc: Exception) -> str:
    """The one-line error of an invalid row."""
    text = str(exc) if isinstance(exc, BadFileError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _decoded(kind: str, uri: str, settings: storage.S3Settings | None, decode) -> Image.Image:
    """Read ``uri`` (storage errors propagate) and decode it; a decode failure becomes one BadFileError
    line naming the file and what to do."""
    data = storage.read_bytes(uri, settings)
    try:
        return decode(data)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BadFileError(f"{kind} {uri}: {reason}: replace or remove the file") from None


def _load_row(
    path: str, label_path: str | None, settings: storage.S3Settings | None, image_size: int,
    train: bool, crop_scale: tuple[float, float], hflip: bool, seed: int,
    label_range: tuple[int, int] | None = None, image_decoder=None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read, decode and crop one image (and its label with the same geometry, NEAREST).

    ``label_range`` = (n_classes, ignore_index): a label holding any other value is rejected.
    ``image_decoder``: bytes -> PIL image, instead of :func:`decode_image` (see :func:`read_plan`)."""
    image = _decoded("image", path, settings, image_decoder or decode_image)
    label = None
    if label_path is not None:
        label = _decoded("label", label_path, settings, decode_label)
        if label.size != image.size:
            raise BadFileError(
                f"label {label_path} is {label.size[0]}x{label.size[1]} but its image {path} is "
                f"{image.size[0]}x{image.size[1]} (WxH): labels must have their image's size"
                + (" as shown, i.e. turned by its EXIF orientation" if label.size == image.size[::-1] else "")
            )
        if label_range is not None:
            reason = check_label_values(np.asarray(label), *label_range)
            if reason:
                raise BadFileError(f"label {label_path}: {reason}")
    box, flip = crop_geometry(path, image.size, train, crop_scale, hflip, seed)
    out_size = (image_size, image_size)
    image_arr = np.asarray(image.resize(out_size, Image.BILINEAR, box=box))
    label_arr = None if label is None else np.asarray(label.resize(out_size, Image.NEAREST, box=box)).astype(np.int64)
    if flip:
        image_arr = image_arr[:, ::-1]
        label_arr = None if label_arr is None else label_arr[:, ::-1]
    return np.ascontiguousarray(image_arr), None if label_arr is None else np.ascontiguousarray(label_arr)


def _decode_batch(
    batch: dict, *, settings: storage.S3Settings | None, image_size: int, train: bool, with_labels: bool,
    crop_scale: tuple[float, float], hflip: bool, seed: int, segments: dict | None = None,
    label_range: tuple[int, int] | None = None, roots: tuple[str, str | None] | None = None, image_decoder=None,
) -> dict:
    """Ray Data map_batches function: file URIs -> decoded rows (invalid rows zeroed, not raised).
    Rows give ``path`` (and ``label_path``) as URIs, or as ``rel`` (and ``label_rel``) under ``roots`` (the
    images/ and labels/ URIs; see :class:`Rows`).
    Rows with ``partners`` (newline-joined candidate URIs) also get ``partner`` and ``partner_path``."""
    if "rel" in batch:
        batch = {**batch, "path": [storage.join(roots[0], *str(r).split("/")) for r in batch["rel"]]}
        if with_labels:
            batch["label_path"] = [storage.join(roots[1], *str(r).split("/")) for r in batch["label_rel"]]
    paths = [str(p) for p in batch["path"]]
    n, s = len(paths), image_size
    images = np.zeros((n, s, s, 3), np.uint8)
    labels = np.zeros((n, s, s), np.int64)
    pseudo = np.zeros((n, s, s), np.int32) if segments is not None else None
    partner = np.zeros((n, s, s, 3), np.uint8) if "partners" in batch else None
    partner_paths = [""] * n
    valid = np.ones(n, bool)
    errors = [""] * n
    for i, path in enumerate(paths):
        label_path = str(batch["label_path"][i]) if with_labels else None
        try:
            image, label = _load_row(path, label_path, settings, image_size, train, crop_scale, hflip, seed,
                                     label_range, image_decoder)
            if pseudo is not None:
                from raysseg.core.segments import oversegment

                pseudo[i] = oversegment(image, **segments)
            if partner is not None:
                candidates = partner_candidates(path, str(batch["partners"][i]))
                partner_paths[i] = candidates[pick_partner(seed, path, len(candidates))]
                partner[i] = _load_row(partner_paths[i], None, settings, image_size, train, crop_scale, hflip,
                                       seed)[0]
        except storage.StorageError:
            raise  # storage outages and bad credentials must fail loudly, not look like bad images
        except Exception as exc:  # noqa: BLE001 - any decode failure marks the row invalid
            valid[i] = False
            errors[i] = row_error(exc)
            continue
        images[i] = image
        if label is not None:
            labels[i] = label
    out = {"image": images, "path": np.array(paths, dtype=object), "valid": valid, "error": np.array(errors, dtype=object)}
    if with_labels:
        out["label"] = labels
    if pseudo is not None:
        out["segments"] = pseudo
    if partner is not None:
        out["partner"], out["partner_path"] = partner, np.array(partner_paths, dtype=object)
    return out



def with_partners(items: list[dict], partners: dict[str, list[str]], encode) -> list[dict]:
    """``items`` with a ``partners`` field: their candidates (``encode(URI)`` each) joined by newlines ('' for
    none: the read marks that row invalid, :func:`partner_candidates`)."""
    return [{**item, "partners": "\n".join(encode(c) for c in partners.get(item["path"], ()))} for item in items]


def partner_candidates(path: str, field: str) -> list[str]:
    """The candidates of a row's ``partners`` field; none is a BadFileError line (its row becomes invalid)."""
    if not field:
        raise BadFileError(f"image {path}: no partner candidates (the table was built from another listing of "
                           "the split): run again to rebuild it")
    return field.split("\n")


def select_rows(items: list[dict], limit: int | None, files: list[str] | None) -> list[dict]:
    """The first ``limit`` rows (in sorted order), then only those whose ``path`` is in ``files``."""
    items = items if limit is None else items[:limit]
    if files is not None:
        wanted = set(files)
        items = [item for item in items if item["path"] in wanted]
    return items


def read_plan(
    split_uri: str, *, image_size: int, train: bool, with_labels: bool, crop_scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = True, seed: int | None = 0, limit: int | None = None, files: list[str] | None = None,
    segments: dict | None = None, n_classes: int | None = None, ignore_index: int = 255,
    prepared=None, partners: dict[str, list[str]] | None = None, listing: SplitListing | None = None,
    image_decoder=None,
) -> tuple[Sequence[dict], functools.partial]:
    """(rows of file URIs, the batch function that decodes them) for a split folder/prefix.

    train=True: random resized crop (area fraction in ``crop_scale``) to image_size x image_size and
    a random horizontal flip, seeded per image from (seed, path); pass a different seed per epoch
    for fresh crops. train=False: resize the short side to image_size, then centre crop.
    Labels (only opened when ``with_labels``) follow the same geometry with NEAREST.
    ``limit`` keeps the first ``limit`` images in sorted order; ``files`` keeps only those image URIs.
    ``seed=None`` draws fresh crops each time a row is read, from the OS. A method asks for new crops every epoch
    that a rerun draws again with the seed option :data:`EPOCH_SEED`: the runtime then passes (seed, epoch).
    ``segments`` (keyword arguments of :func:`raysseg.core.segments.oversegment`) adds a ``segments`` column:
    the pseudo segments of each decoded image (int32 S x S), computed on the fly in the read.
    ``n_classes`` (with labels): a label file holding a value outside [0, n_classes) other than
    ``ignore_index`` makes its row invalid, with the bad values in the error.
    ``prepared`` (a :class:`raysseg.io.prepared.PreparedSplit` of this split and image_size, no labels):
    the rows come from its cached shards instead of the image files, with the same crops (the cache reads
    them itself, ``prepared.read_plan``: this module does not depend on the cache, the cache on it).
    ``listing``: the split's :func:`list_split`, when the caller has it (else it is listed here). Without
    partners the rows are :class:`Rows` (relative paths in an Arrow table, read as dicts of URIs).
    ``partners`` (image URI -> candidate URIs, e.g. STEGO's nearest neighbours) adds a ``partner`` column: one
    candidate per row (:func:`pick_partner`, from ``seed`` and the path), read with the row's options, and its
    ``partner_path``. A row whose image has no candidates, or whose partner does not decode, is invalid.
    ``image_decoder`` (picklable, bytes -> PIL image) decodes the images instead of :func:`decode_image`
    (evaluation: :func:`raysseg.io.decode_large.decode_bounded`, which refuses images over ``data.max_pixels``).
    Ray Data maps the function over the rows (:mod:`raysseg.runtime.datasets`); the in-process runner
    calls it directly.
    """
    if image_size <= 0:
        raise DatasetError(f"image_size must be positive, got {image_size}")
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise DatasetError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
    if prepared is not None:
        if with_labels:
            raise DatasetError(f"{split_uri}: labels are never cached; read a labelled split without `prepared`")
        return prepared.read_plan(split_uri, image_size=image_size, train=train, crop_scale=crop_scale,
                                  hflip=hflip, seed=seed, limit=limit, files=files, segments=segments,
                                  partners=partners)
    if listing is None or listing.uri != split_uri:
        listing = list_split(split_uri)
    items = (listing.with_labels() if with_labels else listing).rows(limit, files)
    if partners is not None:
        items = with_partners(items, partners, lambda candidate: candidate)
    settings = storage.s3_settings() if storage.is_s3(split_uri) else None  # ship the driver's S3 settings
    fn = functools.partial(
        _decode_batch, settings=settings, image_size=image_size, train=train, with_labels=with_labels,
        crop_scale=tuple(crop_scale), hflip=hflip, seed=seed, segments=segments,
        label_range=(n_classes, ignore_index) if with_labels and n_classes is not None else None,
        roots=(items.images_root, items.labels_root) if isinstance(items, Rows) else None, image_decoder=image_decoder,
    )
    return items, fn
