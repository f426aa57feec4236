"""What a split holds, found before anything starts: image formats and sub-folders, files left out,
image/label pairing, label values, and config files that are not valid YAML (issue 18, items 5-7)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysseg.apps import cli
from raysseg.config import load_config
from raysseg.engine import inputs
from raysseg.io import images as data
from raysseg.io.images import DatasetError
from raysseg.io.prepared import prepare
from raysseg.settings import ConfigError

PICTURE = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
FORMATS = {"a.webp": "WEBP", "b.tif": "TIFF", "c.TIFF": "TIFF", "d.bmp": "BMP", "e.jpg": "JPEG",
           "city/f.png": "PNG", "city/night/g.jpeg": "JPEG"}


def _split(root: Path, names=FORMATS, labels: bool = True, label_value: int = 1) -> Path:
    for name, fmt in names.items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(PICTURE).save(root / "images" / name, fmt)
        if labels:
            label = (root / "labels" / name).with_suffix(".png")
            label.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full(PICTURE.shape[:2], label_value, np.uint8)).save(label)
    return root


def _one_line(message: str, *words: str) -> str:
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


# --------------------------------------------------------------------------- item 5: formats, sub-folders


def test_webp_tiff_bmp_and_subfolders_are_read_with_labels_at_the_same_relative_path(tmp_path):
    split = _split(tmp_path / "s")
    files = data.list_split(str(split), with_labels=True)
    rel = [os.path.relpath(p, split / "images") for p in files.images]
    assert rel == ["a.webp", "b.tif", "c.TIFF", "city/f.png", "city/night/g.jpeg", "d.bmp", "e.jpg"]
    assert [os.path.relpath(p, split / "labels") for p in files.labels] == [os.path.splitext(r)[0] + ".png" for r in rel]
    assert files.left_out == [] and files.left_out_line() == ""
    items, fn = data.read_plan(str(split), image_size=16, train=False, with_labels=True, n_classes=5)
    out = fn({"path": np.array([i["path"] for i in items], object),
              "label_path": np.array([i["label_path"] for i in items], object)})
    assert out["valid"].all(), out["error"]
    assert (out["label"] == 1).all() and out["image"].std() > 10


def test_files_left_out_are_counted_and_listed_before_training(tmp_path, capsys):
    split = _split(tmp_path / "s", labels=False)
    (split / "images" / "notes.txt").write_text("not an image")
    (split / "images" / "city" / "IMG_0001.heic").write_bytes(b"\x00" * 64)
    (split / "images" / ".DS_Store").write_bytes(b"\x00")
    files = data.list_split(str(split), with_labels=False)
    assert len(files.images) == len(FORMATS)
    assert sorted(os.path.basename(u) for u, _ in files.left_out) == [".DS_Store", "IMG_0001.heic", "notes.txt"]
    cfg = load_config("kmeans_synth", [f"data.train={split}", "train.num_workers=1", "train.batch_size=2"])
    assert inputs.check_inputs(cfg) == len(FORMATS)
    line = _one_line(capsys.readouterr().out.strip(), "3 file(s) under images/ left out", ".heic", ".txt",
                     "hidden file", "IMG_0001.heic", "notes.txt", "move them out of images/")
    assert line.startswith(f"warning: {split}")
    inputs.check_inputs(cfg)  # a sweep checks every trial's config: the split is named once
    assert capsys.readouterr().out == ""


def test_no_image_at_all_names_what_is_there(tmp_path):
    (tmp_path / "s" / "images").mkdir(parents=True)
    (tmp_path / "s" / "images" / "scan.gif").write_bytes(b"GIF89a")
    with pytest.raises(DatasetError) as err:
        data.list_split(str(tmp_path / "s"), with_labels=False)
    _one_line(str(err.value), "holds no PNG, JPEG, WebP, TIFF or BMP images", "scan.gif")


def _exif_jpeg(orientation: int) -> bytes:
    """A 40x20 (WxH) JPEG, left half black and right half white, stored with an EXIF orientation tag."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


def _tiff(array: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, array, photometric="rgb" if array.ndim == 3 else "minisblack")
    return buf.getvalue()


def test_camera_orientation_is_applied():
    """Orientation 6 (a phone held upright): viewers turn the picture 90 degrees clockwise."""
    upright = np.asarray(data.decode_image(_exif_jpeg(6)))
    assert upright.shape == (40, 20, 3)
    assert upright[:15].mean() < 40 and upright[25:].mean() > 215  # the black half is on top now
    assert np.asarray(data.decode_image(_exif_jpeg(1))).shape == (20, 40, 3)


CAMERA_AND_TOOL_FILES = {  # name: (bytes, the RGB value every pixel should have)
    "float_rgb_tiff": (_tiff(np.full((6, 8, 3), 0.5, np.float32)), (128, 128, 128)),
    "gray16_tiff": (_tiff(np.full((6, 8), 100 * 257, np.uint16)), (100, 100, 100)),
    "rgb16_tiff": (_tiff(np.dstack([np.full((6, 8), v * 257, np.uint16) for v in (200, 100, 50)])), (200, 100, 50)),
    "planar_rgb_tiff": (_tiff(np.stack([np.full((6, 8), v, np.uint8) for v in (9, 99, 199)])), (9, 99, 199)),
}


def _bmp_palette() -> bytes:
    im = Image.fromarray(np.full((6, 8), 1, np.uint8), "P")
    im.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    buf = io.BytesIO()
    im.save(buf, "BMP")
    return buf.getvalue()


CAMERA_AND_TOOL_FILES["palette_bmp"] = (_bmp_palette(), (30, 60, 90))


@pytest.mark.parametrize("name", sorted(CAMERA_AND_TOOL_FILES))
def test_tiff_bmp_and_16bit_files_decode_to_what_a_viewer_shows(name):
    raw, rgb = CAMERA_AND_TOOL_FILES[name]
    pixels = np.asarray(data.decode_image(raw))
    assert pixels.dtype == np.uint8 and pixels.shape == (6, 8, 3)
    assert (np.abs(pixels.astype(int) - rgb) <= 1).all(), pixels[0, 0]


def test_prepared_cache_holds_the_images_of_subfolders(tmp_path):
    split = _split(tmp_path / "s", labels=False)
    prepared = prepare(str(split), 16, "auto", log=lambda *_: None)
    assert len(prepared.rows) == len(FORMATS) and not prepared.invalid
    assert prepared.rows[3]["path"] == str(split / "images" / "city" / "f.png")


# --------------------------------------------------------------------------- item 6: pairing, label values


def test_missing_and_misnamed_labels_are_one_line_with_names_and_the_fix(tmp_path):
    split = _split(tmp_path / "s")
    (split / "labels" / "a.png").unlink()
    (split / "labels" / "city" / "f.png").rename(split / "labels" / "city" / "f_mask.png")
    (split / "labels" / "d.png").rename(split / "labels" / "d_label.png")
    with pytest.raises(DatasetError) as err:
        data.list_split(str(split), with_labels=True)
    _one_line(str(err.value), f"3 of {len(FORMATS)} images", "(first: a.webp, city/f.png, d.bmp)",
              "2 label file(s) match no image", "city/f_mask.png", "d_label.png",
              "images/x/a.jpg -> labels/x/a.png")


def test_label_values_above_n_classes_are_found_before_ray_starts(tmp_path, synth_data):
    """`raysseg run` checks the evaluation split before it trains: one line, exit 2, no Ray, no MLflow."""
    bad = _split(tmp_path / "val", label_value=7)
    Image.fromarray(np.full(PICTURE.shape[:2], 255, np.uint8)).save(bad / "labels" / "a.png")  # ignore_index is fine
    with pytest.raises(DatasetError) as err:
        inputs.check_labels(str(bad), 5, 255)
    _one_line(str(err.value), f"{len(FORMATS) - 1} of {len(FORMATS)} label files checked hold values [7]",
              "outside 0..4 (ignore_index 255)", "(first: b.png, c.png, f.png, ...)", "--set data.n_classes=8")
    proc = subprocess.run(
        [sys.executable, "-m", "raysseg.apps.cli", "run", "--config", "kmeans_synth",
         "--set", f"data.train={synth_data}/train", "--set", f"data.val={bad}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "hold values [7]" in lines[0], proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "mlruns.db").exists()


def test_label_values_are_checked_on_a_bounded_sample(tmp_path):
    """Large splits: an evenly spaced sample is read before the run; the evaluation checks every file."""
    names = {f"{i:02d}.png": "PNG" for i in range(10)}
    split = _split(tmp_path / "s", names)
    Image.fromarray(np.full(PICTURE.shape[:2], 9, np.uint8)).save(split / "labels" / "01.png")
    inputs.check_labels(str(split), 5, 255, sample=5)  # reads 00, 02, 04, 06, 08
    with pytest.raises(DatasetError, match=r"1 of 10 label files checked hold values \[9\]"):
        inputs.check_labels(str(split), 5, 255)


def test_evaluation_without_a_usable_training_split_names_the_flags(tmp_path, synth_data, capsys):
    unlabelled = tmp_path / "train"
    shutil.copytree(synth_data / "train" / "images", unlabelled / "images")
    cfg = load_config("kmeans_synth", [f"data.train={unlabelled}", f"data.val={synth_data}/val"])
    val = str(synth_data / "val")
    for probe, retrieval in ((True, False), (True, True), (False, True)):
        with pytest.raises(DatasetError) as err:
            inputs.check_evaluation(cfg, val, probe, retrieval, retrieval_asked=True)
        _one_line(str(err.value), f"{unlabelled} has no labels/ folder", "--no-probe --no-retrieval")
    assert inputs.check_evaluation(cfg, val, False, True, retrieval_asked=False) is False  # on by default only
    assert "warning: retrieval left out" in capsys.readouterr().out
    assert inputs.check_evaluation(cfg, val, False, False) is False
    missing = load_config("kmeans_synth", [f"data.train={tmp_path}/elsewhere"])
    with pytest.raises(DatasetError, match="--no-probe --no-retrieval"):
        inputs.check_evaluation(missing, val, True, True)


# --------------------------------------------------------------------------- item 7: YAML syntax


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("method: kmeans\ntrain:\n  epochs: 2\n  lr: [0.1, 0.2\ndata:\n  n_classes: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    _one_line(str(err.value), f"config file {path}, line 5, column 5", "not valid YAML",
              "expected ',' or ']'", "line 4, column 7")
    path.write_text("method: kmeans\ntrain:\n\tepochs: 2\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--config", str(path)])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{path}, line 3, column 1" in lines[0] and "'\\t'" in lines[0], lines
