"""Quality on real street scenes (CamVid, ../shared): train on the training split, score on val."""
import numpy as np
import pytest

from raysseg.config import load_config


def camvid_config(name, tmp_path, camvid, *overrides):
    return load_config(name, [f"data.train={camvid}/train", f"data.val={camvid}/val", f"train.storage={tmp_path}/runs",
                              f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db", *overrides])


@pytest.mark.slow
def test_kmeans_baseline_beats_the_majority_class(tmp_path, ray_local, camvid, capsys):
    from raysseg.runtime.evaluate import evaluate
    from raysseg.runtime.driver import train

    result = train(camvid_config("kmeans_camvid", tmp_path, camvid, "data.image_size=128"))
    report = evaluate(result.checkpoint, crf=False, probe=False, retrieval=False, out=str(tmp_path / "eval"))
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "miou" in printed and "pedestrian" in printed  # the per-class table
    conf = np.array(report["confusion"]["clusters"])
    majority = conf.sum(0).max() / conf.sum()
    scores = report["scores"]["clusters"]
    print(f"k-means on CamVid val: accuracy {scores['accuracy']:.3f} (majority class {majority:.3f}), "
          f"mIoU {scores['miou']:.3f}")
    assert report["n_images"] == 101
    assert scores["accuracy"] > majority


@pytest.mark.slow
def test_hp_beats_kmeans_on_the_same_frozen_features(tmp_path, ray_local, camvid):
    """Both use the same random-init ViT-S/16 (seed 0); HP trains its heads on the training split only."""
    from raysseg.runtime.evaluate import evaluate
    from raysseg.runtime.driver import train

    scores = {}
    for name in ("kmeans_camvid", "hp_camvid"):
        result = train(camvid_config(name, tmp_path, camvid))
        report = evaluate(result.checkpoint, out=str(tmp_path / name))
        scores[name] = report["scores"]
        print(name, {v: (round(100 * s["accuracy"], 1), round(100 * s["miou"], 1)) for v, s in report["scores"].items()})
    assert scores["hp_camvid"]["clusters"]["miou"] > scores["kmeans_camvid"]["clusters"]["miou"]
