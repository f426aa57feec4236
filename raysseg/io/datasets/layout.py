"""What `raysseg data prepare` does to one file, whatever the dataset: the task, its outputs, resumption
markers and the dataset card. The dataset-specific parts (finding the source files and mapping the
labels) are the modules beside this one; the parallel job is :mod:`raysseg.runtime.prepare`.

Output layout under DST (the project's split layout, README "Data"):
  <split>/images/<key>.<ext>   the image (the source bytes when they are already JPEG/PNG, else PNG)
  <split>/labels/<key>.png     uint8 class indices 0..n-1, ``IGNORE`` elsewhere
  .prepare/<split>/<task>.json written last for each source task: its outputs and pixel counts per split (resume)
  dataset_card.json, classes.txt  written at the end of every run

A dataset's protocols (``--protocol``) are the image lists and splits a paper used; the first one is the default.
``--five-crop RATIO`` (STEGO's and HP's training sets) replaces each image of the training splits by its five crops.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from raysseg.io import storage
from raysseg.io.images import DatasetError, decode_image, decode_label

IGNORE = 255
MARKERS = ".prepare"
CARD = "dataset_card.json"


@dataclass(frozen=True)
class PrepareOptions:
    """Per-dataset choices (the CLI's options); each dataset reads only its own."""

    image_lists: dict[str, str] = field(default_factory=dict)  # cocostuff27: split -> image-list file URI
    tile: int = 200  # potsdam3: side of the square crops written (iic: cut from windows of twice that side)
    val_tiles: tuple[str, ...] = ()  # potsdam3 --protocol tiles: tile ids ("2_13") for val; () = the default
    protocol: str = ""  # the dataset's protocols (Dataset.protocols); "" = its first
    five_crop: float = 0.0  # > 0: every split but val written as five crops of this ratio per side (five_crops)


@dataclass(frozen=True)
class Task:
    """One unit of work: source files (role -> URI) that give the outputs ``key``/``key_<r>_<c>`` of a split
    (an output may name another split: potsdam3 --protocol iic sends the crops listed in ``val_crops`` to val)."""

    split: str
    key: str
    files: dict[str, str]
    val_crops: tuple[int, ...] = ()

    def marker(self, dst: str) -> str:
        return storage.join(dst, MARKERS, self.split, f"{self.key}.json")


@dataclass
class Output:
    """An image (encoded bytes and its suffix) and its mapped label (uint8 [H, W]); ``split``: "" = the task's."""

    key: str
    image: bytes
    suffix: str
    label: np.ndarray
    split: str = ""


@dataclass(frozen=True)
class Dataset:
    """A raw distribution and its mapping. ``find(src, options)`` lists the tasks (raising one
    DatasetError line naming the layout it expected); ``convert(task, options, read)`` returns the
    outputs of one task (``read(uri) -> bytes``), raising ValueError for a bad file."""

    name: str
    classes: tuple[str, ...]
    expected: str  # the source layout, for error messages
    mapping: str  # what is mapped to what, in words (goes into the card)
    reference: str  # where the mapping comes from
    find: Callable[[str, PrepareOptions], list[Task]]
    convert: Callable[[Task, PrepareOptions, Callable[[str], bytes]], list[Output]]
    lut: Callable[[], dict] = lambda: {}  # the mapping as a table, for the card
    protocols: dict[str, str] = field(default_factory=dict)  # --protocol name -> what it does; first = default


def chosen_protocol(name: str, protocols: dict[str, str], options: PrepareOptions) -> str:
    """The protocol ``options`` asks for ("" = the first); an unknown one is one DatasetError line."""
    chosen = options.protocol or next(iter(protocols))
    if chosen not in protocols:
        raise DatasetError(f"{name}: --protocol {chosen} is not one of {', '.join(protocols)}")
    return chosen


def layout_error(dataset: "Dataset | str", src: str, missing: str, expected: str) -> DatasetError:
    name = dataset if isinstance(dataset, str) else dataset.name
    return DatasetError(f"{name}: {src} is not the expected source layout ({missing}); expected {expected}")


def list_or_empty(uri: str, suffixes: tuple[str, ...] | None, recursive: bool = False) -> list[str]:
    """Files under ``uri`` (none when the folder does not exist)."""
    if not storage.exists(uri):
        return []
    return storage.list_files(uri, suffixes, recursive=recursive)


def stem(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    return name.rsplit(".", 1)[0]


# --------------------------------------------------------------------------- decoding and encoding


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of image bytes, fully decoded (a truncated file raises ValueError)."""
    return decode_image(data).size


def label_array(data: bytes) -> np.ndarray:
    """Single-channel label values as they are stored (palette PNGs: their indices)."""
    return np.asarray(decode_label(data))


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


EXIF_ORIENTATION = 0x0112


def labelled_output(task: Task, image: bytes, suffix: str, label: np.ndarray, split: str = "") -> Output:
    """An image and its label map, checked to be the same size. Labels are drawn on the image's pixels as stored:
    an image whose EXIF orientation would turn it (readers turn images upright) is written as its stored pixels
    in a PNG without the tag, so it is read the way its label was drawn (the authors' loaders do not turn images;
    COCO holds a few such photos). Other images keep their bytes."""
    upright = image_size(image)  # fully decoded: a truncated or corrupt file raises ValueError here
    with Image.open(io.BytesIO(image)) as opened:
        try:
            turned = int(opened.getexif().get(EXIF_ORIENTATION, 1)) not in (0, 1)
        except Exception:  # noqa: BLE001 - a damaged EXIF block: readers keep the pixels as stored too
            turned = False
        stored = np.asarray(opened.convert("RGB")) if turned else None
    if stored is None:
        check_same_size(task, upright, label)
        return Output(task.key, image, suffix, label, split)
    check_same_size(task, (stored.shape[1], stored.shape[0]), label)
    return Output(task.key, encode_png(stored), ".png", label, split)


def check_same_size(task: Task, image_wh: tuple[int, int], label: np.ndarray) -> None:
    if (label.shape[1], label.shape[0]) != tuple(image_wh):
        raise ValueError(f"label {task.files['label']} is {label.shape[1]}x{label.shape[0]} but its image is "
                         f"{image_wh[0]}x{image_wh[1]}; re-extract the pair from the distribution")


# --------------------------------------------------------------------------- five crops


FIVE_CROP_SPLITS_SKIPPED = ("val",)
FIVE_CROP_QUALITY = 75  # Pillow's default JPEG quality, what the released crop_datasets.py writes with


def five_crop_boxes(width: int, height: int, ratio: float) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the four corner crops and the centre crop, in that order, each
    ``int(side * ratio)`` on a side: torchvision's ``five_crop`` with the size STEGO's and HP's
    ``crop_datasets.py`` ask of it (centre offsets rounded as torchvision's ``center_crop`` does)."""
    cw, ch = int(width * ratio), int(height * ratio)
    if cw < 1 or ch < 1:
        raise ValueError(f"a {width}x{height} image has no {ratio} crop; leave it out or lower --five-crop")
    left, top = int(round((width - cw) / 2.0)), int(round((height - ch) / 2.0))
    return [(0, 0, cw, ch), (width - cw, 0, width, ch), (0, height - ch, cw, height),
            (width - cw, height - ch, width, height), (left, top, left + cw, top + ch)]


def five_crops(out: Output, ratio: float) -> list[Output]:
    """``out`` as five outputs ``<key>_crop<i>`` (corners, then centre): image and label cut alike from the
    stored pixel grid (the grid the label was drawn on; no EXIF turn), the image re-encoded as JPEG as the
    released code does (its crops are JPEG files of Pillow's default quality)."""
    try:
        with Image.open(io.BytesIO(out.image)) as opened:
            image = opened.convert("RGB")
    except OSError as exc:
        raise ValueError(f"image {out.key}: cannot be decoded for --five-crop ({exc})") from None
    crops = []
    for i, box in enumerate(five_crop_boxes(*image.size, ratio)):
        buf = io.BytesIO()
        image.crop(box).save(buf, format="JPEG", quality=FIVE_CROP_QUALITY)
        left, top, right, bottom = box
        crops.append(Output(f"{out.key}_crop{i}", buf.getvalue(), ".jpg", out.label[top:bottom, left:right],
                            out.split))
    return crops


# --------------------------------------------------------------------------- one task


def run_task(dataset: Dataset, task: Task, options: PrepareOptions, dst: str) -> dict:
    """Convert one task and write its outputs, then its marker (atomic writes; the marker last, so a
    task killed midway is redone). Returns the marker's content, or {"error": one line} for a bad file."""
    try:
        outputs = dataset.convert(task, options, read_source)
        if options.five_crop:
            outputs = [crop for out in outputs for crop in ([out] if (out.split or task.split) in FIVE_CROP_SPLITS_SKIPPED
                                                            else five_crops(out, options.five_crop))]
    except ValueError as exc:
        return {"split": task.split, "key": task.key, "error": " ".join(str(exc).split())}
    splits: dict[str, dict] = {}  # split -> outputs and pixel counts (the last count: ignored pixels)
    for out in outputs:
        name = out.split or task.split
        split = storage.join(dst, name)
        storage.write_bytes_atomic(storage.join(split, "images", *f"{out.key}{out.suffix}".split("/")), out.image)
        storage.write_bytes_atomic(storage.join(split, "labels", *f"{out.key}.png".split("/")),
                                   encode_png(out.label.astype(np.uint8)))
        s = splits.setdefault(name, {"outputs": [], "counts": np.zeros(len(dataset.classes) + 1, np.int64)})
        s["outputs"].append(out.key)
        s["counts"] += pixel_counts(out.label, len(dataset.classes))
    done = {"split": task.split, "key": task.key,
            "splits": {name: {"outputs": s["outputs"], "counts": s["counts"].tolist()} for name, s in splits.items()}}
    storage.write_bytes_atomic(task.marker(dst), json.dumps(done).encode())
    return done


def read_source(uri: str) -> bytes:
    """The bytes of a source file; a missing one raises ValueError (skipped and listed), an unreachable
    store still raises StorageError (the job stops)."""
    try:
        return storage.read_bytes(uri)
    except storage.StorageError:
        if not storage.exists(uri):
            raise ValueError(f"{uri} does not exist: its pair (or an image list) names it; restore it from the "
                             "distribution or leave the file out") from None
        raise


def pixel_counts(label: np.ndarray, n_classes: int) -> np.ndarray:
    """[n_classes + 1] pixels per class, the last entry counting ``IGNORE`` pixels."""
    flat = label.reshape(-1).astype(np.int64)
    counts = np.bincount(np.where(flat == IGNORE, n_classes, flat), minlength=n_classes + 1)
    if len(counts) > n_classes + 1:
        raise ValueError(f"label values above {n_classes - 1} other than {IGNORE}: a mapping bug")
    return counts


def remove_partial_writes(dst: str) -> int:
    """Delete the temporary files of atomic writes cut short by a kill (local DST only: S3 objects
    appear whole or not at all). Returns how many."""
    if storage.is_s3(dst) or not os.path.isdir(dst):
        return 0
    removed = 0
    for folder, _, names in os.walk(dst):
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed


def is_done(task: Task, dst: str) -> dict | None:
    """The marker of a finished task, or None."""
    uri = task.marker(dst)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except ValueError:  # a marker is written atomically; an unreadable one means redo the task
        return None


# --------------------------------------------------------------------------- the card


def card(dataset: Dataset, src: str, options: PrepareOptions, results: list[dict]) -> dict:
    """The dataset card: classes, the protocol, the mapping, images and pixels per class per split, skipped files."""
    splits: dict[str, dict] = {}
    for r in results:
        if "error" in r:
            continue
        # markers of earlier versions hold one split's "outputs" and "counts"
        for name, part in r.get("splits", {r["split"]: r}).items():
            s = splits.setdefault(name, {"images": 0, "counts": np.zeros(len(dataset.classes) + 1, np.int64)})
            s["images"] += len(part["outputs"])
            s["counts"] += np.asarray(part["counts"], np.int64)
    protocol = chosen_protocol(dataset.name, dataset.protocols, options)
    return {
        "dataset": dataset.name,
        "source": src,
        "protocol": {"name": protocol, "description": dataset.protocols[protocol]},
        "classes": list(dataset.classes),
        "ignore_index": IGNORE,
        "mapping": dataset.mapping,
        "mapping_table": dataset.lut(),
        "reference": dataset.reference,
        "options": {k: v for k, v in asdict(options).items()},
        "splits": {name: {"images": s["images"],
                          "pixels_per_class": dict(zip(dataset.classes, s["counts"][:-1].tolist())),
                          "ignored_pixels": int(s["counts"][-1])}
                   for name, s in sorted(splits.items())},
        "image_count": sum(s["images"] for s in splits.values()),
        "skipped": [{"split": r["split"], "task": r["key"], "reason": r["error"]} for r in results if "error" in r],
    }


def check_same_options(dataset: Dataset, dst: str, options: PrepareOptions) -> None:
    """A DST that holds a card of other options (another protocol, another --five-crop, ...) is one
    DatasetError line: resuming into it would mix two datasets."""
    uri = storage.join(dst, CARD)
    if not storage.exists(uri):
        return
    earlier = json.loads(storage.read_bytes(uri))
    before = {**json.loads(json.dumps(asdict(PrepareOptions()))), **earlier.get("options", {})}
    now = json.loads(json.dumps(asdict(options)))
    before["protocol"] = earlier.get("protocol", {}).get("name", before["protocol"])
    now["protocol"] = chosen_protocol(dataset.name, dataset.protocols, options)
    changed = [f"{key} {before[key]!r} -> {now[key]!r}" for key in now if before.get(key) != now[key]]
    if earlier.get("dataset") != dataset.name:
        changed.insert(0, f"dataset {earlier.get('dataset')!r} -> {dataset.name!r}")
    if changed:
        raise DatasetError(f"{dst} holds a dataset prepared with other options ({'; '.join(changed)}): write into "
                           "another DST, or rerun with the options of its dataset_card.json")


def write_card(dst: str, content: dict) -> None:
    storage.write_bytes_atomic(storage.join(dst, CARD), json.dumps(content, indent=1).encode())
    storage.write_bytes_atomic(storage.join(dst, "classes.txt"), ("\n".join(content["classes"]) + "\n").encode())
