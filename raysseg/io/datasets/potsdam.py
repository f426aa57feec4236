"""ISPRS Potsdam -> Potsdam-3 (roads and cars, buildings and clutter, vegetation and trees) in square crops.

Source (the ISPRS 2D semantic labelling benchmark, Potsdam): ``2_Ortho_RGB/top_potsdam_<a>_<b>_RGB.tif``
(6000 x 6000) and ``5_Labels_all/top_potsdam_<a>_<b>_label.tif`` (or ``5_Labels_all_noBoundary/
top_potsdam_<a>_<b>_label_noBoundary.tif``), colour-coded: impervious surfaces white, building blue, low
vegetation cyan, tree green, car yellow, clutter red; black (the eroded boundaries) is ignored. Each
channel is thresholded at 128, so slightly off colours still map. The merge into 3 classes is IIC's
(Ji et al. ICCV 2019), used by STEGO and HP. Protocols (``--protocol``):

tiles (default)  square crops of --tile px (200: 30 x 30 a tile) at full resolution; val = whole tiles, by default
    the 14 the ISPRS benchmark held out for testing (--val-tiles), every other tile train. A remainder narrower
    than a crop is dropped.
iic  as IIC's code/datasets/segmentation/util/potsdam_prepare.py, which STEGO and HP read: each tile cut into
    windows of 2 x --tile px (400: 15 x 15 a 6000 px tile), each downsampled x0.5 to --tile px: the image as the
    mean of each 2 x 2 block rounded half up (what cv2.resize INTER_LINEAR computes at exactly x0.5), the label
    as the top-left pixel of each block (cv2 INTER_NEAREST at x0.5). The 24 tiles with labels in IIC's time (all but
    the 14 ISPRS test tiles) are labelled; int(0.1 x all crops) of their crops (855 of 5,400 for the 38 tiles) go
    to val (IIC's labelled_test), the rest to train (labelled_train: STEGO's and HP's training split); the crops
    of the 14 other tiles go to unlabelled_train (IIC trained on it too; STEGO and HP do not), with their labels
    where the distribution has them (5_Labels_all) and all ignored where not. What differs from IIC: its val crops
    were drawn unseeded (np.random.choice) and its files named by an unseeded permutation, so its labelled_test.txt
    cannot be rebuilt: here the draw is numpy.random.default_rng(0).choice over the labelled crops in tile order
    (sorted tile ids, row-major crops), the same pool and count; the images come from 2_Ortho_RGB (IIC read the
    RGB channels of 4_Ortho_RGBIR, STEGO drops its IR channel) and are written as PNG (IIC: .mat); a label
    colour outside the ISPRS code is ignored (IIC stops). Every tile must have the first tile's size.
"""
from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from raysseg.io import storage
from raysseg.io.datasets.layout import (IGNORE, Dataset, Output, PrepareOptions, Task, chosen_protocol, encode_png,
                                        layout_error, list_or_empty)
from raysseg.io.images import DatasetError, decode_image

CLASSES = ("roads and cars", "buildings and clutter", "vegetation and trees")
# (R, G, B) of the ISPRS colour code, each 0/255 -> Potsdam-3 class
COLOURS = {(255, 255, 255): 0, (255, 255, 0): 0,  # impervious surfaces, car
           (0, 0, 255): 1, (255, 0, 0): 1,  # building, clutter/background
           (0, 255, 255): 2, (0, 255, 0): 2}  # low vegetation, tree
ISPRS_TEST_TILES = ("2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15", "6_13", "6_14",
                    "6_15", "7_13")
TILE = re.compile(r"top_potsdam_(\d+_\d+)_RGB\.tif$", re.IGNORECASE)
LABEL_FOLDERS = (("5_Labels_all", "_label.tif"), ("5_Labels_all_noBoundary", "_label_noBoundary.tif"))
PROTOCOLS = {
    "tiles": "crops of --tile px at full resolution; val = whole tiles (default: the 14 ISPRS test tiles)",
    "iic": "windows of 2 x --tile px downsampled x0.5 (IIC: 400 -> 200 px, 15 x 15 a tile); val = a seeded draw of "
           "10% of all crops from the 24 labelled tiles (IIC's labelled_test), train = their other crops, "
           "unlabelled_train = the crops of the 14 ISPRS test tiles",
}
IIC_VAL_FRACTION = 0.1  # potsdam_prepare.py: NUM_TEST = int(NUM_TRAIN * 0.1), NUM_TRAIN = every tile's crops
IIC_SEED = 0
EXPECTED = ("2_Ortho_RGB/top_potsdam_<a>_<b>_RGB.tif with 5_Labels_all/top_potsdam_<a>_<b>_label.tif "
            "(or 5_Labels_all_noBoundary/..._label_noBoundary.tif), the ISPRS Potsdam files")


def potsdam3_labels(rgb: np.ndarray) -> np.ndarray:
    """ISPRS colour labels [H, W, 3] uint8 -> uint8 Potsdam-3 classes, IGNORE for black and any other colour."""
    bits = (np.asarray(rgb)[..., :3] >= 128).astype(np.int64)
    code = bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]
    lut = np.full(8, IGNORE, np.uint8)
    for (r, g, b), cls in COLOURS.items():
        lut[(r // 255) * 4 + (g // 255) * 2 + b // 255] = cls
    return lut[code]


def find(src: str, options: PrepareOptions) -> list[Task]:
    protocol = chosen_protocol("potsdam3", PROTOCOLS, options)
    if protocol == "iic" and options.val_tiles:
        raise DatasetError("potsdam3: --val-tiles is for --protocol tiles; iic draws its val crops from the "
                           "labelled tiles")
    tiles = {m.group(1): u for u in list_or_empty(storage.join(src, "2_Ortho_RGB"), (".tif",))
             if (m := TILE.search(u.replace("\\", "/").rsplit("/", 1)[-1]))}
    if not tiles:
        raise layout_error("potsdam3", src, "no 2_Ortho_RGB/top_potsdam_*_RGB.tif", EXPECTED)
    for folder, suffix in LABEL_FOLDERS:
        labels = list_or_empty(storage.join(src, folder), (".tif",))
        if labels:
            break
    else:
        raise layout_error("potsdam3", src, "no 5_Labels_all/ or 5_Labels_all_noBoundary/ with .tif labels", EXPECTED)

    def files(tile: str, uri: str) -> dict[str, str]:
        return {"image": uri, "label": storage.join(src, folder, f"top_potsdam_{tile}{suffix}")}

    if protocol == "tiles":
        val = set(options.val_tiles or ISPRS_TEST_TILES)
        return [Task("val" if tile in val else "train", tile, files(tile, uri)) for tile, uri in sorted(tiles.items())]
    labelled = [t for t in sorted(tiles) if t not in ISPRS_TEST_TILES]
    per_tile = _grid(Image.open(io.BytesIO(storage.read_bytes(tiles[sorted(tiles)[0]]))).size, 2 * options.tile)
    n_val = min(int(IIC_VAL_FRACTION * len(tiles) * per_tile), len(labelled) * per_tile)
    drawn = np.random.default_rng(IIC_SEED).choice(len(labelled) * per_tile, n_val, replace=False)
    val = {t: tuple(sorted(int(i) % per_tile for i in drawn if i // per_tile == k)) for k, t in enumerate(labelled)}
    present = {u.replace("\\", "/").rsplit("/", 1)[-1] for u in labels}
    return [Task("train", t, files(t, tiles[t]), val[t]) if t in val else
            Task("unlabelled_train", t, {k: v for k, v in files(t, tiles[t]).items()
                                         if k == "image" or v.rsplit("/", 1)[-1] in present})
            for t in sorted(tiles)]


def _grid(size: tuple[int, int], window: int) -> int:
    """Windows of ``window`` px in a tile of ``size`` (W, H)."""
    return (size[0] // window) * (size[1] // window)


def halve(image: np.ndarray) -> np.ndarray:
    """uint8 [2h, 2w, C] -> [h, w, C]: the mean of each 2 x 2 block, rounded half up."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    blocks = image[:2 * h, :2 * w].reshape(h, 2, w, 2, -1).astype(np.uint16).sum(axis=(1, 3))
    return ((blocks + 2) // 4).astype(np.uint8)


def convert(task: Task, options: PrepareOptions, read) -> list[Output]:
    image = np.asarray(decode_image(read(task.files["image"])))
    if "label" in task.files:
        label = potsdam3_labels(np.asarray(decode_image(read(task.files["label"]))))
    else:  # iic's unlabelled tiles may come without labels
        label = np.full(image.shape[:2], IGNORE, np.uint8)
    if label.shape != image.shape[:2]:
        raise ValueError(f"label {task.files['label']} is {label.shape[1]}x{label.shape[0]} but its tile is "
                         f"{image.shape[1]}x{image.shape[0]}; use the label file of the same tile")
    side = options.tile
    iic = chosen_protocol("potsdam3", PROTOCOLS, options) == "iic"
    window = 2 * side if iic else side
    rows, cols = image.shape[0] // window, image.shape[1] // window
    if rows == 0 or cols == 0:
        raise ValueError(f"{task.files['image']} is {image.shape[1]}x{image.shape[0]}, smaller than one "
                         f"{window} px window; lower --tile")
    if iic:
        if task.val_crops and max(task.val_crops) >= rows * cols:
            raise ValueError(f"{task.files['image']} is {image.shape[1]}x{image.shape[0]}, not the size of the first "
                             "tile that the val draw assumed; prepare tiles of one size")
        image, label = halve(image[:rows * window, :cols * window]), label[:rows * window:2, :cols * window:2]
    val = set(task.val_crops)
    return [Output(f"{task.key}_{r:02d}_{c:02d}",
                   encode_png(np.ascontiguousarray(image[r * side:(r + 1) * side, c * side:(c + 1) * side])), ".png",
                   label[r * side:(r + 1) * side, c * side:(c + 1) * side], "val" if r * cols + c in val else "")
            for r in range(rows) for c in range(cols)]


POTSDAM3 = Dataset(
    name="potsdam3", classes=CLASSES, expected=EXPECTED,
    mapping="ISPRS colours: impervious surfaces + car -> 0, building + clutter -> 1, low vegetation + tree -> 2, "
            "black (boundary) and other colours -> 255; tiles cut into square crops of --tile px (iic: windows of "
            "2 x --tile px downsampled x0.5)",
    reference="ISPRS 2D Semantic Labeling Contest - Potsdam (colour code, tiles, benchmark test tiles); "
              "3-class merge, 400 px windows downsampled to 200 px and the labelled/unlabelled split: IIC "
              "(Ji et al. ICCV 2019, potsdam_prepare.py), used by STEGO and HP",
    find=find, convert=convert,
    lut=lambda: {f"{r},{g},{b}": c for (r, g, b), c in COLOURS.items()},
    protocols=PROTOCOLS,
)
