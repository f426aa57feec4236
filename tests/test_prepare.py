"""`raysseg data prepare`: tiny replicas of each raw distribution (real names, encodings, palettes and id
ranges with ignored ids) against hand-made expected labels, from a folder and from s3://, resumed after a
kill, a wrong layout, and HP trained on the prepared COCO-Stuff replica with both loss forms."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysseg.io.datasets.layout import PrepareOptions
from raysseg.io.datasets.voc import palette
from raysseg.runtime.prepare import prepare

# --------------------------------------------------------------------------- replicas

# COCO-Stuff stuffthingmaps values (COCO-Stuff id - 1) and their 27-class labels, worked out by hand from
# the hierarchy: person, car, banner (textile), wood (solid), unlabeled, unused value 182, sky-other, road,
# bottle (kitchen), grass (plant)
COCO_FINE = [0, 2, 91, 181, 255, 182, 156, 148, 43, 123]
COCO_COARSE = [9, 11, 17, 24, 255, 255, 23, 21, 5, 22]
# Cityscapes labelIds: unlabeled, ground (void), road, sidewalk, sky, car, bicycle, 34 (not a class), 255, ego vehicle
CITY_IDS = [0, 6, 7, 8, 23, 26, 33, 34, 255, 1]
CITY_27 = [255, 255, 0, 1, 16, 19, 26, 255, 255, 255]
# ISPRS colours: impervious, car, building, clutter, low vegetation, tree, boundary, magenta, off-yellow
POTSDAM_RGB = [(255, 255, 255), (255, 255, 0), (0, 0, 255), (255, 0, 0), (0, 255, 255), (0, 255, 0), (0, 0, 0),
               (255, 0, 255), (250, 251, 3)]
POTSDAM_3 = [0, 0, 1, 1, 2, 2, 255, 255, 0]
# VOC palette indices: background, aeroplane, person, tvmonitor, void border, 21 (not a class)
VOC_INDEX = [0, 1, 15, 20, 255, 21]
VOC_21 = [0, 1, 15, 20, 255, 255]


def rows(values, height):
    return np.tile(np.asarray(values, np.uint8), (height, 1))


def noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def coco_replica(root: Path, n_train=5, n_val=2) -> Path:
    """images/{train2017,val2017}/<12-digit id>.jpg + annotations/<split>/<id>.png; the last train image has no
    annotation (skipped and listed)."""
    for split, n, first in (("train2017", n_train, 9), ("val2017", n_val, 139)):
        for k in range(n):
            name = f"{first + k:012d}"
            save(root / "images" / split / f"{name}.jpg", noise(6, len(COCO_FINE), k), quality=95)
            if not (split == "train2017" and k == n - 1):
                save(root / "annotations" / split / f"{name}.png", rows(COCO_FINE, 6))
    return root


def cityscapes_replica(root: Path) -> Path:
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        for k in range(2):
            base = f"{city}_{k:06d}_000019"
            save(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", noise(4, len(CITY_IDS), k))
            gt = root / "gtFine" / split / city
            save(gt / f"{base}_gtFine_labelIds.png", rows(CITY_IDS, 4))
            save(gt / f"{base}_gtFine_color.png", noise(4, len(CITY_IDS), 9))  # other gtFine files: not read
            save(gt / f"{base}_gtFine_instanceIds.png", rows(CITY_IDS, 4).astype(np.uint16) * 1000)
            (gt / f"{base}_gtFine_polygons.json").write_text("{}")
    return root


def potsdam_replica(root: Path) -> Path:
    """Two 8 x 18 tiles (2_10: train, 2_13: an ISPRS test tile, so val); crops of 4 px give 2 x 4 each."""
    for k, tile in enumerate(("2_10", "2_13")):
        save(root / "2_Ortho_RGB" / f"top_potsdam_{tile}_RGB.tif", noise(8, 18, k), format="TIFF")
        colours = np.asarray(POTSDAM_RGB + POTSDAM_RGB, np.uint8)[None].repeat(8, axis=0)  # 8 x 18 x 3
        save(root / "5_Labels_all" / f"top_potsdam_{tile}_label.tif", colours, format="TIFF")
    return root


def voc_replica(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    ids = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"], "aug_only": ["2008_000002"]}
    for k, name in enumerate(sum(ids.values(), [])):
        save(voc / "JPEGImages" / f"{name}.jpg", noise(5, len(VOC_INDEX), k), quality=95)
        if name not in ids["aug_only"]:
            label = Image.fromarray(rows(VOC_INDEX, 5), mode="P")
            label.putpalette(palette().reshape(-1).tolist())
            (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
            label.save(voc / "SegmentationClass" / f"{name}.png")
        if name not in ids["val"]:
            save(voc / "SegmentationClassAug" / f"{name}.png", rows(VOC_INDEX, 5))  # single channel, as DeepLab's
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(ids["train"]) + "\n")
    (sets / "val.txt").write_text("\n".join(ids["val"]) + "\n")
    aug = voc / "ImageSets" / "SegmentationAug"
    aug.mkdir(parents=True)
    (aug / "train_aug.txt").write_text("".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n"
                                               for n in ids["train"] + ids["aug_only"]))
    return root


def label(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def quiet(*_):
    pass


# --------------------------------------------------------------------------- from a folder


def test_cocostuff_from_a_folder_with_a_curated_list(tmp_path):
    src, dst = coco_replica(tmp_path / "coco"), tmp_path / "out"
    result = prepare("cocostuff27", str(src), str(dst), PrepareOptions(), local=True, log=quiet)
    train = sorted(p.name for p in (dst / "train" / "labels").iterdir())
    assert train == [f"{9 + k:012d}.png" for k in range(4)]
    for split in ("train", "val"):
        for p in (dst / split / "labels").iterdir():
            np.testing.assert_array_equal(label(p), rows(COCO_COARSE, 6))
            image = dst / split / "images" / f"{p.stem}.jpg"
            assert image.read_bytes() == (src / "images" / f"{split}2017" / image.name).read_bytes()  # not re-encoded
    card = json.loads((dst / "dataset_card.json").read_text())
    assert card["image_count"] == 6 and card["splits"]["val"]["images"] == 2 and len(card["classes"]) == 27
    assert card["splits"]["train"]["pixels_per_class"]["person"] == 4 * 6
    assert card["splits"]["train"]["ignored_pixels"] == 4 * 6 * 2
    assert [s["task"] for s in card["skipped"]] == ["000000000013"] and "does not exist" in card["skipped"][0]["reason"]
    assert card["mapping_table"]["91"] == card["classes"].index("textile") and result.skipped == 1
    assert (dst / "classes.txt").read_text().splitlines()[9] == "person"

    listed = tmp_path / "Coco164kFull_Stuff_Coarse_7.txt"
    listed.write_text("000000000010\n11\n")  # ids, with or without the zero padding
    out2 = tmp_path / "curated"
    prepare("cocostuff27", str(src), str(out2), PrepareOptions(image_lists={"train": str(listed)}), local=True,
            log=quiet)
    assert sorted(p.stem for p in (out2 / "train" / "labels").iterdir()) == ["000000000010", "000000000011"]


def test_cityscapes_potsdam_and_voc_from_folders(tmp_path):
    dst = tmp_path / "city"
    prepare("cityscapes27", str(cityscapes_replica(tmp_path / "cs")), str(dst), PrepareOptions(), local=True,
            log=quiet)
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        labels = sorted((dst / split / "labels" / city).iterdir())
        assert [p.name for p in labels] == [f"{city}_{k:06d}_000019.png" for k in range(2)]
        for p in labels:
            np.testing.assert_array_equal(label(p), rows(CITY_27, 4))
            assert (dst / split / "images" / city / p.name).is_file()

    src, dst = potsdam_replica(tmp_path / "potsdam"), tmp_path / "p3"
    prepare("potsdam3", str(src), str(dst), PrepareOptions(tile=4), local=True, log=quiet)
    expected = rows(POTSDAM_3 + POTSDAM_3, 8)
    tile_image = np.asarray(Image.open(src / "2_Ortho_RGB" / "top_potsdam_2_10_RGB.tif"))
    for split, tile in (("train", "2_10"), ("val", "2_13")):
        names = sorted(p.name for p in (dst / split / "labels").iterdir())
        assert names == [f"{tile}_{r:02d}_{c:02d}.png" for r in range(2) for c in range(4)]  # 18 px: 2 px dropped
    np.testing.assert_array_equal(label(dst / "train" / "labels" / "2_10_01_02.png"), expected[4:8, 8:12])
    np.testing.assert_array_equal(np.asarray(Image.open(dst / "train" / "images" / "2_10_01_02.png")),
                                  tile_image[4:8, 8:12])
    card = json.loads((dst / "dataset_card.json").read_text())
    # the 16 columns kept hold class 0 at columns 0, 1, 8, 9 and 10: 5 per row of 8
    assert card["splits"]["train"]["images"] == 8
    assert card["splits"]["val"]["pixels_per_class"]["roads and cars"] == 8 * 5

    dst = tmp_path / "voc"
    prepare("voc2012", str(voc_replica(tmp_path / "raw")), str(dst), PrepareOptions(), local=True, log=quiet)
    assert sorted(p.name for p in dst.iterdir()) == [".prepare", "classes.txt", "dataset_card.json", "train_aug", "val"]
    assert sorted(p.stem for p in (dst / "train_aug" / "labels").iterdir()) == ["2007_000032", "2007_000039",
                                                                                 "2008_000002"]
    for p in list((dst / "train_aug" / "labels").iterdir()) + list((dst / "val" / "labels").iterdir()):
        np.testing.assert_array_equal(label(p), rows(VOC_21, 5))


# --------------------------------------------------------------------------- five crops (--five-crop)


@pytest.mark.parametrize("height, width, ratio", [(4, 10, 0.5), (7, 9, 0.5), (480, 640, 0.5), (333, 500, 0.7)])
def test_five_crop_boxes_are_torchvisions_five_crop_at_the_released_size(height, width, ratio):
    import torch
    from torchvision.transforms.functional import five_crop

    from raysseg.io.datasets.layout import five_crop_boxes

    pixels = torch.arange(height * width).reshape(1, height, width)
    # STEGO's and HP's crop_datasets.py: five_crop(img, [int(H * ratio), int(W * ratio)])
    theirs = five_crop(pixels, [int(height * ratio), int(width * ratio)])
    for (left, top, right, bottom), crop in zip(five_crop_boxes(width, height, ratio), theirs):
        assert torch.equal(pixels[:, top:bottom, left:right], crop)


def test_five_crop_writes_the_training_split_as_crops_and_keeps_val_whole(tmp_path):
    from raysseg.io.images import DatasetError

    src, dst = cityscapes_replica(tmp_path / "cs"), tmp_path / "city"
    prepare("cityscapes27", str(src), str(dst), PrepareOptions(five_crop=0.5), local=True, log=quiet)
    crops = sorted(p.relative_to(dst / "train" / "labels").as_posix() for p in (dst / "train" / "labels").rglob("*.png"))
    assert crops == [f"aachen/aachen_{k:06d}_000019_crop{i}.png" for k in range(2) for i in range(5)]
    whole = rows(CITY_27, 4)  # 4 x 10: crops of 2 x 5
    boxes = [(0, 0), (0, 5), (2, 0), (2, 5), (1, 2)]  # (top, left): corners, then the centre (offsets 1, 2.5 -> 2)
    image = np.asarray(Image.open(src / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"))
    for i, (top, left) in enumerate(boxes):
        np.testing.assert_array_equal(label(dst / "train" / "labels" / "aachen" / f"aachen_000000_000019_crop{i}.png"),
                                      whole[top:top + 2, left:left + 5])
        written = Image.open(dst / "train" / "images" / "aachen" / f"aachen_000000_000019_crop{i}.jpg")
        expected = io.BytesIO()  # the same pixels cut and saved as the released code does: JPEG, Pillow's quality
        Image.fromarray(image[top:top + 2, left:left + 5]).save(expected, format="JPEG")
        assert written.format == "JPEG" and written.size == (5, 2)
        np.testing.assert_array_equal(np.asarray(written), np.asarray(Image.open(expected)))
    assert sorted(p.name for p in (dst / "val" / "labels" / "frankfurt").iterdir()) == [
        f"frankfurt_{k:06d}_000019.png" for k in range(2)]
    card = json.loads((dst / "dataset_card.json").read_text())
    assert card["options"]["five_crop"] == 0.5 and card["splits"]["train"]["images"] == 10
    assert card["splits"]["val"]["images"] == 2

    # resuming into it with other options would mix two datasets: one line before anything is written
    with pytest.raises(DatasetError, match=r"other options \(five_crop 0.5 -> 0.0\): write into another DST"):
        prepare("cityscapes27", str(src), str(dst), PrepareOptions(), local=True, log=quiet)
    prepare("cityscapes27", str(src), str(dst), PrepareOptions(five_crop=0.5), local=True, log=quiet)  # same: resumes


# --------------------------------------------------------------------------- protocols (--protocol)


def test_cocostuff_protocols_read_iics_curated_lists(tmp_path):
    """stego: the unversioned list for train, _7 for val (STEGO/HP); picie: _7 for both; a missing list is one line."""
    src = coco_replica(tmp_path / "coco", n_train=5, n_val=2)
    lists = {("train2017", "Coco164kFull_Stuff_Coarse.txt"): ["000000000009", "000000000010", "000000000011"],
             ("train2017", "Coco164kFull_Stuff_Coarse_7.txt"): ["000000000010"],
             ("val2017", "Coco164kFull_Stuff_Coarse_7.txt"): ["000000000140"]}
    for (folder, name), ids in lists.items():
        (src / "curated" / folder).mkdir(parents=True, exist_ok=True)
        (src / "curated" / folder / name).write_text("\n".join(ids) + "\n")
    for protocol, train in (("stego", ["000000000009", "000000000010", "000000000011"]), ("picie", ["000000000010"])):
        dst = tmp_path / protocol
        prepare("cocostuff27", str(src), str(dst), PrepareOptions(protocol=protocol), local=True, log=quiet)
        assert sorted(p.stem for p in (dst / "train" / "labels").iterdir()) == train
        assert [p.stem for p in (dst / "val" / "labels").iterdir()] == ["000000000140"]
        card = json.loads((dst / "dataset_card.json").read_text())
        assert card["protocol"]["name"] == protocol and card["options"]["protocol"] == protocol
    (src / "curated" / "train2017" / "Coco164kFull_Stuff_Coarse.txt").unlink()
    with pytest.raises(Exception) as e:
        prepare("cocostuff27", str(src), str(tmp_path / "x"), PrepareOptions(protocol="stego"), local=True, log=quiet)
    assert type(e.value).__name__ == "DatasetError" and "Coco164kFull_Stuff_Coarse.txt does not exist" in str(e.value)
    with pytest.raises(Exception) as e:
        prepare("cocostuff27", str(src), str(tmp_path / "x"), PrepareOptions(protocol="iic"), local=True, log=quiet)
    assert str(e.value) == "cocostuff27: --protocol iic is not one of all, stego, picie"


def test_voc_segsort_protocol_takes_vocs_own_labels_where_voc_has_them(tmp_path):
    src = voc_replica(tmp_path / "raw")
    aug = src / "VOCdevkit" / "VOC2012" / "SegmentationClassAug"
    sbd = np.full((5, len(VOC_INDEX)), 7, np.uint8)  # SBD's label of a VOC train image differs from VOC's
    save(aug / "2007_000032.png", sbd)
    save(aug / "2008_000002.png", sbd)  # an SBD-only image
    for protocol, voc_train_label in (("aug", sbd), ("segsort", rows(VOC_21, 5))):
        dst = tmp_path / protocol
        prepare("voc2012", str(src), str(dst), PrepareOptions(protocol=protocol), local=True, log=quiet)
        labels = dst / "train_aug" / "labels"
        np.testing.assert_array_equal(label(labels / "2007_000032.png"), voc_train_label)
        np.testing.assert_array_equal(label(labels / "2008_000002.png"), sbd)
        assert json.loads((dst / "dataset_card.json").read_text())["protocol"]["name"] == protocol


def potsdam_tile(root: Path, tile: str, side: int, with_label: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A side x side tile whose pixel values differ within every 2 x 2 block, and its label (colour bands);
    returns the image and the expected Potsdam-3 classes."""
    x = (np.arange(side) * 3 % 256).astype(np.uint8)
    y = (np.arange(side) * 2 % 256).astype(np.uint8)  # a 2 x 2 block sums to 4a + 10: rounds half up
    image = np.stack([y[:, None] + x[None, :] + np.uint8(50 * k) for k in range(3)], -1)  # uint8: mod 256
    save(root / "2_Ortho_RGB" / f"top_potsdam_{tile}_RGB.tif", image, format="TIFF")
    index = ((np.arange(side)[:, None] // 3 + np.arange(side)[None, :] // 5) % 7).astype(np.uint8)
    if with_label:
        save(root / "5_Labels_all" / f"top_potsdam_{tile}_label.tif", np.asarray(POTSDAM_RGB[:7], np.uint8)[index],
             format="TIFF")
    return image, np.asarray(POTSDAM_3[:7], np.uint8)[index]


def check_iic_crops(dst: Path, tile: str, image: np.ndarray, classes: np.ndarray, side: int) -> dict[str, str]:
    """Every crop of ``tile`` is the 2 x 2-block mean (PIL's reduce(2), rounded half up) of its 2*side px window
    and the top-left label pixel of each block (all ignored in unlabelled_train: its tiles here have no label
    file); returns crop name -> the split it went to."""
    where = {}
    for split in ("train", "val", "unlabelled_train"):
        for p in (dst / split / "images").glob(f"{tile}_*.png") if (dst / split).is_dir() else ():
            r, c = (int(v) for v in p.stem.split("_")[-2:])
            window = np.s_[2 * side * r:2 * side * (r + 1), 2 * side * c:2 * side * (c + 1)]
            expected = np.asarray(Image.fromarray(image[window]).reduce(2))
            np.testing.assert_array_equal(np.asarray(Image.open(p)), expected)
            got = label(dst / split / "labels" / p.name)
            np.testing.assert_array_equal(got, np.full_like(got, 255) if split == "unlabelled_train" else
                                          classes[window][::2, ::2])
            where[p.stem] = split
    return where


def test_potsdam_iic_protocol_on_small_tiles(tmp_path):
    """Two 48 px tiles, --tile 4: 8 px windows -> 4 px crops, 6 x 6 a tile. 2_10 is labelled; 2_13 (an ISPRS test
    tile, no label file) is unlabelled_train with every pixel ignored. val = int(0.1 x 72) = 7 crops of 2_10,
    drawn by numpy.random.default_rng(0) over its 36 crops."""
    src, dst = tmp_path / "potsdam", tmp_path / "p3"
    image, classes = potsdam_tile(src, "2_10", 48)
    other, _ = potsdam_tile(src, "2_13", 48, with_label=False)
    prepare("potsdam3", str(src), str(dst), PrepareOptions(tile=4, protocol="iic"), local=True, log=quiet)
    where = check_iic_crops(dst, "2_10", image, classes, 4)
    drawn = sorted(int(i) for i in np.random.default_rng(0).choice(36, 7, replace=False))
    assert sorted(k for k, s in where.items() if s == "val") == [f"2_10_{i // 6:02d}_{i % 6:02d}" for i in drawn]
    assert len(where) == 36 and list(where.values()).count("train") == 29
    assert set(check_iic_crops(dst, "2_13", other, classes, 4).values()) == {"unlabelled_train"}
    card = json.loads((dst / "dataset_card.json").read_text())
    assert card["protocol"]["name"] == "iic"
    assert {k: v["images"] for k, v in card["splits"].items()} == {"train": 29, "unlabelled_train": 36, "val": 7}
    with pytest.raises(Exception) as e:
        prepare("potsdam3", str(src), str(tmp_path / "x"), PrepareOptions(tile=4, protocol="iic", val_tiles=("2_10",)),
                local=True, log=quiet)
    assert str(e.value).startswith("potsdam3: --val-tiles is for --protocol tiles")


@pytest.mark.slow
def test_potsdam_iic_protocol_on_a_6000_px_tile_from_the_cli(tmp_path):
    """`data prepare potsdam3 --protocol iic` on a 6000 x 6000 tile: 15 x 15 crops of 200 px, each the x0.5
    downsampling of its 400 px window; int(0.1 x 225) = 22 of them in val."""
    src, dst = tmp_path / "potsdam", tmp_path / "p3"
    image, classes = potsdam_tile(src, "2_10", 6000)
    proc = subprocess.run([sys.executable, "-m", "raysseg.apps.cli", "data", "prepare", "potsdam3", str(src), str(dst),
                           "--protocol", "iic", "--local"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    where = check_iic_crops(dst, "2_10", image, classes, 200)
    assert len(where) == 225 and list(where.values()).count("val") == 22
    assert all(Image.open(p).size == (200, 200) for p in (dst / "val" / "images").iterdir())


# --------------------------------------------------------------------------- from s3:// with Ray


def test_ray_job_from_s3_to_s3_and_to_a_folder(tmp_path, ray_local, s3_server):
    from raysseg.io import storage

    src = coco_replica(tmp_path / "coco")
    s3_server.create_bucket("raw")
    storage.copy_tree(str(src), "s3://raw/coco")
    first = prepare("cocostuff27", "s3://raw/coco", "s3://raw/cocostuff27", PrepareOptions(), log=quiet)
    assert first.done_now == 7 and first.skipped == 1
    for split, n in (("train", 4), ("val", 2)):
        labels = storage.list_files(f"s3://raw/cocostuff27/{split}/labels", (".png",))
        assert len(labels) == n
        for uri in labels:
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri)))),
                                          rows(COCO_COARSE, 6))
    again = prepare("cocostuff27", "s3://raw/coco", "s3://raw/cocostuff27", PrepareOptions(), log=quiet)
    assert (again.done_before, again.done_now) == (6, 1)  # only the bad file is tried again
    assert again.card["splits"] == first.card["splits"]

    dst = tmp_path / "voc"
    storage.copy_tree(str(voc_replica(tmp_path / "raw")), "s3://raw/voc")
    prepare("voc2012", "s3://raw/voc", str(dst), PrepareOptions(), log=quiet)
    for p in (dst / "val" / "labels").iterdir():
        np.testing.assert_array_equal(label(p), rows(VOC_21, 5))


# --------------------------------------------------------------------------- resume, bad layout


def test_resume_after_a_kill_does_not_redo_finished_files(tmp_path):
    src, dst = coco_replica(tmp_path / "coco", n_train=120, n_val=0), tmp_path / "out"
    cmd = [sys.executable, "-m", "raysseg.apps.cli", "data", "prepare", "cocostuff27", str(src), str(dst), "--local"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    markers = dst / ".prepare" / "train"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and sum(n.endswith(".json") for n in os.listdir(markers)) >= 20:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in markers.iterdir() if p.suffix == ".json"}
    assert 20 <= len(done) < 119, f"the kill came too late ({len(done)} done); make the replica bigger"
    labels_before = {p.name: p.stat().st_mtime_ns for p in (dst / "train" / "labels").iterdir()}
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} done by an earlier run, {120 - len(done)} to do" in rerun.stdout
    after = {p.name: p.stat().st_mtime_ns for p in markers.iterdir()}
    assert len(after) == 119 and all(after[name] == t for name, t in done.items())
    for name in done:  # the finished files were not written again
        key = name[:-5] + ".png"
        assert (dst / "train" / "labels" / key).stat().st_mtime_ns == labels_before[key]
    assert not list(dst.rglob("*.tmp")), "no partial files left"
    card = json.loads((dst / "dataset_card.json").read_text())
    assert card["splits"]["train"]["images"] == 119


@pytest.mark.parametrize("dataset, expected", [
    ("cityscapes27", "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png"),
    ("potsdam3", "2_Ortho_RGB/top_potsdam_<a>_<b>_RGB.tif"),
    ("voc2012", "VOCdevkit/VOC2012 with JPEGImages"),
])
def test_a_wrong_layout_is_one_line_naming_what_was_expected(tmp_path, dataset, expected):
    src = coco_replica(tmp_path / "coco", n_train=2, n_val=0)
    with pytest.raises(Exception) as e:
        prepare(dataset, str(src), str(tmp_path / "out"), PrepareOptions(), local=True, log=quiet)
    assert type(e.value).__name__ == "DatasetError" and expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists(), "nothing written for a wrong layout"


def test_wrong_layout_from_the_cli_exits_2_with_one_line(tmp_path):
    src = cityscapes_replica(tmp_path / "cs")
    proc = subprocess.run([sys.executable, "-m", "raysseg.apps.cli", "data", "prepare", "cocostuff27", str(src),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "images/{train2017,val2017}/*.jpg and annotations/" in lines[0], proc.stderr


# --------------------------------------------------------------------------- training on the prepared replica


@pytest.mark.parametrize("loss_form, sp_versions", [("paper", [1, 2, 3, 4]), ("released", [1, 2, 2, 3])])
def test_prepared_cocostuff_trains_hp_for_two_steps_per_epoch(tmp_path, loss_form, sp_versions):
    """2 epochs of 2 steps, Q_sp renewed every step: the paper form renews at every step, the released
    one skips each epoch's iteration 0 (point 6), so its versions by step are 1, 2 | 2, 3."""
    from raysseg.config import load_config
    from raysseg.engine.local import train_local

    src, dst = coco_replica(tmp_path / "coco", n_train=5, n_val=2), tmp_path / "cocostuff27"
    prepare("cocostuff27", str(src), str(dst), PrepareOptions(), local=True, log=quiet)
    cfg = load_config("hp_cocostuff_released" if loss_form == "released" else "hp_cocostuff", [
        f"data.train={dst}/train", f"data.val={dst}/val", "data.image_size=32", "data.crop_scale_min=0.5",
        "model.backbone=vit_small_patch16", "model.weights=", "model.code_dim=16", "train.batch_size=2",
        "train.epochs=2",
        "train.num_workers=1", "train.use_gpu=false", "train.log_every=1", "hp.pool_size=3", "hp.renew_every=1",
        "hp.warmup=0", "hp.sigma=2.0", "kmeans.pixels_per_image=4", "kmeans.n_clusters=4",
        f"train.storage={tmp_path}/runs",
        "eval.crf=false"])
    assert cfg.hp.loss_form == loss_form
    result = train_local(cfg)
    from raysseg.io.checkpoints import read_checkpoint

    assert read_checkpoint(result.checkpoint)["progress"]["step"] == 4
    assert np.isfinite(result.metrics["loss_total"])
    assert [t["version"] for t in result.trace if t["table"] == "sp"] == sorted(set(sp_versions))


# --------------------------------------------------------------------------- jobs/reproduce.sh


@pytest.mark.parametrize("table, rows", [("hp-table1", 2), ("hp-table2", 1), ("hp-table3", 1), ("pgg", 2),
                                         ("segsort-voc", 1), ("concepts-voc", 1)])
def test_reproduce_tables_name_valid_configs(table, rows):
    import shlex

    from raysseg.config import load_config

    root = Path(__file__).parents[1]
    out = subprocess.run(["bash", str(root / "jobs/reproduce.sh"), table, "--dry-run", "--set", "train.seed=1"],
                         capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    assert len(out) == rows
    for line in out:
        words = shlex.split(line)
        assert words[:4] == ["raysseg", "run", "--config", words[3]] and words[-2:] == ["--set", "train.seed=1"]
        cfg = load_config(words[3], [w for w in words[4:] if w != "--set"])  # every override is a real key
        if table.startswith("hp"):
            assert cfg.hp.loss_form == "released"
    bad = subprocess.run(["bash", str(root / "jobs/reproduce.sh"), "table9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown table 'table9'" in bad.stderr


def test_a_photo_with_an_exif_turn_is_written_as_its_label_was_drawn(tmp_path):
    """COCO's labels are drawn on the stored pixels; readers turn images upright by EXIF, so such an image
    is written as its stored pixels without the tag (a 180 degree turn would otherwise pass misaligned, a 90
    degree one be skipped as a size mismatch)."""
    from raysseg.io.images import decode_image

    src, dst = coco_replica(tmp_path / "coco", n_train=4, n_val=1), tmp_path / "out"
    for name, turn in (("000000000009", 3), ("000000000010", 6)):  # 180 degrees; 90 (its label is 6 x 10)
        path = src / "images" / "train2017" / f"{name}.jpg"
        exif = Image.Exif()
        exif[0x0112] = turn
        stored = np.asarray(Image.open(path).convert("RGB"))
        Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
        assert decode_image(path.read_bytes()).size != stored.shape[1::-1] or turn == 3
    prepare("cocostuff27", str(src), str(dst), PrepareOptions(), local=True, log=quiet)
    for name in ("000000000009", "000000000010"):
        written = dst / "train" / "images" / f"{name}.png"
        stored = np.asarray(Image.open(src / "images" / "train2017" / f"{name}.jpg").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(decode_image(written.read_bytes())), stored)  # as read for training
        assert label(dst / "train" / "labels" / f"{name}.png").shape == stored.shape[:2]
    plain = dst / "train" / "images" / "000000000011.jpg"  # no tag: the bytes as distributed
    assert plain.read_bytes() == (src / "images" / "train2017" / plain.name).read_bytes()
