"""Synthetic dataset, split listing, decoding/geometry, the Ray Data pipeline and photometric augmentation."""

from __future__ import annotations

import io
import math
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from raysseg.io import images as data
from raysseg.apps import synth
from raysseg.runtime import datasets
from raysseg.core import augment
from raysseg.core.batches import valid_rows
from raysseg.io.images import DatasetError


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- synthetic data + listing


def test_synth_layout(synth_data: Path):
    assert (synth_data / "classes.txt").read_text().split() == list(synth.SYNTH_CLASSES)
    readme = (synth_data / "README.txt").read_text()
    assert all(name in readme for name in synth.SYNTH_CLASSES)
    assert data.read_classes(str(synth_data)) == list(synth.SYNTH_CLASSES)
    seen = np.zeros(len(synth.SYNTH_CLASSES), int)
    for split, count in (("train", 8), ("val", 4)):
        files = data.list_split(str(synth_data / split), with_labels=True)
        assert len(files.images) == len(files.labels) == count
        for img_uri, lab_uri in zip(files.images, files.labels):
            assert Path(img_uri).name == Path(lab_uri).name
            image, label = Image.open(img_uri), np.asarray(Image.open(lab_uri))
            assert image.mode == "RGB" and image.size == (64, 48) and label.shape == (48, 64)
            seen += np.bincount(label.ravel(), minlength=len(seen))[: len(seen)]
            assert label.max() < len(synth.SYNTH_CLASSES)
    assert (seen > 0).all()  # every class occurs


def test_synth_is_seeded_and_classes_differ_in_colour(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth.synth_dataset(str(a), n_train=3, n_val=1, size=(32, 40), seed=5)
    synth.synth_dataset(str(b), n_train=3, n_val=1, size=(32, 40), seed=5)
    for f in sorted((a / "train" / "images").iterdir()):
        assert f.read_bytes() == (b / "train" / "images" / f.name).read_bytes()
    # Per-class mean colours are distinct (pixel features can separate the classes).
    image, label = synth._synth_image(np.random.default_rng(0), 96, 128)
    means = [image[label == c].mean(0) for c in np.unique(label)]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.abs(means[i] - means[j]).max() > 20


def test_list_split_errors(tmp_path, synth_data):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nothing'} has no images/"):
        data.list_split(str(tmp_path / "nothing"), with_labels=False)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no PNG, JPEG"):
        data.list_split(str(tmp_path / "empty"), with_labels=False)
    split = tmp_path / "nolabels"
    shutil.copytree(synth_data / "val" / "images", split / "images")
    assert len(data.list_split(str(split), with_labels=False).images) == 4
    with pytest.raises(DatasetError, match="no labels/ folder"):
        data.list_split(str(split), with_labels=True)
    (split / "labels").mkdir()
    shutil.copy(synth_data / "val" / "labels" / "val_0000.png", split / "labels")
    with pytest.raises(DatasetError, match=r"3 of 4 images .* \(first: val_0001.png, val_0002.png, val_0003.png\)"):
        data.list_split(str(split), with_labels=True)


# --------------------------------------------------------------------------- decoding + geometry (no Ray)


def test_decode_image_modes():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert (np.asarray(data.decode_image(_png(gray))) == gray[..., None]).all()
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    out = np.asarray(data.decode_image(_png(rgba)))
    assert out.shape == (3, 4, 3) and (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()
    rgb = np.random.default_rng(0).integers(0, 255, (3, 4, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(colors=256)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert np.asarray(data.decode_image(buf.getvalue())).shape == (3, 4, 3)
    deep = (np.array([[0, 100, 200, 255]], np.uint16) * 257)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")  # 16-bit grayscale PNG
    out = np.asarray(data.decode_image(buf.getvalue()))
    assert out.dtype == np.uint8 and out[0, :, 0].tolist() == [0, 100, 200, 255]
    with pytest.raises(ValueError, match="empty"):
        data.decode_image(b"")


def test_decode_label_rejects_rgb_and_keeps_values():
    lab = np.array([[0, 3, 11], [255, 1, 2]], np.uint8)
    assert (np.asarray(data.decode_label(_png(lab))) == lab).all()
    with pytest.raises(ValueError, match="single-channel"):
        data.decode_label(_png(np.zeros((2, 3, 3), np.uint8)))


def _blocks(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label of 4x4 big blocks, the image painting each class a distinct colour, and the palette."""
    palette = np.random.default_rng(3).integers(0, 255, (16, 3)).astype(np.uint8)
    label = (np.arange(h)[:, None] * 4 // h) * 4 + (np.arange(w)[None, :] * 4 // w)
    return palette[label], label.astype(np.uint8), palette


def test_eval_geometry_is_resize_short_side_then_centre_crop(tmp_path):
    image, label, palette = _blocks(60, 100)
    (tmp_path / "i.png").write_bytes(_png(image))
    (tmp_path / "l.png").write_bytes(_png(label))
    img, lab = data._load_row(str(tmp_path / "i.png"), str(tmp_path / "l.png"), None, 30, False, (0.5, 1.0), True, 0)
    assert img.shape == (30, 30, 3) and lab.shape == (30, 30) and lab.dtype == np.int64
    ref = np.asarray(Image.fromarray(label).resize((50, 30), Image.NEAREST))[:, 10:40]
    assert (lab == ref).mean() > 0.97
    ref_img = np.asarray(Image.fromarray(image).resize((50, 30), Image.BILINEAR))[:, 10:40].astype(int)
    assert np.abs(img.astype(int) - ref_img).mean() < 2


def test_train_crop_flip_shared_by_image_and_label_and_seeded(tmp_path):
    image, label, palette = _blocks(128, 192)
    (tmp_path / "i.png").write_bytes(_png(image))
    (tmp_path / "l.png").write_bytes(_png(label))
    outs = {}
    for seed in range(12):
        img, lab = data._load_row(str(tmp_path / "i.png"), str(tmp_path / "l.png"), None, 32, True, (0.3, 0.6), True, seed)
        # Same geometry: away from block edges the image shows exactly its label's colour.
        windows = np.lib.stride_tricks.sliding_window_view(lab, (3, 3))
        interior = np.zeros_like(lab, bool)
        interior[1:-1, 1:-1] = (windows == windows[..., :1, :1]).all(axis=(-1, -2))
        assert interior.mean() > 0.3
        assert np.abs(img[interior].astype(int) - palette[lab[interior]]).max() <= 3
        outs[seed] = lab
    again, _ = data._load_row(str(tmp_path / "i.png"), None, None, 32, True, (0.3, 0.6), True, 3)
    img3, _ = data._load_row(str(tmp_path / "i.png"), str(tmp_path / "l.png"), None, 32, True, (0.3, 0.6), True, 3)
    assert (again == img3).all()  # seeded, and independent of whether labels are read
    # Seeds give different crops. Checked on a gradient image (every pixel distinct): two
    # different crops of the block label can coincide after resizing to 32x32.
    yy, xx = np.mgrid[0:128, 0:192]
    gradient = np.stack([xx % 256, yy * 2, (xx + yy) % 256], -1).astype(np.uint8)
    (tmp_path / "g.png").write_bytes(_png(gradient))
    crops = [data._load_row(str(tmp_path / "g.png"), None, None, 32, True, (0.3, 0.6), True, s)[0] for s in range(12)]
    assert len({c.tobytes() for c in crops}) == len(crops)
    # Horizontal flips happen: left-to-right block order is reversed in some crops.
    flipped = [s for s, o in outs.items() if (o[:, 0] % 4 > o[:, -1] % 4).any()]
    assert 0 < len(flipped) < len(outs)


def test_valid_rows():
    batch = {
        "image": np.arange(3)[:, None], "path": np.array(["a", "b", "c"], object),
        "valid": np.array([True, False, True]), "error": np.array(["", "bad", ""], object),
    }
    kept, skipped = valid_rows(batch)
    assert kept["path"].tolist() == ["a", "c"] and kept["image"].ravel().tolist() == [0, 2]
    assert skipped == [("b", "bad")]


# --------------------------------------------------------------------------- Ray Data pipeline


def _collect(ds) -> dict:
    rows = ds.take_all()
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_ray_local_split_with_bad_files(ray_local, synth_data, tmp_path):
    split = tmp_path / "split"
    shutil.copytree(synth_data / "train", split)
    images, labels = split / "images", split / "labels"
    good = sorted(p.name for p in images.iterdir())
    (images / "zz_corrupt.png").write_bytes((images / good[0]).read_bytes()[:200])  # truncated PNG
    (labels / "zz_corrupt.png").write_bytes((labels / good[0]).read_bytes())
    (images / "zz_empty.png").write_bytes(b"")
    (labels / "zz_empty.png").write_bytes((labels / good[0]).read_bytes())
    (images / "zz_wrongsize.png").write_bytes((images / good[1]).read_bytes())
    (labels / "zz_wrongsize.png").write_bytes(_png(np.zeros((10, 10), np.uint8)))
    (images / "zz_gray16.png").write_bytes(_png(np.full((48, 64), 30000, np.uint16)))
    (labels / "zz_gray16.png").write_bytes((labels / good[2]).read_bytes())
    (images / "zz_rgba.png").write_bytes(_png(np.full((48, 64, 4), 90, np.uint8)))
    (labels / "zz_rgba.png").write_bytes((labels / good[3]).read_bytes())

    ds = datasets.make_dataset(str(split), image_size=32, train=False, with_labels=True)
    cols = _collect(ds)
    by_name = {Path(p).name: i for i, p in enumerate(cols["path"])}
    assert len(by_name) == len(good) + 5
    bad = {"zz_corrupt.png", "zz_empty.png", "zz_wrongsize.png"}
    assert {n for n, i in by_name.items() if not cols["valid"][i]} == bad
    assert "empty" in cols["error"][by_name["zz_empty.png"]]
    assert "label" in cols["error"][by_name["zz_wrongsize.png"]]
    for name in bad:
        assert not cols["image"][by_name[name]].any() and not cols["label"][by_name[name]].any()
    assert cols["image"][0].shape == (32, 32, 3) and cols["image"][0].dtype == np.uint8
    assert cols["label"][0].shape == (32, 32) and cols["label"][0].dtype == np.int64
    assert (cols["image"][by_name["zz_gray16.png"]] == round(30000 / 257)).all()
    assert (cols["image"][by_name["zz_rgba.png"]] == 90).all()

    batch = next(iter(ds.iter_batches(batch_size=100, batch_format="numpy")))
    kept, skipped = valid_rows(batch)
    assert len(kept["path"]) == len(good) + 2 and sorted(Path(p).name for p, _ in skipped) == sorted(bad)


def test_ray_training_never_opens_labels(ray_local, synth_data, tmp_path):
    split = tmp_path / "split"
    shutil.copytree(synth_data / "val" / "images", split / "images")
    (split / "labels").mkdir()
    for p in (split / "images").iterdir():
        (split / "labels" / p.name).write_bytes(b"garbage, not a PNG")
    cols = _collect(datasets.make_dataset(str(split), image_size=24, train=True, with_labels=False, limit=3))
    assert len(cols["path"]) == 3 and all(cols["valid"]) and "label" not in cols
    assert cols["image"][0].shape == (24, 24, 3)
    # The same garbage does get caught when labels are requested.
    cols = _collect(datasets.make_dataset(str(split), image_size=24, train=False, with_labels=True))
    assert not any(cols["valid"])


def test_ray_from_s3(ray_local, s3_server, synth_data, capsys):
    bucket = "ds-" + uuid.uuid4().hex[:8]
    s3_server.create_bucket(bucket)
    assert data.upload(str(synth_data), f"s3://{bucket}/synth") == 26
    assert f"[upload to s3://{bucket}/synth] 26 files in" in capsys.readouterr().out
    assert data.read_classes(f"s3://{bucket}/synth") == list(synth.SYNTH_CLASSES)
    cols = _collect(datasets.make_dataset(f"s3://{bucket}/synth/train", image_size=40, train=True, with_labels=True, seed=1))
    assert len(cols["path"]) == 8 and all(cols["valid"])
    assert all(p.startswith(f"s3://{bucket}/synth/train/images/") for p in cols["path"])
    assert np.stack(cols["image"]).shape == (8, 40, 40, 3) and np.stack(cols["label"]).shape == (8, 40, 40)
    assert np.stack(cols["label"]).max() < len(synth.SYNTH_CLASSES)


# --------------------------------------------------------------------------- photometric augmentation


def _images(b: int = 4, h: int = 20, w: int = 24) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_color_jitter_matches_torchvision_per_image():
    x = _images()
    br, co, sa, hu = (torch.tensor(v) for v in ([0.7, 1.3, 1.0, 0.9], [1.2, 0.8, 1.0, 1.1], [0.75, 1.25, 1.0, 0.0], [0.1, -0.1, 0.0, 0.05]))
    out = augment.color_jitter(x, br, co, sa, hu)
    for i in range(len(x)):
        ref = TF.adjust_brightness(x[i], float(br[i]))
        ref = TF.adjust_contrast(ref, float(co[i]))
        ref = TF.adjust_saturation(ref, float(sa[i]))
        ref = TF.adjust_hue(ref, float(hu[i]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)


def test_gaussian_blur_matches_torchvision():
    x = _images()
    out = augment.gaussian_blur(x, torch.full((4,), 1.5))
    k = 2 * math.ceil(3 * 1.5) + 1
    torch.testing.assert_close(out, TF.gaussian_blur(x, [k, k], [1.5, 1.5]), atol=1e-5, rtol=1e-5)
    tiny = augment.gaussian_blur(torch.rand(2, 3, 3, 3), torch.tensor([0.5, 2.0]))  # kernel larger than image
    assert tiny.shape == (2, 3, 3, 3) and torch.isfinite(tiny).all()
    with pytest.raises(ValueError, match="sigma > 0"):
        augment.gaussian_blur(x, torch.tensor([1.0, 0.0, 1.0, 1.0]))


def _no_jitter() -> dict:
    return dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


def test_photometric_grayscale_really_applied():
    x = _images()
    out = augment.photometric_augment(x, torch.Generator().manual_seed(1), **_no_jitter(), p_gray=1.0, p_blur=0.0)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    torch.testing.assert_close(out[:, :1], augment.rgb_to_gray(x), atol=1e-5, rtol=1e-5)
    same = augment.photometric_augment(x, torch.Generator().manual_seed(1), **_no_jitter(), p_gray=0.0, p_blur=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=1e-5)


def test_photometric_blur_really_applied():
    x = _images()
    out = augment.photometric_augment(x, torch.Generator().manual_seed(2), **_no_jitter(), p_gray=0.0, p_blur=1.0, blur_sigma=(0.8, 2.0))

    def roughness(t: torch.Tensor) -> torch.Tensor:
        return (t[..., 1:, :] - t[..., :-1, :]).abs().mean(dim=(1, 2, 3))

    assert (roughness(out) < 0.6 * roughness(x)).all()
    torch.testing.assert_close(out.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02, rtol=0)  # blur keeps the mean


def test_photometric_default_is_per_image_random_and_seeded():
    x = _images(b=1).expand(64, -1, -1, -1).contiguous()
    a = augment.photometric_augment(x, torch.Generator().manual_seed(3))
    b = augment.photometric_augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert len({tuple(v.tolist()) for v in a.mean(dim=(2, 3)).round(decimals=4)}) > 50  # images differ
    gray = (a[:, 0] == a[:, 1]).all(dim=(1, 2)) & (a[:, 1] == a[:, 2]).all(dim=(1, 2))
    assert 3 <= int(gray.sum()) <= 25  # p_gray = 0.2 of 64


def test_crop_resize_is_slicing_flipping_and_identity_on_exact_boxes():
    from raysseg.core.augment import crop_resize

    x = torch.randn(2, 3, 8, 8)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    assert torch.allclose(crop_resize(x, full, (8, 8)), x, atol=1e-5)
    flipped = crop_resize(x, full, (8, 8), torch.tensor([True, False]))
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-5) and torch.allclose(flipped[1], x[1], atol=1e-5)
    box = torch.tensor([[0.25, 0.5, 0.75, 1.0]] * 2)  # columns 2..5, rows 4..7
    assert torch.allclose(crop_resize(x, box, (4, 4)), x[:, :, 4:8, 2:6], atol=1e-5)


def test_crop_of_features_equals_features_of_crop_for_a_pooling_network():
    """PiCIE's equivariance: cropping the image or the feature map of the whole image selects
    the same region (exact for a stride-4 average pool and boxes on the 4-pixel grid)."""
    from raysseg.core.augment import crop_resize

    x = torch.rand(1, 3, 32, 32)
    net = torch.nn.AvgPool2d(4)
    box = torch.tensor([[0.25, 0.0, 0.75, 0.5]])
    flip = torch.tensor([True])
    a = net(crop_resize(x, box, (16, 16), flip))
    b = crop_resize(net(x), box, (4, 4), flip)
    assert torch.allclose(a, b, atol=1e-5)


def test_random_boxes_stay_inside_the_image_with_the_requested_area():
    from raysseg.core.augment import random_boxes

    boxes = random_boxes(2000, torch.Generator().manual_seed(0), scale=(0.3, 0.9))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert boxes.min() >= 0 and boxes.max() <= 1 + 1e-6
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert area.max() <= 0.9 + 1e-5 and area.min() >= 0.3 - 1e-5 - 0.05  # shrunk boxes may dip slightly
    assert 0.5 < area.mean() < 0.7


def test_photometric_jitter_probability():
    from raysseg.core.augment import photometric_augment

    x = torch.rand(64, 3, 8, 8)
    off = dict(p_gray=0.0, p_blur=0.0)
    assert torch.equal(photometric_augment(x, torch.Generator().manual_seed(0), p_jitter=0.0, **off), x)
    out = photometric_augment(x, torch.Generator().manual_seed(0), p_jitter=0.5, **off)
    changed = (out - x).abs().flatten(1).amax(1) > 1e-6
    assert 10 < int(changed.sum()) < 54  # about half the images jittered
