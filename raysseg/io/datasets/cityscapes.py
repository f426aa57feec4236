"""Cityscapes gtFine -> Cityscapes-27: label ids 7..33 (the non-void categories) become 0..26, the rest is ignored.

Source (the official distribution, cityscapes-dataset.com: leftImg8bit_trainvaltest.zip and
gtFine_trainvaltest.zip): ``leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png``. The ids and names are those of
cityscapesScripts' labels.py; the 27-class use follows PiCIE, STEGO and HP (the test split has no labels).
"""
from __future__ import annotations

import numpy as np

from raysseg.io import storage
from raysseg.io.datasets.layout import (IGNORE, Dataset, Output, PrepareOptions, Task, check_same_size,
                                        chosen_protocol, image_size, label_array, layout_error, list_or_empty)

CLASSES = ("road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
           "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person",
           "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle")  # ids 7..33
FIRST_ID = 7
SPLITS = ("train", "val")
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"
EXPECTED = ("leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/{train,val}/<city>/*_gtFine_labelIds.png "
            "(Cityscapes leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)")


def id_lookup() -> np.ndarray:
    """uint8 [256]: labelId -> 0..26 for ids 7..33, IGNORE for the rest (0..6 void, 255/-1 license plate)."""
    lut = np.full(256, IGNORE, np.uint8)
    lut[FIRST_ID:FIRST_ID + len(CLASSES)] = np.arange(len(CLASSES))
    return lut


def labels_27(ids: np.ndarray) -> np.ndarray:
    """gtFine labelIds [H, W] -> uint8 classes 0..26, IGNORE elsewhere."""
    values = np.asarray(ids).astype(np.int64)
    return np.where((values >= 0) & (values < 256), id_lookup()[values.clip(0, 255)], IGNORE).astype(np.uint8)


PROTOCOLS = {"fine": "gtFine train (2,975 images) and val (500), as PiCIE, STEGO and HP use them"}


def find(src: str, options: PrepareOptions) -> list[Task]:
    chosen_protocol("cityscapes27", PROTOCOLS, options)
    tasks = []
    for split in SPLITS:
        image_root = storage.join(src, "leftImg8bit", split)
        images = [u for u in list_or_empty(image_root, (IMAGE_SUFFIX,), recursive=True)]
        if not images:
            continue
        label_root = storage.join(src, "gtFine", split)
        if not list_or_empty(label_root, (LABEL_SUFFIX,), recursive=True):
            raise layout_error("cityscapes27", src, f"leftImg8bit/{split} has no gtFine/{split}/<city>/*{LABEL_SUFFIX}",
                               EXPECTED)
        for uri in images:
            rel = uri[len(image_root):].strip("/\\").replace("\\", "/")  # <city>/<name>_leftImg8bit.png
            key = rel[: -len(IMAGE_SUFFIX)]
            label = storage.join(label_root, *f"{key}{LABEL_SUFFIX}".split("/"))
            tasks.append(Task(split, key, {"image": uri, "label": label}))
    if not tasks:
        raise layout_error("cityscapes27", src, "no *_leftImg8bit.png under leftImg8bit/train or leftImg8bit/val",
                           EXPECTED)
    return tasks


def convert(task: Task, options: PrepareOptions, read) -> list[Output]:
    image = read(task.files["image"])
    ids = label_array(read(task.files["label"]))
    check_same_size(task, image_size(image), ids)
    return [Output(task.key, image, ".png", labels_27(ids))]


CITYSCAPES27 = Dataset(
    name="cityscapes27", classes=CLASSES, expected=EXPECTED,
    mapping="gtFine labelId 7..33 -> 0..26 (road .. bicycle); ids 0..6 (void), 255 and anything else -> 255",
    reference="Cordts et al., The Cityscapes Dataset, CVPR 2016; ids and names: cityscapesScripts "
              "helpers/labels.py; 27 classes as in PiCIE (Cho et al. CVPR 2021), STEGO and HP",
    find=find, convert=convert,
    lut=lambda: {str(FIRST_ID + i): i for i in range(len(CLASSES))},
    protocols=PROTOCOLS,
)
