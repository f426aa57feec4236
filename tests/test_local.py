"""The in-process runner: every method trains a few steps in this process, without Ray."""
from pathlib import Path

import numpy as np
import pytest
import torch

from raysseg.config import load_config
from raysseg.methods.registry import trained_methods

# Small settings per method: 3 steps (batch 2 of 6 images, one epoch), codes of a 64 px image.
SMALL = {
    "hp": ["hp.pool_size=6", "hp.renew_every=2", "hp.warmup=1", "hp.sigma=4.0"],
    "picie": ["model.fpn_dim=16", "kmeans.init_sample=200", "kmeans.pixels_per_image=20"],
    "pgg": ["model.fpn_dim=16", "kmeans.init_sample=200", "kmeans.pixels_per_image=20", "pgg.global_clusters=4"],
    "segsort": ["model.fpn_dim=16", "segsort.embed_dim=8", "segments.min_size=20"],
    "concepts": ["model.fpn_dim=16", "segsort.embed_dim=8", "segments.min_size=20", "concepts.n_concepts=16",
                 "concepts.warmup=1"],
}


def small_config(method: str, synth_data: Path, tmp_path: Path, *overrides: str):
    return load_config(f"{method}_camvid", [
        f"data.train={synth_data}/train", f"data.val={synth_data}/val", "data.image_size=64", "data.n_classes=5",
        "data.ignore_index=255", "data.class_names=[]", "data.limit=6", "train.num_workers=1", "train.batch_size=2",
        "train.epochs=1", "train.log_every=1", "kmeans.n_clusters=5", "kmeans.pixels_per_image=20",
        f"train.storage={tmp_path}/runs", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
        *SMALL.get(method, []), *overrides])


@pytest.mark.parametrize("method", trained_methods())
def test_three_steps_in_process(method, synth_data, tmp_path):
    from raysseg.engine.local import train_local
    from raysseg.io.checkpoints import load_segmenter

    result = train_local(small_config(method, synth_data, tmp_path))
    seg, ckpt = load_segmenter(result.checkpoint)
    assert ckpt["progress"]["step"] == 3 and ckpt["progress"]["clustered"] and ckpt["finished"]
    assert np.isfinite(result.metrics["loss_total"]) and result.metrics["final"] == 1
    assert seg.cluster_map(torch.zeros(1, 64, 64, 3, dtype=torch.uint8)).shape == (1, 64, 64)
    assert result.trace  # the trainer read its shared tables


def test_moco_pretraining_three_steps_in_process(synth_data, tmp_path):
    from raysseg.engine.local import pretrain_local

    cfg = load_config("pgg_camvid", [
        f"data.train={synth_data}/train", "data.image_size=32", "data.limit=6", "train.num_workers=1",
        f"train.storage={tmp_path}/runs", "pretrain.epochs=3", "pretrain.batch_size=2", "pretrain.queue=8",
        "pretrain.crop_size=32", "model.fpn_dim=16"])
    result = pretrain_local(cfg)
    state = torch.load(result.checkpoint, weights_only=False)
    assert state["progress"] == {"epoch": 3, "step": 9} and np.isfinite(result.metrics["loss"])
    assert int(state["moco"]["queue_ptr"]) == (9 * 2) % 8  # every real key entered the queue
