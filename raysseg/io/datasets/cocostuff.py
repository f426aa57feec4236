"""COCO-Stuff 164k -> COCO-Stuff-27 (the 12 thing and 15 stuff supercategories), as STEGO, PiCIE and HP use it.

Source (the COCO-Stuff distribution, github.com/nightrome/cocostuff): ``images/{train2017,val2017}/*.jpg``
from COCO 2017 and ``annotations/{train2017,val2017}/*.png`` from stuffthingmaps_trainval2017.zip, whose
pixels hold the COCO-Stuff id minus one (0..181: things 0..90, stuff 91..181) and 255 for unlabeled.
Each fine class goes to its supercategory in the COCO-Stuff label hierarchy (Caesar et al., CVPR 2018,
the dataset's labels.md); anything else is ignored.

Protocols (``--protocol``) select the curated image lists of IIC (Ji et al. ICCV 2019; its
COCOStuff164kCurated.tar.gz unpacks to ``curated/{train2017,val2017}/``, expected under SRC), one image id a line:
  all    every image of images/train2017 and images/val2017 (or the --image-list files);
  stego  train: Coco164kFull_Stuff_Coarse.txt (the unversioned list, 97,702 images in IIC's copy; a superset
         of _7), val: Coco164kFull_Stuff_Coarse_7.txt (2,175): what STEGO's and HP's released code reads
         (src/data.py / dataset/data.py: ``subset=None`` for train, ``subset=7`` for val), so HP and STEGO
         train on the unversioned list, not on the 49,629 images of _7;
  picie  train and val: Coco164kFull_Stuff_Coarse_7.txt (49,629 / 2,175, the lists in PiCIE's repository,
         curated/; the split the PGG paper states).
``--image-list SPLIT=FILE`` replaces a protocol's list for that split.
"""
from __future__ import annotations

import numpy as np

from raysseg.io import storage
from raysseg.io.images import DatasetError
from raysseg.io.datasets.layout import (IGNORE, Dataset, Output, PrepareOptions, Task, chosen_protocol, label_array,
                                        labelled_output, layout_error, list_or_empty, stem)

COARSE = ("electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
          "outdoor", "person", "sports", "vehicle",  # the 12 thing supercategories (0..11)
          "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile", "wall", "window",
          "building", "ground", "plant", "sky", "solid", "structural", "water")  # the 15 stuff ones (12..26)

# COCO-Stuff id (1-based, as in labels.md) -> supercategory, in runs of consecutive ids. Ids unused since
# COCO 2014 (12 street sign, 26 hat, 29 shoe, 30 eye glasses, 45 plate, 66 mirror, 68 window, 69 desk,
# 71 door, 83 blender, 91 hair brush) keep their supercategory; they do not occur in the maps.
_THINGS = [(1, 1, "person"), (2, 9, "vehicle"), (10, 15, "outdoor"), (16, 25, "animal"), (26, 33, "accessory"),
           (34, 43, "sports"), (44, 51, "kitchen"), (52, 61, "food-things"), (62, 71, "furniture-things"),
           (72, 77, "electronic"), (78, 83, "appliance"), (84, 91, "indoor")]
_STUFF = {  # COCO-Stuff stuff ids 92..182 by supercategory
    "textile": (92, 93, 104, 105, 109, 131, 137, 141, 152, 167, 168),
    "plant": (94, 97, 119, 124, 129, 134, 142, 163, 169),
    "building": (95, 96, 128, 151, 158, 166),
    "furniture-stuff": (98, 107, 108, 110, 112, 123, 130, 133, 156, 161, 165),
    "structural": (99, 113, 138, 146, 164),
    "raw-material": (100, 132, 139, 143),
    "floor": (101, 114, 115, 116, 117, 118),
    "ceiling": (102, 103),
    "sky": (106, 157),
    "ground": (111, 125, 126, 136, 140, 144, 145, 147, 149, 154, 159),
    "water": (120, 148, 155, 178, 179),
    "food-stuff": (121, 122, 153, 170),
    "solid": (127, 135, 150, 160, 162, 182),
    "wall": (171, 172, 173, 174, 175, 176, 177),
    "window": (180, 181),
}


def fine_to_coarse() -> np.ndarray:
    """uint8 [256] lookup: stuffthingmaps value (id - 1) -> coarse class 0..26, IGNORE elsewhere."""
    lut = np.full(256, IGNORE, np.uint8)
    for first, last, name in _THINGS:
        lut[first - 1:last] = COARSE.index(name)
    for name, ids in _STUFF.items():
        lut[np.asarray(ids) - 1] = COARSE.index(name)
    return lut


def coarse_labels(fine: np.ndarray) -> np.ndarray:
    """Fine stuffthingmaps values [H, W] (any int dtype) -> uint8 coarse classes, IGNORE for 255 and unknown ids."""
    values = np.asarray(fine).astype(np.int64)
    return np.where((values >= 0) & (values < 256), fine_to_coarse()[values.clip(0, 255)], IGNORE).astype(np.uint8)


SPLITS = {"train2017": "train", "val2017": "val"}
PROTOCOLS = {
    "all": "every image of images/{train2017,val2017}, or the --image-list files",
    "stego": "train: curated/train2017/Coco164kFull_Stuff_Coarse.txt, val: curated/val2017/Coco164kFull_Stuff_Coarse_7.txt "
             "(STEGO src/data.py, HP dataset/data.py)",
    "picie": "train and val: curated/<split>2017/Coco164kFull_Stuff_Coarse_7.txt, 49,629 / 2,175 images (PiCIE, PGG)",
}
LISTS = {"stego": {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse_7.txt"},
         "picie": {"train": "Coco164kFull_Stuff_Coarse_7.txt", "val": "Coco164kFull_Stuff_Coarse_7.txt"}}
EXPECTED = ("images/{train2017,val2017}/*.jpg and annotations/{train2017,val2017}/*.png (COCO 2017 images and "
            "COCO-Stuff stuffthingmaps_trainval2017.zip)")


def _listed_stems(uri: str) -> list[str]:
    """Image ids of an image-list file: one id, file name or path per line (blank lines and '#' ignored)."""
    names = []
    for line in storage.read_bytes(uri).decode().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name = stem(line.split()[0])
            names.append(name.zfill(12) if name.isdigit() else name)
    return names


def find(src: str, options: PrepareOptions) -> list[Task]:
    unknown = set(options.image_lists) - set(SPLITS.values())
    if unknown:
        raise layout_error("cocostuff27", src, f"image list for unknown split(s) {', '.join(sorted(unknown))}",
                           "--image-list train=FILE or val=FILE")
    protocol = chosen_protocol("cocostuff27", PROTOCOLS, options)
    lists = {split: storage.join(src, "curated", f"{split}2017", name) for split, name in LISTS.get(protocol, {}).items()}
    lists.update(options.image_lists)
    tasks = []
    for source_split, split in SPLITS.items():
        images = {stem(u): u for u in list_or_empty(storage.join(src, "images", source_split), (".jpg", ".jpeg"))}
        if not images:
            continue
        labels = {stem(u): u for u in list_or_empty(storage.join(src, "annotations", source_split), (".png",))}
        if not labels:
            raise layout_error("cocostuff27", src, f"images/{source_split} has no annotations/{source_split}/*.png",
                               EXPECTED)
        wanted = sorted(images)
        if split in lists:
            listed = lists[split]
            if not storage.exists(listed):
                where = (f"--image-list {split}=..." if split in options.image_lists else
                         f"--protocol {protocol}: put IIC's curated/ folder under SRC or give --image-list {split}=FILE")
                raise DatasetError(f"cocostuff27: image list {listed} does not exist ({where}); "
                                   "the file of image ids, e.g. Coco164kFull_Stuff_Coarse_7.txt")
            wanted = _listed_stems(listed)
        for name in wanted:  # a listed or unpaired file that is missing is skipped and listed by convert
            files = {"image": images.get(name, storage.join(src, "images", source_split, f"{name}.jpg")),
                     "label": labels.get(name, storage.join(src, "annotations", source_split, f"{name}.png"))}
            tasks.append(Task(split, name, files))
    if not tasks:
        raise layout_error("cocostuff27", src, "no .jpg under images/train2017 or images/val2017", EXPECTED)
    return tasks


def convert(task: Task, options: PrepareOptions, read) -> list[Output]:
    image = read(task.files["image"])
    fine = label_array(read(task.files["label"]))
    return [labelled_output(task, image, ".jpg", coarse_labels(fine))]


COCOSTUFF27 = Dataset(
    name="cocostuff27", classes=COARSE, expected=EXPECTED,
    mapping="stuffthingmaps value v (COCO-Stuff id v+1) -> its supercategory in the COCO-Stuff hierarchy: "
            "things 0-11, stuff 12-26; 255 and unused values -> 255",
    reference="Caesar, Uijlings, Ferrari, COCO-Stuff: Thing and Stuff Classes in Context, CVPR 2018 (label "
              "hierarchy, labels.md of github.com/nightrome/cocostuff); 27-class use and curated lists: "
              "PiCIE (Cho et al. CVPR 2021), STEGO (Hamilton et al. ICLR 2022), HP (Seong et al. CVPR 2023)",
    find=find, convert=convert,
    lut=lambda: {str(v): int(c) for v, c in enumerate(fine_to_coarse()) if c != IGNORE},
    protocols=PROTOCOLS,
)
