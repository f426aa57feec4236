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
    "stego": ["stego.neighbours=3", "stego.points=4", "model.code_dim=16"],
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
    assert result.trace or method == "stego"  # the trainer read its shared tables (STEGO shares only gradients)


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


class StopAtEpoch:
    """A shard that stops the run (as Ctrl-C does) when it is first read in epoch ``stop`` (0-based)."""

    def __init__(self, shard, stop: int):
        self.shard, self.stop = shard, stop

    @property
    def epoch(self):
        return self.shard.epoch

    @epoch.setter
    def epoch(self, value):
        self.shard.epoch = value

    def iter_batches(self, *args, **kwargs):
        if self.shard.epoch == self.stop:
            raise KeyboardInterrupt
        return self.shard.iter_batches(*args, **kwargs)


# hp (crops seeded per epoch) and picie (order shuffled per epoch) in the default run; the others are slow
@pytest.mark.parametrize("method", [m if m in ("hp", "picie") else pytest.param(m, marks=pytest.mark.slow)
                                    for m in trained_methods()])
def test_a_run_stopped_after_an_epoch_and_resumed_ends_where_an_uninterrupted_run_ends(method, synth_data, tmp_path):
    """Every random choice of an epoch (crops, order, dropout) comes from (seed, epoch) or from the checkpoint:
    a run stopped after epoch 1 and resumed has the uninterrupted run's weights and scores."""
    from raysseg.engine.inputs import run_plan
    from raysseg.engine.local import local_shards, train_local
    from raysseg.engine.loop import RunStopped
    from raysseg.io.checkpoints import read_checkpoint

    fresh = train_local(small_config(method, synth_data, tmp_path, "train.epochs=2", "train.run_name=fresh"))
    cfg = small_config(method, synth_data, tmp_path, "train.epochs=2", "train.run_name=resumed")
    shards = local_shards(cfg, run_plan(cfg)[1])
    shards["train"] = StopAtEpoch(shards["train"], stop=1)
    with pytest.raises(RunStopped):
        train_local(cfg, datasets=shards)
    resumed = train_local(cfg)
    a, b = read_checkpoint(fresh.checkpoint), read_checkpoint(resumed.checkpoint)
    assert a["progress"]["step"] == b["progress"]["step"] == 6
    assert [entry["attempt"] for entry in b["progress"]["lineage"]] == [1, 2, 2]  # it really was resumed
    differ = [key for key, value in a["state"].items() if not torch.equal(value, b["state"][key])]
    assert differ == []
    for key in ("loss_total", "view_nmi", "cluster_mean_cosine"):
        assert fresh.metrics[key] == resumed.metrics[key], key
