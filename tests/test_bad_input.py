"""Bad input, one check each: every failure is one line naming the file or field and what to do.

Covered elsewhere (not repeated here): wrong S3 secret / missing bucket at the storage level
(test_storage.py), config keys and bounds (test_config.py::test_bad_values_name_the_key),
backbone checkpoints with wrong keys or shapes (test_backbones.py), a NaN loss stopping a real
run with its last checkpoint kept (test_hp_train.py), bad files inside the Ray pipeline
(test_data.py::test_ray_local_split_with_bad_files).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysseg.io import images as data
from raysseg.runtime import datasets
from raysseg.io.images import BadFileError, DatasetError


def _encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt)
    return buf.getvalue()


def _png16(array: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB/RGBA): 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA."""
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _one_line(message: str, *words: str) -> str:
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


RNG = np.random.default_rng(0)
PICTURE = RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8)
PNG, JPEG = _encode(PICTURE), _encode(PICTURE, "JPEG")
LABEL = np.zeros((48, 64), np.uint8)
BROKEN = {  # name: (bytes, words the reason must hold)
    "truncated.png": (PNG[: len(PNG) // 2], ["truncated or corrupt PNG"]),
    "truncated.jpg": (JPEG[: len(JPEG) // 2], ["truncated or corrupt JPEG"]),
    "header_only.png": (PNG[:40], ["not a readable image"]),
    "random.png": (RNG.integers(0, 256, 3000, dtype=np.uint8).tobytes(), ["not a readable image", "3000 bytes"]),
    "zero.png": (b"", ["empty file (0 bytes)"]),
}


# --------------------------------------------------------------------------- truncated, corrupt, zero-byte


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_image_or_label_is_an_invalid_row_with_one_line(tmp_path, name):
    """Through the pipeline's map function (what Ray runs per batch): the row is invalid and its
    error names the broken file, whether it is the image or the label, and what to do."""
    raw, words = BROKEN[name]
    good_img, good_lab = tmp_path / "good.png", tmp_path / "good_label.png"
    good_img.write_bytes(PNG)
    good_lab.write_bytes(_encode(LABEL))
    broken = tmp_path / name
    broken.write_bytes(raw)
    for kind, image, label in (("image", broken, good_lab), ("label", good_img, broken)):
        batch = {"path": np.array([str(good_img), str(image)], object),
                 "label_path": np.array([str(good_lab), str(label)], object)}
        out = data._decode_batch(batch, settings=None, image_size=32, train=False, with_labels=True,
                                 crop_scale=(0.5, 1.0), hflip=False, seed=0, label_range=(5, 255))
        assert out["valid"].tolist() == [True, False]
        message = _one_line(out["error"][1], f"{kind} {broken}:", *words, "replace or remove the file")
        assert not message.startswith(("OSError", "ValueError", "UnidentifiedImageError"))
        assert not out["image"][1].any() and not out["label"][1].any()
        assert out["image"][0].any()


# --------------------------------------------------------------------------- grayscale, RGBA, 16-bit


def _gray16(v):
    return np.full((6, 8), v * 257, np.uint16)


MODES = {  # name: (encoded image, expected RGB value of every pixel)
    "L": (_encode(np.full((6, 8), 70, np.uint8)), (70, 70, 70)),
    "LA": (_encode(np.dstack([np.full((6, 8), 70, np.uint8), np.full((6, 8), 9, np.uint8)]), mode="LA"), (70, 70, 70)),
    "RGBA": (_encode(np.dstack([np.full((6, 8, 3), (10, 20, 30), np.uint8), np.full((6, 8), 0, np.uint8)])),
             (10, 20, 30)),
    "P": (_encode(np.full((6, 8), 2, np.uint8), mode="P"), None),
    "gray16": (_png16(_gray16(200), 0), (200, 200, 200)),
    "gray16_alpha": (_png16(np.dstack([_gray16(120), _gray16(255)]), 4), (120, 120, 120)),
    "rgb16": (_png16(np.dstack([_gray16(200), _gray16(100), _gray16(50)]), 2), (200, 100, 50)),
    "rgba16": (_png16(np.dstack([_gray16(200), _gray16(100), _gray16(50), _gray16(3)]), 6), (200, 100, 50)),
    "cmyk_jpeg": (_encode(np.full((6, 8, 4), 40, np.uint8), "JPEG", mode="CMYK"), None),
}


@pytest.mark.parametrize("name", sorted(MODES))
def test_grayscale_rgba_and_16bit_images_become_rgb_uint8(tmp_path, name):
    raw, rgb = MODES[name]
    path = tmp_path / f"{name}.img"
    path.write_bytes(raw)
    image, _ = data._load_row(str(path), None, None, 16, False, (0.5, 1.0), False, 0)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    if rgb is not None:
        assert (image == np.array(rgb, np.uint8)).all(), image[0, 0]


# --------------------------------------------------------------------------- labels: wrong size, out of range


def test_label_of_the_wrong_size_names_both_files(tmp_path):
    (tmp_path / "i.png").write_bytes(PNG)
    (tmp_path / "l.png").write_bytes(_encode(np.zeros((10, 12), np.uint8)))
    with pytest.raises(BadFileError) as err:
        data._load_row(str(tmp_path / "i.png"), str(tmp_path / "l.png"), None, 32, False, (0.5, 1.0), False, 0)
    _one_line(str(err.value), f"label {tmp_path / 'l.png'} is 12x10", f"image {tmp_path / 'i.png'} is 64x48",
              "must have their image's size")


def test_check_label_values():
    assert data.check_label_values(np.array([[0, 4, 255]]), 5, 255) is None
    message = _one_line(data.check_label_values(np.array([[0, 20, 7, 255, 20]]), 5, 255))
    assert message == "label values [7, 20] outside 0..4 (ignore 255): fix data.n_classes or the label file"
    many = data.check_label_values(np.arange(100).reshape(10, 10), 11, 255)
    assert many.startswith("label values [11, 12, 13, 14, 15, ... (89 values)] outside 0..10 (ignore 255)")
    assert "[-1]" in data.check_label_values(np.array([-1, 0]), 5, 255)


def _split_with_bad_labels(root: Path, synth_data: Path) -> Path:
    split = root / "split"
    shutil.copytree(synth_data / "val", split)  # 4 images of 48x64, labels 0..4
    label = np.zeros((48, 64), np.uint8)
    label[:5, :5], label[10:, 10:20], label[-1, -1] = 20, 255, 7
    (split / "images" / "zz_range.png").write_bytes(PNG)
    (split / "labels" / "zz_range.png").write_bytes(_encode(label))
    ignore = np.full((48, 64), 255, np.uint8)
    ignore[0, :10] = 4
    (split / "images" / "zz_ignore.png").write_bytes(PNG)
    (split / "labels" / "zz_ignore.png").write_bytes(_encode(ignore))
    return split


def test_out_of_range_labels_are_skipped_counted_and_reported_in_evaluation(ray_local, synth_data, tmp_path):
    """The evaluation path: make_dataset with the config's classes on Ray, then the evaluation actors'
    code (Scorer: scored images and skipped files; TrainSampler: the probe/retrieval pass)."""
    from raysseg.config import load_config
    from raysseg.runtime.evaluate import Scorer, TrainSampler
    from raysseg.methods.registry import build_segmenter

    split = _split_with_bad_labels(tmp_path, synth_data)
    bad_label = split / "labels" / "zz_range.png"
    expected = f"label {bad_label}: label values [7, 20] outside 0..4 (ignore 255): fix data.n_classes or the label file"

    ds = datasets.make_dataset(str(split), image_size=32, train=False, with_labels=True, n_classes=5, ignore_index=255)
    batch = next(iter(ds.iter_batches(batch_size=100, batch_format="numpy")))
    names = [Path(p).name for p in batch["path"]]
    assert len(names) == 6
    assert [n for n, ok in zip(names, batch["valid"]) if not ok] == ["zz_range.png"]
    assert batch["error"][names.index("zz_range.png")] == expected
    # Without n_classes (what training asks for: it never needs classes) the same file stays a valid row.
    plain = data._decode_batch({"path": batch["path"], "label_path": [str(split / "labels" / n) for n in names]},
                               settings=None, image_size=32, train=False, with_labels=True, crop_scale=(0.5, 1.0),
                               hflip=False, seed=0)
    assert plain["valid"].all()

    cfg = load_config("kmeans_synth", ["data.image_size=32", "model.backbone=resnet18_fpn"])  # quick to build
    torch.manual_seed(0)
    seg = build_segmenter(cfg, load_backbone_weights=False)
    ref = [ray_local.put({"config": cfg.to_dict(), "state": seg.state_dict()})]
    scored = Scorer(ref, None, False, [])(batch)
    assert scored["n_images"].tolist() == [5]
    assert json.loads(scored["skipped"][0]) == [[str(split / "images" / "zz_range.png"), expected]]
    labelled = int((batch["label"][names.index("zz_ignore.png")] != 255).sum())  # the rest is ignore_index
    assert scored["conf_clusters"][0].sum() == 4 * 32 * 32 + labelled  # the skipped file adds no pixel

    sampler = TrainSampler(ref, per_image=4, retrieval=True, seed=0)
    sampled = sampler(batch)
    marks = [m for m in sampled["skipped"] if m]
    assert len(marks) == 1 and json.loads(marks[0]) == [[str(split / "images" / "zz_range.png"), expected]]
    real = sampled["skipped"] == ""
    assert (sampled["label"][real] >= 0).all() and (sampled["label"][real] < 5).all()
    assert sampled["label"][~real].tolist() == [-1]
    only_bad = {k: v[[names.index("zz_range.png")]] for k, v in batch.items()}  # a batch with no valid row
    sampled = sampler(only_bad)
    assert sampled["label"].tolist() == [-1] and json.loads(sampled["skipped"][0])[0][1] == expected


def test_every_row_skipped_is_a_dataset_error_not_scores():
    from raysseg.runtime.evaluate import check_scored

    check_scored("data/val", 3, 1, [("a.png", "x")])  # some images scored: fine
    with pytest.raises(DatasetError) as err:
        check_scored("data/val", 2, 0, [("data/val/images/a.png", "label data/val/labels/a.png: label values [20] "
                                         "outside 0..10 (ignore 255): fix data.n_classes or the label file"),
                                        ("data/val/images/b.png", "image data/val/images/b.png: empty file")])
    _one_line(str(err.value), "data/val: none of its 2 images could be scored (2 skipped",
              "first: label data/val/labels/a.png: label values [20]", "fix or replace the files")


# --------------------------------------------------------------------------- empty dataset / prefix, missing bucket


def test_empty_local_folder_is_one_line(tmp_path):
    (tmp_path / "split" / "images").mkdir(parents=True)
    (tmp_path / "split" / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError) as err:
        data.list_split(str(tmp_path / "split"), with_labels=False)
    _one_line(str(err.value), f"{tmp_path / 'split' / 'images'} holds no PNG, JPEG, WebP, TIFF or BMP images",
              "notes.txt", "put the split's")
    with pytest.raises(DatasetError) as err:  # make_dataset fails the same way, before any Ray work
        datasets.make_dataset(str(tmp_path / "split"), image_size=32, train=True, with_labels=False)
    _one_line(str(err.value), "holds no PNG")
    with pytest.raises(DatasetError) as err:
        data.list_split(str(tmp_path / "nowhere"), with_labels=True)
    _one_line(str(err.value), f"{tmp_path / 'nowhere'} has no images/ folder")


def test_empty_s3_prefix_missing_bucket_and_wrong_secret_are_one_line(s3_server, monkeypatch):
    from raysseg.io import storage
    from raysseg.io.storage import StorageError

    bucket = "empty-" + uuid.uuid4().hex[:8]
    s3_server.create_bucket(bucket)
    with pytest.raises(DatasetError) as err:
        data.list_split(f"s3://{bucket}/nothing/train", with_labels=False)
    _one_line(str(err.value), f"s3://{bucket}/nothing/train has no images/ folder")
    storage.write_bytes_atomic(f"s3://{bucket}/ds/train/images/README.txt", b"no images here")
    with pytest.raises(DatasetError) as err:
        data.list_split(f"s3://{bucket}/ds/train", with_labels=False)
    _one_line(str(err.value), f"s3://{bucket}/ds/train/images holds no PNG, JPEG, WebP, TIFF or BMP images", "README.txt")
    missing = "nobucket-" + uuid.uuid4().hex[:8]
    with pytest.raises(StorageError) as err:
        data.list_split(f"s3://{missing}/train", with_labels=False)
    _one_line(str(err.value), f"S3 bucket '{missing}' does not exist at {s3_server.endpoint}", "create it or fix the URI")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    with pytest.raises(StorageError) as err:
        data.list_split(f"s3://{bucket}/ds/train", with_labels=False)
    _one_line(str(err.value), s3_server.endpoint, "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")


# --------------------------------------------------------------------------- config values, NaN / inf loss


@pytest.mark.parametrize("override, words", [
    ("train.lr=nan", ["train.lr", "finite"]),
    ("train.lr=inf", ["train.lr", "finite"]),
    ("data.n_classes=1", ["data.n_classes", "minimum 2"]),
    ("data.ignore_index=-1", ["data.ignore_index", "minimum 0"]),
    ("data.crop_scale_min=0", ["data.crop_scale_min", "minimum"]),
])
def test_config_values_out_of_range(override, words):
    from raysseg.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config("kmeans_synth", [override])
    _one_line(str(err.value), *words)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), float("-inf")])
def test_non_finite_loss_stops_before_the_weights_change(bad):
    from raysseg.core.distributed import NonFiniteLoss, optimizer_step

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = (model(torch.ones(4, 3)) ** 2).sum() * bad  # non-negative sum: the loss is exactly `bad`
    with pytest.raises(NonFiniteLoss) as err:
        optimizer_step(loss, optimizer, 7, "train.lr", 0.1, grad_clip=1.0)
    _one_line(str(err.value), f"the loss became {bad} at step 7", "checkpoints written so far are kept",
              "lower train.lr (now 0.1)")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    optimizer_step(model(torch.ones(4, 3)).sum(), optimizer, 8, "train.lr", 0.1)  # a finite loss does step
    assert not torch.equal(before["weight"], model.weight)
