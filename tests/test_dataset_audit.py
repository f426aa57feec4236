"""The label mappings of `raysseg data prepare` against values recorded from the authors' sources (literals
written down here once, so an edit of a mapping cannot drift from the papers' code silently)."""
import numpy as np
import pytest

from raysseg.io.datasets import cityscapes, cocostuff, potsdam, voc
from raysseg.io.datasets.layout import IGNORE

# COCO-Stuff stuffthingmaps value v (COCO-Stuff id v + 1, 0..181) -> coarse class, in v order. Recorded from
# STEGO src/data.py (Coco.fine_to_coarse, github.com/mhamilton723/STEGO); HP dataset/data.py
# (github.com/hynnsk/HP) holds the same dict and PiCIE's fine_to_coarse_dict.pickle
# ('fine_index_to_coarse_index', github.com/janghyuncho/PiCIE) the same values.
COCO_FINE_TO_COARSE = [
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6,  # 0..29
    6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2,  # 30..59
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4,  # 60..89
    4, 17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13,
    13, 22, 26,  # 90..119
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21,
    26, 21, 24,  # 120..149
    20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18,
    26, 26, 19, 19, 24,  # 150..181
]
# STEGO src/train_segmentation.py get_class_labels("cocostuff27"): the coarse names in class order
COCO_COARSE_NAMES = ["electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
                     "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food", "furniture", "rawmaterial",
                     "textile", "wall", "window", "building", "ground", "plant", "sky", "solid", "structural", "water"]

# cityscapesScripts helpers/labels.py (github.com/mcordts/cityscapesScripts): (id, name) of ids 7..33, the
# non-void categories; STEGO's CityscapesSeg (src/data.py) subtracts first_nonvoid = 7 and drops what falls below.
CITYSCAPES_IDS = [(7, "road"), (8, "sidewalk"), (9, "parking"), (10, "rail track"), (11, "building"), (12, "wall"),
                  (13, "fence"), (14, "guard rail"), (15, "bridge"), (16, "tunnel"), (17, "pole"), (18, "polegroup"),
                  (19, "traffic light"), (20, "traffic sign"), (21, "vegetation"), (22, "terrain"), (23, "sky"),
                  (24, "person"), (25, "rider"), (26, "car"), (27, "truck"), (28, "bus"), (29, "caravan"),
                  (30, "trailer"), (31, "train"), (32, "motorcycle"), (33, "bicycle")]
CITYSCAPES_VOID = [0, 1, 2, 3, 4, 5, 6]  # unlabeled .. ground, category 'void' in labels.py

# IIC code/datasets/segmentation/util/potsdam_prepare.py (github.com/xu-ji/IIC) colour_dict: ISPRS colour -> its
# 6 classes; STEGO src/data.py Potsdam.fine_to_coarse: those 6 -> the 3 of Potsdam-3
POTSDAM_IIC_COLOURS = {(255, 255, 255): 0, (0, 0, 255): 1, (0, 255, 255): 2, (0, 255, 0): 3, (255, 255, 0): 4,
                       (255, 0, 0): 5}
POTSDAM_STEGO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}
# mmsegmentation tools/dataset_converters/potsdam.py splits['val'] (github.com/open-mmlab/mmsegmentation): the 14
# ISPRS test tiles; its 24 'train' tiles are the labelled ones (IIC: NUM_SOURCE_GT = 24 of NUM_SOURCE_IMGS = 38)
POTSDAM_TEST_TILES = ["5_15", "6_15", "6_13", "3_13", "4_14", "6_14", "5_14", "2_13", "4_15", "2_14", "5_13", "4_13",
                      "3_14", "7_13"]

# SegSort misc/colormapvoc.mat (github.com/jyhjinghwang/SegSort; the VOC devkit's VOClabelcolormap x 255): the
# colours of indices 0..20 and of 255 (the void border)
VOC_COLOURS = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
               (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
               (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128)]
VOC_BORDER = (224, 224, 192)
# STEGO src/train_segmentation.py get_class_labels("voc") (the devkit's class order)
VOC_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def test_cocostuff_fine_to_coarse_is_stegos_table():
    lut = cocostuff.fine_to_coarse()
    assert lut[:182].tolist() == COCO_FINE_TO_COARSE
    assert (lut[182:] == IGNORE).all()  # unused values and 255 (unlabeled)
    names = [n.replace("-things", "").replace("-stuff", "").replace("-", "") for n in cocostuff.COARSE]
    assert names == COCO_COARSE_NAMES
    fine = np.array([[0, 90, 91, 181, 255, 200]])
    assert cocostuff.coarse_labels(fine).tolist() == [[9, 4, 17, 24, IGNORE, IGNORE]]


def test_cityscapes_ids_are_cityscapesscripts_non_void_ids():
    assert [(cityscapes.FIRST_ID + i, n) for i, n in enumerate(cityscapes.CLASSES)] == CITYSCAPES_IDS
    lut = cityscapes.id_lookup()
    assert [int(lut[i]) for i, _ in CITYSCAPES_IDS] == list(range(27))
    assert (lut[CITYSCAPES_VOID] == IGNORE).all() and (lut[34:] == IGNORE).all()


def test_potsdam_colours_are_iics_merged_as_stego():
    expected = {colour: POTSDAM_STEGO_COARSE[fine] for colour, fine in POTSDAM_IIC_COLOURS.items()}
    assert potsdam.COLOURS == expected
    pixels = np.array([list(POTSDAM_IIC_COLOURS) + [(0, 0, 0)]], np.uint8)
    assert potsdam.potsdam3_labels(pixels).tolist() == [[expected[c] for c in POTSDAM_IIC_COLOURS] + [IGNORE]]
    assert sorted(potsdam.ISPRS_TEST_TILES) == sorted(POTSDAM_TEST_TILES)


def test_voc_palette_and_classes_are_the_devkits():
    pal = voc.palette()
    assert [tuple(c) for c in pal[:21].tolist()] == VOC_COLOURS and tuple(pal[255].tolist()) == VOC_BORDER
    assert list(voc.CLASSES) == VOC_NAMES
    colours = np.array([VOC_COLOURS + [VOC_BORDER]], np.uint8)
    assert voc.voc_labels(colours).tolist() == [list(range(21)) + [IGNORE]]


# --------------------------------------------------------------------------- evaluation protocols of the paper configs

# (config, eval.image_size, eval.crf, eval.probe, eval.retrieval), from the authors' released evaluation:
# HP build.py build_dataset (mode "val": get_transform(320, ..., "center")) and json/server/*.json
# ("is_crf": true, "extra_clusters": 0), as STEGO src/eval_segmentation.py (res 320, run_crf); PiCIE
# sh_files/test_picie.sh (--res 320, K_test 27) and commons.py evaluate (no CRF, no probe); PGG sec. 5.1 (no post
# process); SegSort bashscripts/voc12/train_segsort_unsup.sh (K_IN_NEAREST_NEIGHBORS=15; whole images, so
# data.image_size); the visual-concepts supplement (k-means + retrieval and a linear classifier).
PAPER_EVALUATION = [
    *[(f"hp_{d}{v}", 320, True, True, False) for d in ("cocostuff", "cityscapes", "potsdam") for v in ("", "_released")],
    ("picie_cocostuff", 320, False, True, False),
    ("pgg_cocostuff", 320, False, True, False),
    ("segsort_voc", 0, False, False, True),
    ("concepts_voc", 0, False, True, True),
]


def test_paper_configs_carry_the_released_evaluation():
    from raysseg.config import load_config

    for name, size, crf, probe, retrieval in PAPER_EVALUATION:
        cfg = load_config(name)
        assert (cfg.eval.image_size, cfg.eval.crf, cfg.eval.probe, cfg.eval.retrieval) == (size, crf, probe,
                                                                                             retrieval), name
        assert cfg.n_clusters == cfg.data.n_classes, name  # extra_clusters 0 / K_test = the classes
    assert load_config("segsort_voc").eval.retrieval_k == 15
    cfg = load_config("hp_cocostuff_released")
    assert cfg.eval.protocol(cfg, crf=True, probe=True, retrieval=False) == (
        "config hp_cocostuff_released; 320 px (short side resized, centred square); 27 clusters (k-means after "
        "training) Hungarian-matched to 27 classes, unmatched clusters' pixels counted wrong; dense CRF (10 "
        "iterations, STEGO's and HP's kernels) on each variant; linear probe fitted after training (Adam, 50 "
        "epochs over 400 pixels per training image)")


@pytest.mark.slow
def test_evaluate_prints_its_protocol_and_scores_at_eval_image_size(tmp_path, ray_local, synth_data, capsys):
    """k-means trained on 32 px crops, evaluated with eval.image_size 48: every val pixel of the 48 x 48 centred
    squares is scored (the synthetic labels have no ignored pixel)."""
    from raysseg.config import load_config
    from raysseg.engine.local import train_local
    from raysseg.runtime.evaluate import evaluate

    cfg = load_config("kmeans_synth", [
        f"data.train={synth_data}/train", f"data.val={synth_data}/val", "data.image_size=32", "eval.image_size=48",
        f"train.storage={tmp_path}/runs", "train.num_workers=1", "kmeans.pixels_per_image=16", "eval.crf=false",
        "eval.probe=false", "eval.retrieval=false", "eval.overlays=0"])
    result = train_local(cfg)
    capsys.readouterr()
    report = evaluate(result.checkpoint, out=str(tmp_path / "eval"), log_to_mlflow=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[evaluate] protocol:")]
    assert lines == [f"[evaluate] protocol: config kmeans_synth; 48 px (short side resized, centred square); 5 clusters "
                     "(k-means after training) Hungarian-matched to 5 classes, unmatched clusters' pixels counted "
                     "wrong; no CRF"]
    assert np.asarray(report["confusion"]["clusters"]).sum() == report["n_images"] * 48 * 48
