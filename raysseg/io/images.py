"""Datasets: layout, a synthetic dataset, the Ray Data input pipeline and photometric augmentation.

A split is a local folder or s3:// prefix holding ``images/`` (PNG/JPEG) and, optionally,
``labels/`` (single-channel PNG, one class index per pixel, same stem as its image).
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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from raysseg.io import storage

if TYPE_CHECKING:
    import ray.data

SYNTH_CLASSES = ("sky", "ground", "grass", "red_object", "blue_shape")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the URI and what to do."""


class BadFileError(DatasetError):
    """One image or label file cannot be used; its pipeline row is marked invalid with this one line."""


# --------------------------------------------------------------------------- synthetic data


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell_h: float, cell_w: float) -> np.ndarray:
    """Smooth random field in [-1, 1] of shape (h, w): coarse uniform noise upsampled bicubically."""
    gh, gw = max(2, int(h / cell_h) + 2), max(2, int(w / cell_w) + 2)
    coarse = rng.uniform(0, 255, (gh, gw)).astype(np.float32)
    up = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
    return np.clip(up / 127.5 - 1.0, -1.0, 1.0)


def _synth_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene: (image uint8 (h,w,3), label uint8 (h,w)) with classes SYNTH_CLASSES."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = h * rng.uniform(0.3, 0.5) + h * 0.05 * np.sin(xx / w * 2 * np.pi * rng.uniform(0.5, 2) + rng.uniform(0, 6.3))
    label = np.where(yy < horizon, 0, 1).astype(np.uint8)
    grass = _smooth_noise(rng, h, w, h / 3, w / 3) > rng.uniform(-0.3, 0.3)
    label[(label == 1) & grass] = 2

    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.15, 0.9) * h, rng.uniform(0.1, 0.9) * w
        ry, rx = rng.uniform(0.08, 0.2) * h, rng.uniform(0.06, 0.18) * w
        if rng.random() < 0.5:
            label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = 3
        else:
            label[(np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)] = 4

    img = np.zeros((h, w, 3), np.float32)
    t = np.clip(yy / np.maximum(horizon, 1.0), 0, 1)[..., None]
    sky_top = np.array([70, 120, 210]) + rng.normal(0, 12, 3)
    sky_low = np.array([190, 210, 235]) + rng.normal(0, 10, 3)
    sky = sky_top * (1 - t) + sky_low * t + rng.normal(0, 5, (h, w, 3))
    ground_tex = _smooth_noise(rng, h, w, 4, 6)[..., None]
    ground = (np.array([125, 95, 65]) + rng.normal(0, 10, 3)) * (1 + 0.25 * ground_tex) + rng.normal(0, 14, (h, w, 3))
    grass_tex = _smooth_noise(rng, h, w, 6, 1.5)[..., None]  # vertical blades
    grass_col = np.array([70, 135, 55]) + rng.normal(0, 10, 3)
    grass_px = grass_col * (1 + 0.3 * grass_tex) + rng.normal(0, 16, (h, w, 3))
    shade = (1 + 0.2 * _smooth_noise(rng, h, w, h / 2, w / 2))[..., None]
    red = (np.array([185, 55, 45]) + rng.normal(0, 15, 3)) * shade + rng.normal(0, 20, (h, w, 3))
    blue = (np.array([45, 65, 165]) + rng.normal(0, 15, 3)) * shade + rng.normal(0, 20, (h, w, 3))
    for cls, px in enumerate((sky, ground, grass_px, red, blue)):
        img[label == cls] = px[label == cls]
    img *= rng.uniform(0.8, 1.2)  # global exposure
    return np.clip(img, 0, 255).astype(np.uint8), label


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def synth_dataset(out_dir: str, n_train: int = 48, n_val: int = 16, size: tuple[int, int] = (96, 128), seed: int = 0) -> dict:
    """Write a small synthetic segmentation dataset (``train/`` and ``val/`` splits with images and
    labels, ``classes.txt`` and ``README.txt``) to a local folder or s3:// prefix.

    Five classes (SYNTH_CLASSES): a sky gradient, textured ground, textured grass, red-ish ellipses
    and blue-ish rectangles, with per-image colour shifts and pixel noise.
    Returns {"root", "classes", "train", "val"} (the last two: image counts).
    """
    h, w = size
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            image, label = _synth_image(rng, h, w)
            name = f"{split}_{i:04d}.png"
            storage.write_bytes_atomic(storage.join(out_dir, split, "images", name), _png_bytes(image))
            storage.write_bytes_atomic(storage.join(out_dir, split, "labels", name), _png_bytes(label))
    storage.write_bytes_atomic(storage.join(out_dir, "classes.txt"), ("\n".join(SYNTH_CLASSES) + "\n").encode())
    readme = (
        "raysseg synthetic segmentation dataset\n"
        f"image size {h}x{w} (HxW), seed {seed}, {n_train} train / {n_val} val images\n"
        "labels/*.png hold one class index per pixel:\n"
        + "".join(f"  {i}: {name}\n" for i, name in enumerate(SYNTH_CLASSES))
    )
    storage.write_bytes_atomic(storage.join(out_dir, "README.txt"), readme.encode())
    return {"root": out_dir, "classes": list(SYNTH_CLASSES), "train": n_train, "val": n_val}


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
    """Image URIs of a split and, when requested, the label URIs paired with them by stem."""

    images: list[str]
    labels: list[str] | None


def _stem(uri: str) -> str:
    return os.path.splitext(uri.rstrip("/").rsplit("/", 1)[-1])[0]


def list_split(uri: str, with_labels: bool) -> SplitFiles:
    """List ``images/`` (and, if ``with_labels``, ``labels/``) of a split; every image needs a label."""
    images_uri = storage.join(uri, "images")
    if not storage.exists(images_uri):
        storage.require_bucket(uri)  # name a missing bucket, not a missing folder
        raise DatasetError(f"{uri} has no images/ folder: a split needs images/*.png|jpg (and labels/*.png for evaluation)")
    images = storage.list_files(images_uri)
    if not images:
        raise DatasetError(f"{images_uri} holds no .png/.jpg/.jpeg images: put the split's images there")
    if not with_labels:
        return SplitFiles(images, None)
    labels_uri = storage.join(uri, "labels")
    if not storage.exists(labels_uri):
        raise DatasetError(f"{uri} has no labels/ folder but labels were requested: add labels/*.png or use a split with labels")
    by_stem = {_stem(p): p for p in storage.list_files(labels_uri, suffixes=(".png",))}
    missing = [p for p in images if _stem(p) not in by_stem]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(images)} images in {images_uri} have no label PNG with the same stem in {labels_uri} "
            f"(first: {_stem(missing[0])}): add the labels or remove those images"
        )
    return SplitFiles(images, [by_stem[_stem(p)] for p in images])


# --------------------------------------------------------------------------- decoding + geometry


def _open_image(data: bytes) -> Image.Image:
    """PIL image of ``data``, fully loaded; unreadable bytes raise ValueError with a short reason."""
    from PIL import UnidentifiedImageError

    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(f"not a readable image: {len(data)} bytes of no known format, or a corrupt header") from None
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's truncated/broken-file errors
        im.close()
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"truncated or corrupt {im.format or 'image'} file ({reason})") from None
    return im


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an 8-bit RGB PIL image (grayscale, RGBA, palette and 16-bit inputs).

    Empty, truncated or corrupt bytes raise ValueError with a short reason."""
    with _open_image(data) as im:
        if im.mode.startswith("I;16") or im.mode == "I":
            gray = (np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).round().astype(np.uint8)
            return Image.fromarray(gray).convert("RGB")
        if im.mode == "F":
            return Image.fromarray(np.asarray(im).clip(0, 255).astype(np.uint8)).convert("RGB")
        return im.convert("RGB")


def decode_label(data: bytes) -> Image.Image:
    """Decode a label PNG (single channel of class indices: L, P, I or I;16) without changing values."""
    with _open_image(data) as im:
        if im.mode in ("L", "P"):
            return im.copy()
        if im.mode.startswith("I"):
            return Image.fromarray(np.asarray(im).astype(np.int32))
        raise ValueError(f"label has mode {im.mode}: labels must be single-channel PNGs of class indices")


def _row_rng(seed: int | None, path: str) -> np.random.Generator:
    if seed is None:  # fresh crops every time the row is read (every epoch)
        return np.random.default_rng()
    digest = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, digest])


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
            )
        if label_range is not None:
            reason = check_label_values(np.asarray(label), *label_range)
            if reason:
                raise BadFileError(f"label {label_path}: {reason}")
    rng = _row_rng(seed, path)
    box = random_resized_crop_box(rng, *image.size, crop_scale) if train else center_square_box(*image.size)
    flip = train and hflip and rng.random() < 0.5
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
            text = str(exc) if isinstance(exc, BadFileError) else f"{type(exc).__name__}: {exc}"
            errors[i] = " ".join(text.split())
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


def make_dataset(
    split_uri: str, *, image_size: int, train: bool, with_labels: bool, crop_scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = True, seed: int | None = 0, limit: int | None = None, files: list[str] | None = None,
    shuffle: bool = False, segments: dict | None = None, n_classes: int | None = None, ignore_index: int = 255,
) -> "ray.data.Dataset":
    """A Ray Dataset of decoded, cropped rows from a split folder/prefix.

    train=True: random resized crop (area fraction in ``crop_scale``) to image_size x image_size and
    a random horizontal flip, seeded per image from (seed, path); pass a different seed per epoch
    for fresh crops. train=False: resize the short side to image_size, then centre crop.
    Labels (only opened when ``with_labels``) follow the same geometry with NEAREST.
    ``limit`` keeps the first ``limit`` images in sorted order; ``files`` keeps only those image URIs.
    ``seed=None`` draws fresh crops each time a row is read, i.e. every epoch.
    ``shuffle`` visits the images in a fresh random order every epoch (the file list is shuffled, not pixels).
    ``segments`` (keyword arguments of :func:`raysseg.core.segments.oversegment`) adds a ``segments`` column:
    the pseudo segments of each decoded image (int32 S x S), computed on the fly in the read.
    ``n_classes`` (with labels): a label file holding a value outside [0, n_classes) other than
    ``ignore_index`` makes its row invalid, with the bad values in the error.
    """
    import ray.data

    if image_size <= 0:
        raise DatasetError(f"image_size must be positive, got {image_size}")
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise DatasetError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
    split = list_split(split_uri, with_labels)
    n = len(split.images) if limit is None else min(limit, len(split.images))
    if with_labels:
        items = [{"path": p, "label_path": l} for p, l in zip(split.images[:n], split.labels[:n])]
    else:
        items = [{"path": p} for p in split.images[:n]]
    if files is not None:
        wanted = set(files)
        items = [item for item in items if item["path"] in wanted]
    settings = storage.s3_settings() if storage.is_s3(split_uri) else None  # ship the driver's S3 settings
    fn = functools.partial(
        _decode_batch, settings=settings, image_size=image_size, train=train, with_labels=with_labels,
        crop_scale=tuple(crop_scale), hflip=hflip, seed=seed, segments=segments,
        label_range=(n_classes, ignore_index) if with_labels and n_classes is not None else None,
    )
    ds = ray.data.from_items(items)
    if shuffle:
        ds = ds.random_shuffle()
    return ds.map_batches(fn, batch_size=16, batch_format="numpy")


def valid_rows(batch: dict) -> tuple[dict, list[tuple[str, str]]]:
    """Drop the rows with valid=False from a numpy batch; return (kept batch, [(path, error), ...])."""
    valid = np.asarray(batch["valid"], bool)
    skipped = [(str(p), str(e)) for p, e, ok in zip(batch["path"], batch["error"], valid) if not ok]
    if not skipped:
        return batch, []
    return {k: np.asarray(v)[valid] for k, v in batch.items()}, skipped


# --------------------------------------------------------------------------- photometric augmentation (torch)


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """Luma of (B,3,H,W) RGB in [0,1] -> (B,1,H,W)."""
    w = images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def _rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB in [0,1] -> HSV with hue in [0,1)."""
    r, g, b = images.unbind(1)
    maxc, _ = images.max(1)
    minc, _ = images.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([hue, sat, maxc], 1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of _rgb_to_hsv."""
    h, s, v = hsv.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)  # (B,3,H,W) for R, G, B
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * (torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(
    images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor, hue: torch.Tensor
) -> torch.Tensor:
    """Per-image colour jitter of (B,3,H,W) in [0,1] with factors of shape (B,), applied in the order
    brightness, contrast, saturation (multiplicative, 1 = unchanged), hue (shift in turns, 0 = unchanged);
    clamped to [0,1] after each step, as torchvision's functional ops."""
    view = (-1, 1, 1, 1)
    x = (images * brightness.view(view)).clamp(0, 1)
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (contrast.view(view) * x + (1 - contrast.view(view)) * mean).clamp(0, 1)
    x = (saturation.view(view) * x + (1 - saturation.view(view)) * rgb_to_gray(x)).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    hsv = torch.stack([(hsv[:, 0] + hue.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return _hsv_to_rgb(hsv).clamp(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of (B,C,H,W) with its own Gaussian sigma (B,) > 0, separably.

    Kernel size is the odd 2*ceil(3*max(sigma))+1 shared by the batch (each kernel normalised);
    borders are reflected (replicated when the image is smaller than the kernel radius).
    """
    if (sigma <= 0).any():
        raise ValueError("gaussian_blur needs sigma > 0 for every image")
    b, c, h, w = images.shape
    radius = int(math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.to(images).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    mode = "reflect" if radius < min(h, w) else "replicate"
    x = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(x, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)


def photometric_augment(
    images: torch.Tensor, generator: torch.Generator, *, brightness: float = 0.3, contrast: float = 0.3,
    saturation: float = 0.3, hue: float = 0.1, p_gray: float = 0.2, p_blur: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0), p_jitter: float = 1.0,
) -> torch.Tensor:
    """Random per-image photometric augmentation of (B,3,H,W) RGB in [0,1] -> same shape.

    ColorJitter(brightness, contrast, saturation, hue) with probability p_jitter and factors
    drawn uniformly from [1-x, 1+x] (hue: [-hue, hue]), then grayscale with probability p_gray,
    then Gaussian blur with probability p_blur and sigma uniform in blur_sigma. All randomness
    comes from ``generator``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"photometric_augment expects (B,3,H,W) images, got shape {tuple(images.shape)}")
    if not 0 < blur_sigma[0] <= blur_sigma[1]:
        raise ValueError(f"blur_sigma must be a positive (low, high) range, got {blur_sigma}")
    b = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        u = torch.rand(b, generator=generator, device=generator.device).to(images.device, images.dtype)
        return low + (high - low) * u

    x = color_jitter(
        images, uniform(1 - brightness, 1 + brightness), uniform(1 - contrast, 1 + contrast),
        uniform(1 - saturation, 1 + saturation), uniform(-hue, hue),
    )
    if p_jitter < 1:  # drawn only then, so the default keeps its random stream
        x = torch.where((uniform(0, 1) < p_jitter).view(-1, 1, 1, 1), x, images)
    gray = uniform(0, 1) < p_gray
    x = torch.where(gray.view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)
    blur = uniform(0, 1) < p_blur
    sigma = uniform(*blur_sigma)
    if blur.any():
        x = torch.where(blur.view(-1, 1, 1, 1), gaussian_blur(x, sigma), x)
    return x


def random_boxes(
    n: int, generator: torch.Generator, scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """n random crop boxes (n, 4) as (x0, y0, x1, y1) fractions of the image, inside [0, 1].

    Area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio`` (the
    RandomResizedCrop recipe); a box that would not fit is shrunk to fit."""
    u = torch.rand(n, 4, generator=generator, device=generator.device).cpu()
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = (area * torch.exp(log_r)).sqrt().clamp(max=1.0)
    h = (area / torch.exp(log_r)).sqrt().clamp(max=1.0)
    x0, y0 = (1 - w) * u[:, 2], (1 - h) * u[:, 3]
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], flips: torch.Tensor | None = None,
                mode: str = "bilinear") -> torch.Tensor:
    """Crop each map of x (B, C, H, W) to its box (B, 4) of image fractions, resize to ``size``
    and mirror it where ``flips`` (B,) is true -> (B, C, size[0], size[1]).

    Works the same on images and on feature maps: a box is a fraction of the map, so
    cropping an image and cropping the features of the whole image select the same region
    (PiCIE's equivariance). Sampling is bilinear at output-cell centres (align_corners=False).
    """
    b = x.shape[0]
    boxes = boxes.to(x.device, x.dtype)
    x0, y0, x1, y1 = boxes.unbind(1)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    sx = x1 - x0
    if flips is not None:
        sx = torch.where(flips.to(x.device), -sx, sx)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = x0 + x1 - 1
    theta[:, 1, 1] = y1 - y0
    theta[:, 1, 2] = y0 + y1 - 1
    grid = F.affine_grid(theta, [b, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
