"""SegSort and visual concepts on Ray Train with 2 workers: the memory bank and the concept
dictionary live in the concept-bank actor, and every worker reads the same version at every step."""
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raysseg.runtime.bank import reads_by_version
from raysseg.config import load_config


def segment_config(tmp_path: Path, synth_data: Path, config: str, *overrides: str):
    return load_config(config, [
        f"data.train={synth_data}/train", f"data.val={synth_data}/val", "data.image_size=64", "data.n_classes=5",
        "data.ignore_index=255", "data.class_names=[]", f"train.storage={tmp_path}/runs",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db", "train.num_workers=2", "train.batch_size=2",
        "kmeans.pixels_per_image=20", "model.fpn_dim=32", "train.log_every=1", "eval.probe_epochs=5",
        "kmeans.n_clusters=0", "segments.min_size=20", "segsort.embed_dim=8", "concepts.n_concepts=16",
        *overrides,
    ])


def _same_for_both_ranks(trace: list[dict]) -> dict:
    seen = reads_by_version(trace)
    for (table, version), by_rank in seen.items():
        assert set(by_rank) == {0, 1}, (table, version)
        assert by_rank[0] == by_rank[1], f"ranks saw different {table} v{version}"
    return seen


def test_concepts_two_workers_share_memory_and_dictionary_versions_and_resume(tmp_path, ray_local, synth_data):
    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.runtime.driver import train

    # 8 images, 2 workers, batch 2: 2 steps per epoch
    first = train(segment_config(tmp_path, synth_data, "concepts_camvid", "train.epochs=1", "train.run_name=vc"))
    seen = _same_for_both_ranks(first.bank_trace)
    assert {v for t, v in seen if t == "memory"} == {1, 2, 3}  # steps 0, 1 read v1, v2; the epoch end v3
    assert {v for t, v in seen if t == "concepts"} == {1, 2, 3}
    ckpt = read_checkpoint(first.checkpoint)
    bank = ckpt["bank"]
    assert bank["tables"]["concepts"][0] == 3
    assert np.array_equal(ckpt["state"]["concepts"].numpy(), bank["tables"]["concepts"][1])  # the model carries it
    assert np.allclose(np.linalg.norm(bank["tables"]["concepts"][1], axis=1), 1, atol=1e-5)
    # memory = the prototypes of the last 2 global batches (both views of 2 x 2 images each)
    assert len(bank["rings"]["memory"]) == 2 and len(bank["tables"]["memory"][1]) == sum(map(len, bank["rings"]["memory"]))
    assert bank["dictionary"]["cooccurrence"].sum() > 0

    metrics = MlflowClient(first.tracking_uri).get_run(first.run_id).data.metrics
    for key in ("epoch/loss_local", "epoch/loss_vq", "epoch/loss_concept_pull", "epoch/loss_cooccurrence",
                "epoch/concepts_used", "epoch/time_bank_s"):
        assert np.isfinite(metrics[key]), key

    # more epochs under the same run name: the bank (ring, dictionary) comes back from the checkpoint
    again = train(segment_config(tmp_path, synth_data, "concepts_camvid", "train.epochs=2", "train.run_name=vc"))
    assert again.run_id == first.run_id
    seen = _same_for_both_ranks(again.bank_trace)
    assert {v for t, v in seen if t == "memory"} == {3, 4, 5}
    progress = read_checkpoint(again.checkpoint)["progress"]
    assert {k: progress[k] for k in ("epoch", "step", "clustered")} == {"epoch": 2, "step": 4, "clustered": True}
    assert [(c["epoch"], c["step"], c["attempt"]) for c in progress["lineage"]] == [
        (1, 2, 1), (1, 2, 1), (2, 4, 2), (2, 4, 2)]


@pytest.mark.slow  # the visual-concepts 2-worker test covers the same trainer and bank tables
def test_segsort_two_workers_then_evaluate(tmp_path, ray_local, synth_data):
    from raysseg.runtime.evaluate import evaluate
    from raysseg.runtime.driver import train

    result = train(segment_config(tmp_path, synth_data, "segsort_camvid", "train.epochs=1"))
    seen = _same_for_both_ranks(result.bank_trace)
    assert set(seen) == {("memory", 1), ("memory", 2), ("memory", 3)}
    metrics = MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
    assert np.isfinite(metrics["epoch/loss_local"]) and metrics["epoch/memory_prototypes"] > 0
    report = evaluate(result.checkpoint, crf=False, probe=False, retrieval=False)
    assert set(report["scores"]) == {"clusters"} and report["retrieval_index"] is None  # retrieval switched off
    assert 0.0 <= report["scores"]["clusters"]["miou"] <= 1.0


@pytest.mark.parametrize("override, message", [
    (["segments.method=watershed"], "segments.method"),
    (["concepts.n_concepts=1"], "concepts.n_concepts"),
    (["segsort.kappa=0"], "segsort.kappa"),
])
def test_segment_config_errors_name_the_key(override, message):
    from raysseg.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("concepts_camvid", override)
