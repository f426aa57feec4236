"""PiCIE / PGG + CAE on Ray Train with 2 workers: offline clustering on Ray between epochs,
identical centroids and pseudo labels on every worker, evaluation of the result."""
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raysseg.runtime.bank import reads_by_version
from raysseg.config import ConfigError, load_config


def pgg_config(tmp_path: Path, synth_data: Path, *overrides: str):
    return load_config("pgg_camvid", [
        f"data.train={synth_data}/train", f"data.val={synth_data}/val", "data.image_size=64", "data.n_classes=5",
        "data.ignore_index=255", "data.class_names=[]", f"train.storage={tmp_path}/runs",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db", "train.num_workers=2", "train.batch_size=2",
        "kmeans.pixels_per_image=20", "kmeans.init_sample=200", "pgg.global_clusters=4", "model.fpn_dim=32",
        "train.log_every=1", "eval.probe_epochs=5", "kmeans.n_clusters=0", *overrides,
    ])



def test_pgg_two_workers_train_against_identical_centroids_and_pseudo_labels(tmp_path, ray_local, synth_data):
    from raysseg.runtime.evaluate import evaluate
    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.runtime.driver import train

    # 7 images: Ray's equal split over 2 workers leaves one image out of each pass
    result = train(pgg_config(tmp_path, synth_data, "train.epochs=2", "data.limit=7"))
    seen = reads_by_version(result.bank_trace)
    assert set(seen) == {("pgg_labels", 1), ("centroids", 1), ("centroids", 2)}
    for (table, version), by_rank in seen.items():
        assert set(by_rank) == {0, 1}, (table, version)
        assert by_rank[0] == by_rank[1], f"ranks saw different {table} v{version}"
    ckpt = read_checkpoint(result.checkpoint)
    labels = ckpt["bank"]["tables"]["pgg_labels"][1]
    assert labels.shape == (7, 6, 2)  # one row per training image x 6 pyramid views x (label, kept)
    assert labels[..., 1].sum() == int(np.ceil(0.4 * 36))  # 40% of the views of the 6 images read
    assert (labels[..., 1].sum(1) == 0).sum() >= 1  # the image left out has no kept view
    centroids = ckpt["bank"]["tables"]["centroids"][1]
    assert centroids.shape == (2, 5, 32)  # one set per view, K clusters of the 32-d embedding
    progress = ckpt["progress"]  # 3 images per worker, batch 2: 1 step per epoch
    assert {k: progress[k] for k in ("epoch", "step", "clustered")} == {"epoch": 2, "step": 2, "clustered": True}
    assert [(c["epoch"], c["step"], c["attempt"]) for c in progress["lineage"]] == [(1, 1, 1), (2, 2, 1), (2, 2, 1)]

    metrics = MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
    for key in ("epoch/loss_within", "epoch/loss_cross", "epoch/loss_global", "epoch/cluster_mean_cosine",
                "epoch/time_cluster_assign_s"):
        assert np.isfinite(metrics[key]), key

    report = evaluate(result.checkpoint, crf=False, probe=False)
    assert 0.0 <= report["scores"]["clusters"]["accuracy"] <= 1.0


@pytest.mark.parametrize("override, message", [
    (["model.backbone=vit_small_patch16"], "trains a ResNet-FPN"),
    (["model.frozen=true"], "set model.frozen=false"),
    (["pgg.guidance=pyramids"], "pgg.guidance"),
    (["pgg.keep_fraction=0"], "pgg.keep_fraction"),
])
def test_pgg_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("pgg_camvid", override)


def test_ablation_switches_build_the_matching_model():
    from raysseg.methods.registry import build_segmenter

    full = build_segmenter(load_config("pgg_camvid", ["model.fpn_dim=16", "pgg.global_clusters=7"]))
    assert full.head.cae is not None and full.head.cam is not None and full.stride == 8
    assert full.head.cam(__import__("torch").zeros(2, 16)).shape == (2, 7)
    bare = build_segmenter(load_config("pgg_camvid", ["model.fpn_dim=16", "pgg.cae=false", "pgg.guidance=none"]))
    assert bare.head.cae is None and bare.head.cam is None
    picie = build_segmenter(load_config("picie_camvid", ["model.fpn_dim=16"]))
    assert picie.head is None and picie.stride == 4
