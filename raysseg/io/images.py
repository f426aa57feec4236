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

import functools
import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from raysseg.io import storage

if TYPE_CHECKING:
    from raysseg.io.prepared import PreparedSplit


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the URI and what to do."""


class BadFileError(DatasetError):
    """One image or label file cannot be used; its pipeline row is marked invalid with this one line."""


def read_classes(root_uri: str) -> list[str]:
    """Class names from ``classes.txt`` in a dataset root (one per line)."""
    return [line.strip() for line in storage.read_bytes(storage.join(root_uri, "classes.txt")).decode().splitlines() if line.strip()]


def upload(local_dir: str, s3_uri: str) -> int:
    """Copy a dataset folder into a bucket/prefix, printing progress. Returns the number of files."""

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            print(f"uploaded {done}/{total} files to {s3_uri}", flush=True)

    return storage.copy_tree(local_dir, s3_uri, progress=progress)



# --------------------------------------------------------------------------- split listing


@dataclass
class SplitFiles:
    """Image URIs of a split (under ``images/``, sub-folders included) and, when requested, the label URIs
    paired with them by relative path; ``left_out``: (URI, reason) of every other file under ``images/``."""

    images: list[str]
    labels: list[str] | None
    left_out: list[tuple[str, str]] = field(default_factory=list)

    def left_out_line(self) -> str:
        """One line counting and naming the files of ``images/`` that are not read ('' when there are none)."""
        if not self.left_out:
            return ""
        names = ", ".join(_name(uri) for uri, _ in self.left_out[:3]) + (", ..." if len(self.left_out) > 3 else "")
        reasons = sorted({reason for _, reason in self.left_out})
        return (f"{len(self.left_out)} file(s) under images/ left out ({'; '.join(reasons)}): {names}: "
                f"convert them to {FORMATS} or move them out of images/")


FORMATS = "PNG, JPEG, WebP, TIFF or BMP"


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


def list_image_stats(split_uri: str) -> tuple[list[storage.FileStat], list[tuple[str, str]]]:
    """(the images under ``<split>/images/`` in sorted relative-path order, sub-folders included, with
    size and modification time; (URI, reason) of every other file there, which is left out)."""
    images_uri = storage.join(split_uri, "images")
    files = storage.list_file_stats(images_uri, suffixes=None, recursive=True)
    images, left_out = [], []
    for f in files:
        reason = _left_out_reason(_relative(images_uri, f.uri))
        if reason:
            left_out.append((f.uri, reason))
        else:
            images.append(f)
    return images, left_out


def _pairing_key(root_uri: str, uri: str) -> str:
    """What pairs an image with its label: the relative path without the extension ('city/a')."""
    return os.path.splitext(_relative(root_uri, uri))[0]


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def list_split(uri: str, with_labels: bool) -> SplitFiles:
    """List ``images/`` (and, if ``with_labels``, ``labels/``) of a split; every image needs a label at the
    same relative path with the extension .png (images/city/a.jpg -> labels/city/a.png)."""
    images_uri = storage.join(uri, "images")
    if not storage.exists(images_uri):
        storage.require_bucket(uri)  # name a missing bucket, not a missing folder
        raise DatasetError(f"{uri} has no images/ folder: a split needs images/ ({FORMATS} files, sub-folders "
                           "allowed) and, for evaluation, labels/*.png")
    stats, left_out = list_image_stats(uri)
    images = [f.uri for f in stats]
    if not images:
        found = f" (only {len(left_out)} other file(s): {_first([_name(u) for u, _ in left_out])})" if left_out else ""
        raise DatasetError(f"{images_uri} holds no {FORMATS} images{found}: put the split's images there")
    if not with_labels:
        return SplitFiles(images, None, left_out)
    labels_uri = storage.join(uri, "labels")
    if not storage.exists(labels_uri):
        raise DatasetError(f"{uri} has no labels/ folder but labels were requested: add labels/*.png or use a split with labels")
    by_key = {_pairing_key(labels_uri, p): p for p in storage.list_files(labels_uri, suffixes=(".png",), recursive=True)}
    missing = [p for p in images if _pairing_key(images_uri, p) not in by_key]
    if missing:
        wanted = {_pairing_key(images_uri, p) for p in images}
        unmatched = [_relative(labels_uri, p) for k, p in by_key.items() if k not in wanted]
        others = (f"; {len(unmatched)} label file(s) match no image (first: {_first(unmatched)})"
                  if unmatched else "")
        raise DatasetError(
            f"{len(missing)} of {len(images)} images in {images_uri} have no label PNG at the same relative path in "
            f"{labels_uri} (first: {_first([_relative(images_uri, p) for p in missing])}){others}: name each label like "
            "its image with .png (images/x/a.jpg -> labels/x/a.png), add the missing labels or remove those images"
        )
    return SplitFiles(images, [by_key[_pairing_key(images_uri, p)] for p in images], left_out)


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
    label_range: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read, decode and crop one image (and its label with the same geometry, NEAREST).

    ``label_range`` = (n_classes, ignore_index): a label holding any other value is rejected."""
    image = _decoded("image", path, settings, decode_image)
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
    label_range: tuple[int, int] | None = None,
) -> dict:
    """Ray Data map_batches function: file URIs -> decoded rows (invalid rows zeroed, not raised)."""
    paths = [str(p) for p in batch["path"]]
    n, s = len(paths), image_size
    images = np.zeros((n, s, s, 3), np.uint8)
    labels = np.zeros((n, s, s), np.int64)
    pseudo = np.zeros((n, s, s), np.int32) if segments is not None else None
    valid = np.ones(n, bool)
    errors = [""] * n
    for i, path in enumerate(paths):
        label_path = str(batch["label_path"][i]) if with_labels else None
        try:
            image, label = _load_row(path, label_path, settings, image_size, train, crop_scale, hflip, seed,
                                     label_range)
            if pseudo is not None:
                from raysseg.core.segments import oversegment

                pseudo[i] = oversegment(image, **segments)
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
    return out



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
    prepared: PreparedSplit | None = None,
) -> tuple[list[dict], functools.partial]:
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
    the rows come from its cached shards instead of the image files, with the same crops.
    Ray Data maps the function over the rows (:mod:`raysseg.runtime.datasets`); the in-process runner
    calls it directly.
    """
    if image_size <= 0:
        raise DatasetError(f"image_size must be positive, got {image_size}")
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise DatasetError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
    if prepared is not None:
        from raysseg.io.prepared import cached_read_plan

        if with_labels:
            raise DatasetError(f"{split_uri}: labels are never cached; read a labelled split without `prepared`")
        return cached_read_plan(prepared, split_uri, image_size=image_size, train=train, crop_scale=crop_scale,
                                hflip=hflip, seed=seed, limit=limit, files=files, segments=segments)
    split = list_split(split_uri, with_labels)
    if with_labels:
        items = [{"path": p, "label_path": l} for p, l in zip(split.images, split.labels)]
    else:
        items = [{"path": p} for p in split.images]
    items = select_rows(items, limit, files)
    settings = storage.s3_settings() if storage.is_s3(split_uri) else None  # ship the driver's S3 settings
    fn = functools.partial(
        _decode_batch, settings=settings, image_size=image_size, train=train, with_labels=with_labels,
        crop_scale=tuple(crop_scale), hflip=hflip, seed=seed, segments=segments,
        label_range=(n_classes, ignore_index) if with_labels and n_classes is not None else None,
    )
    return items, fn
