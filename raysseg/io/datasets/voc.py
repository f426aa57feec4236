"""PASCAL VOC 2012 segmentation -> 21 classes (background + 20), 255 ignored, with train_aug and val.

Source (the official VOCtrainval_11-May-2012.tar, host.robots.ox.ac.uk/pascal/VOC/voc2012, as
``VOCdevkit/VOC2012`` or that folder itself): ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNGs:
the pixel indices are the classes, 255 the void border) and ``ImageSets/Segmentation/{train,val}.txt``.
train_aug (10,582 images) adds ``SegmentationClassAug/*.png`` (the SBD labels of Hariharan et al. 2011 in the
DeepLab release: single-channel indices) and its list ``ImageSets/Segmentation/train_aug.txt`` (or
``ImageSets/SegmentationAug/train_aug.txt``; lines are ids or DeepLab's
"/JPEGImages/x.jpg /SegmentationClassAug/x.png").
Labels saved as RGB colours are mapped back through the VOC palette. Indices 21..254 become 255.

Protocols (``--protocol``): ``aug`` (default) labels every train_aug image from SegmentationClassAug;
``segsort`` labels the 1,464 images of ImageSets/Segmentation/train.txt from VOC's own SegmentationClass and
the rest of train_aug from SegmentationClassAug (SBD), as SegSort's dataset/voc12/train+.txt does (1,464
VOC2012/segcls + 9,118 sbd/dataset/clsimg lines, 10,582 in all).
"""
from __future__ import annotations

import numpy as np

from raysseg.io import storage
from raysseg.io.datasets.layout import (IGNORE, Dataset, Output, PrepareOptions, Task, chosen_protocol,
                                        labelled_output, layout_error, stem)
from raysseg.io.images import decode_label

CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
EXPECTED = ("VOCdevkit/VOC2012 with JPEGImages/*.jpg, SegmentationClass/*.png and "
            "ImageSets/Segmentation/{train,val}.txt (and for train_aug SegmentationClassAug/*.png with "
            "ImageSets/Segmentation/train_aug.txt)")


def palette() -> np.ndarray:
    """uint8 [256, 3]: the VOC colour of index i (bits of i spread over the high bits of R, G, B)."""
    colours = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[i] = (r, g, b)
    return colours


def voc_labels(values: np.ndarray) -> np.ndarray:
    """Indices [H, W] or RGB colours [H, W, 3] -> uint8 0..20, IGNORE for 255, the border colour and the rest."""
    values = np.asarray(values)
    if values.ndim == 3:
        codes = (values[..., 0].astype(np.int64) << 16) | (values[..., 1].astype(np.int64) << 8) | values[..., 2]
        pal = palette()[: len(CLASSES)].astype(np.int64)
        known = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
        out = np.full(codes.shape, IGNORE, np.uint8)
        for index, code in enumerate(known):
            out[codes == code] = index
        return out
    values = values.astype(np.int64)
    return np.where((values >= 0) & (values < len(CLASSES)), values, IGNORE).astype(np.uint8)


def _label(data: bytes) -> np.ndarray:
    try:
        return np.asarray(decode_label(data))
    except ValueError:
        from raysseg.io.images import decode_image

        return np.asarray(decode_image(data))  # an RGB colour label


def _root(src: str) -> str:
    for root in (src, storage.join(src, "VOC2012"), storage.join(src, "VOCdevkit", "VOC2012")):
        if storage.exists(storage.join(root, "JPEGImages")):
            return root
    raise layout_error("voc2012", src, "no JPEGImages/ there, in VOC2012/ or in VOCdevkit/VOC2012/", EXPECTED)


PROTOCOLS = {
    "aug": "train_aug (when SegmentationClassAug and its list are there, else train) labelled from "
           "SegmentationClassAug; val from SegmentationClass",
    "segsort": "train_aug: VOC's SegmentationClass for the 1,464 train.txt images, SegmentationClassAug (SBD) for "
               "the rest (SegSort's train+.txt); val from SegmentationClass",
}


def _ids(uri: str) -> list[str]:
    return [stem(line.split()[0]) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def find(src: str, options: PrepareOptions) -> list[Task]:
    protocol = chosen_protocol("voc2012", PROTOCOLS, options)
    root = _root(src)
    sets = storage.join(root, "ImageSets", "Segmentation")
    splits = {}
    for name in ("val", "train"):
        if not storage.exists(storage.join(sets, f"{name}.txt")):
            raise layout_error("voc2012", src, f"no ImageSets/Segmentation/{name}.txt", EXPECTED)
        splits[name] = (storage.join(sets, f"{name}.txt"), "SegmentationClass")
    aug_lists = (storage.join(sets, "train_aug.txt"), storage.join(root, "ImageSets", "SegmentationAug", "train_aug.txt"))
    for aug_list in aug_lists:
        if storage.exists(aug_list):
            if not storage.exists(storage.join(root, "SegmentationClassAug")):
                raise layout_error("voc2012", src, f"{aug_list} is there but SegmentationClassAug/ is not", EXPECTED)
            train_list = splits.pop("train")[0]
            voc_train = set(_ids(train_list)) if protocol == "segsort" else set()
            splits["train_aug"] = (aug_list, "SegmentationClassAug")
            break
    else:
        if protocol == "segsort":
            raise layout_error("voc2012", src, "--protocol segsort needs ImageSets/Segmentation/train_aug.txt (or "
                               "ImageSets/SegmentationAug/train_aug.txt) and SegmentationClassAug/", EXPECTED)
        voc_train = set()
    if not storage.exists(storage.join(root, "SegmentationClass")):
        raise layout_error("voc2012", src, "no SegmentationClass/", EXPECTED)
    return [Task(split, name, {"image": storage.join(root, "JPEGImages", f"{name}.jpg"),
                               "label": storage.join(root, "SegmentationClass" if name in voc_train else folder,
                                                     f"{name}.png")})
            for split, (list_uri, folder) in splits.items() for name in _ids(list_uri)]


def convert(task: Task, options: PrepareOptions, read) -> list[Output]:
    image = read(task.files["image"])
    label = voc_labels(_label(read(task.files["label"])))
    return [labelled_output(task, image, ".jpg", label)]


VOC2012 = Dataset(
    name="voc2012", classes=CLASSES, expected=EXPECTED,
    mapping="palette/label index 0..20 -> 0..20 (background .. tvmonitor); 255 (void border) and 21..254 -> 255; "
            "RGB colour labels through the VOC palette",
    reference="Everingham et al., The PASCAL VOC Challenge, IJCV 2010 and the VOC2012 devkit (classes, palette, "
              "lists); train_aug: SBD (Hariharan et al. ICCV 2011) as released with DeepLab (Chen et al. 2017), "
              "used by SegSort (Hwang et al. ICCV 2019) and visual concepts (He et al. IJCAI 2022)",
    find=find, convert=convert,
    lut=lambda: {str(i): i for i in range(len(CLASSES))},
    protocols=PROTOCOLS,
)
