"""ISPRS Potsdam -> Potsdam-3 (roads and cars, buildings and clutter, vegetation and trees) in square crops.

Source (the ISPRS 2D semantic labelling benchmark, Potsdam): ``2_Ortho_RGB/top_potsdam_<a>_<b>_RGB.tif``
(6000 x 6000) and ``5_Labels_all/top_potsdam_<a>_<b>_label.tif`` (or ``5_Labels_all_noBoundary/
top_potsdam_<a>_<b>_label_noBoundary.tif``), colour-coded: impervious surfaces white, building blue, low
vegetation cyan, tree green, car yellow, clutter red; black (the eroded boundaries) is ignored. Each
channel is thresholded at 128, so slightly off colours still map. The merge into 3 classes is IIC's
(Ji et al. ICCV 2019), used by STEGO and HP; so is the crop side, 200 px (30 x 30 crops a tile; a
remainder narrower than a crop is dropped). val defaults to the 14 tiles the ISPRS benchmark held out for
testing; every other tile goes to train.
"""
from __future__ import annotations

import re

import numpy as np

from raysseg.io import storage
from raysseg.io.datasets.layout import (IGNORE, Dataset, Output, PrepareOptions, Task, encode_png, layout_error,
                                        list_or_empty)
from raysseg.io.images import decode_image

CLASSES = ("roads and cars", "buildings and clutter", "vegetation and trees")
# (R, G, B) of the ISPRS colour code, each 0/255 -> Potsdam-3 class
COLOURS = {(255, 255, 255): 0, (255, 255, 0): 0,  # impervious surfaces, car
           (0, 0, 255): 1, (255, 0, 0): 1,  # building, clutter/background
           (0, 255, 255): 2, (0, 255, 0): 2}  # low vegetation, tree
ISPRS_TEST_TILES = ("2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15", "6_13", "6_14",
                    "6_15", "7_13")
TILE = re.compile(r"top_potsdam_(\d+_\d+)_RGB\.tif$", re.IGNORECASE)
LABEL_FOLDERS = (("5_Labels_all", "_label.tif"), ("5_Labels_all_noBoundary", "_label_noBoundary.tif"))
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
    tiles = {m.group(1): u for u in list_or_empty(storage.join(src, "2_Ortho_RGB"), (".tif",))
             if (m := TILE.search(u.replace("\\", "/").rsplit("/", 1)[-1]))}
    if not tiles:
        raise layout_error("potsdam3", src, "no 2_Ortho_RGB/top_potsdam_*_RGB.tif", EXPECTED)
    for folder, suffix in LABEL_FOLDERS:
        if list_or_empty(storage.join(src, folder), (".tif",)):
            break
    else:
        raise layout_error("potsdam3", src, "no 5_Labels_all/ or 5_Labels_all_noBoundary/ with .tif labels", EXPECTED)
    val = set(options.val_tiles or ISPRS_TEST_TILES)
    return [Task("val" if tile in val else "train", tile,
                 {"image": uri, "label": storage.join(src, folder, f"top_potsdam_{tile}{suffix}")})
            for tile, uri in sorted(tiles.items())]


def convert(task: Task, options: PrepareOptions, read) -> list[Output]:
    image = np.asarray(decode_image(read(task.files["image"])))
    label = potsdam3_labels(np.asarray(decode_image(read(task.files["label"]))))
    if label.shape != image.shape[:2]:
        raise ValueError(f"label {task.files['label']} is {label.shape[1]}x{label.shape[0]} but its tile is "
                         f"{image.shape[1]}x{image.shape[0]}; use the label file of the same tile")
    side = options.tile
    rows, cols = image.shape[0] // side, image.shape[1] // side
    if rows == 0 or cols == 0:
        raise ValueError(f"{task.files['image']} is {image.shape[1]}x{image.shape[0]}, smaller than one "
                         f"{side} px crop; lower --tile")
    return [Output(f"{task.key}_{r:02d}_{c:02d}",
                   encode_png(np.ascontiguousarray(image[r * side:(r + 1) * side, c * side:(c + 1) * side])), ".png",
                   label[r * side:(r + 1) * side, c * side:(c + 1) * side])
            for r in range(rows) for c in range(cols)]


POTSDAM3 = Dataset(
    name="potsdam3", classes=CLASSES, expected=EXPECTED,
    mapping="ISPRS colours: impervious surfaces + car -> 0, building + clutter -> 1, low vegetation + tree -> 2, "
            "black (boundary) and other colours -> 255; tiles cut into square crops of --tile px",
    reference="ISPRS 2D Semantic Labeling Contest - Potsdam (colour code, tiles, benchmark test tiles); "
              "3-class merge and 200 px crops: IIC (Ji et al. ICCV 2019), used by STEGO and HP",
    find=find, convert=convert,
    lut=lambda: {f"{r},{g},{b}": c for (r, g, b), c in COLOURS.items()},
)
