"""HP on Ray Train with 2 workers: shared pools through the concept bank, resume, NaN stop, pool-size check."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from raysseg.runtime.bank import reads_by_version
from raysseg.config import ConfigError, load_config


def hp_config(tmp_path: Path, synth_data: Path, *overrides: str):
    return load_config("hp_camvid", [
        f"data.train={synth_data}/train", f"data.val={synth_data}/val", "data.image_size=64", "data.n_classes=5",
        "data.ignore_index=255", "data.class_names=[]", f"train.storage={tmp_path}/runs",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db", "train.num_workers=2", "train.batch_size=2",
        "train.run_name=hp-test", "hp.pool_size=6", "hp.renew_every=1", "hp.warmup=0", "hp.sigma=4.0",
        "kmeans.pixels_per_image=16", "train.log_every=1", *overrides,
    ])



def test_two_workers_share_pools_nan_stops_and_resume_restores_the_bank(tmp_path, ray_local, synth_data):
    """One run through three trainings (each Ray Train start costs ~20 s here):
    1. an epoch with 2 workers: both read identical pools at every version;
    2. more epochs at an absurd learning rate: the loss turns NaN, the run stops with one
       line and the last good checkpoint is untouched;
    3. more epochs at a sane rate: resumes from that checkpoint, the bank is restored from
       it (Q_ag not rebuilt, Q_sp versions continue) and the MLflow run is the same."""
    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.runtime.driver import RunFailed, train

    first = train(hp_config(tmp_path, synth_data, "train.epochs=1"))
    seen = reads_by_version(first.bank_trace)
    # 8 images / 2 workers / batch 2 = 2 steps per epoch; Q_sp renewed every step
    assert set(seen) == {("pool", 1), ("sp", 1), ("sp", 2)}
    for (table, version), by_rank in seen.items():
        assert set(by_rank) == {0, 1}, (table, version)
        assert by_rank[0] == by_rank[1], f"ranks saw different {table} v{version}"
    ckpt = read_checkpoint(first.checkpoint)
    assert ckpt["bank"]["tables"]["pool"][1].shape == (6, 384)  # M patches of ViT-S features
    assert ckpt["bank"]["tables"]["sp"][0] == 2

    with pytest.raises(RunFailed) as e:
        train(hp_config(tmp_path, synth_data, "train.epochs=2", "train.lr=1e30", "train.grad_clip=0.0"))
    message = str(e.value)
    assert "\n" not in message and "loss became" in message and "train.lr" in message
    kept = read_checkpoint(first.checkpoint)["state"]
    assert all(torch.equal(ckpt["state"][k], kept[k]) for k in kept)

    second = train(hp_config(tmp_path, synth_data, "train.epochs=2"))
    assert second.run_id == first.run_id
    seen2 = reads_by_version(second.bank_trace)
    assert seen2[("pool", 1)][0] == seen[("pool", 1)][0], "Q_ag must be restored, not rebuilt"
    assert {k for k in seen2 if k[0] == "sp"} == {("sp", 3), ("sp", 4)}, "Q_sp versions continue"
    for by_rank in seen2.values():
        assert len(set(by_rank.values())) == 1
    final = read_checkpoint(second.checkpoint)
    assert {k: final["progress"][k] for k in ("epoch", "step", "clustered")} == {"epoch": 2, "step": 4, "clustered": True}
    # (epoch, step, attempt) of every checkpoint it descends from; the NaN attempt wrote none
    assert [(c["epoch"], c["step"], c["attempt"]) for c in final["progress"]["lineage"]] == [
        (1, 2, 1), (1, 2, 1), (2, 4, 2), (2, 4, 2)]
    client = MlflowClient(second.tracking_uri)
    assert client.get_run(second.run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(second.run_id, "epoch/step")] == [2, 4]


def test_pool_larger_than_the_split_is_rejected_before_ray(tmp_path, synth_data):
    with pytest.raises(ConfigError, match=r"hp.pool_size: M = 50 .* has 8; set hp.pool_size <= 8"):
        from raysseg.engine.inputs import check_inputs

        check_inputs(hp_config(tmp_path, synth_data, "hp.pool_size=50"))
    proc = subprocess.run(
        [sys.executable, "-m", "raysseg.apps.cli", "train", "--config", "hp_camvid", "--set", f"data.train={synth_data}/train",
         "--set", "hp.pool_size=50", "--set", "train.batch_size=2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "hp.pool_size" in proc.stderr
