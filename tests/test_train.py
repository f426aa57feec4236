"""End to end on the real parts: a local Ray with 2 Train workers, the SeaweedFS S3 server, MLflow (SQLite)."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from raysseg.config import load_config


def synth_config(tmp_path: Path, train: str, val: str, *overrides: str, config: str = "kmeans_synth"):
    return load_config(config, [
        f"data.train={train}", f"data.val={val}", "data.image_size=64", f"train.storage={tmp_path}/runs",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db", "train.num_workers=2", "kmeans.pixels_per_image=16",
        "eval.probe_epochs=5", "eval.overlays=2", *overrides,
    ])


def test_kmeans_from_s3_with_checkpoints_on_s3_and_mlflow(tmp_path, ray_local, s3_server, synth_data, capfd):
    from raysseg.io.images import upload
    from raysseg.runtime.evaluate import evaluate
    from raysseg.runtime.driver import train

    s3_server.create_bucket("quick")
    upload(str(synth_data), "s3://quick/synth")
    cfg = synth_config(tmp_path, "s3://quick/synth/train", "s3://quick/synth/val", "train.storage=s3://quick/runs")
    result = train(cfg)

    assert result.checkpoint.startswith("s3://quick/runs/") and result.checkpoint.endswith("/model.pt")
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "kmeans" and run.data.params["train.num_workers"] == "2"
    assert run.data.metrics["skipped_files"] == 0
    artifacts = [a.path for a in client.list_artifacts(result.run_id, "checkpoint")]
    assert artifacts == ["checkpoint/model.pt"]
    assert [a.path for a in client.list_artifacts(result.run_id, "overlays")] == ["overlays/final.png"]

    report = evaluate(result.checkpoint, out=str(tmp_path / "eval"))
    assert report["n_images"] == 4 and set(report["scores"]) == {"clusters", "clusters_crf", "probe", "probe_crf",
                                                                   "retrieval", "retrieval_crf"}
    for scores in report["scores"].values():
        assert 0 < scores["accuracy"] <= 1 and len(scores["per_class_iou"]) == 5
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["eval/val/clusters_miou"] == pytest.approx(report["scores"]["clusters"]["miou"])
    assert metrics["eval/val/retrieval_miou"] == pytest.approx(report["scores"]["retrieval"]["miou"])
    eval_files = {a.path for a in client.list_artifacts(result.run_id, "eval/val")}
    assert {"eval/val/report.json", "eval/val/confusion_clusters.png", "eval/val/overlays_clusters.png"} <= eval_files

    # predict writes label maps and overlays at each image's own size
    from raysseg.apps.predict import predict

    written = predict(result.checkpoint, "s3://quick/synth/val/images", str(tmp_path / "pred"))
    assert written["written"] == 4
    for path in sorted((synth_data / "val/images").glob("*.png")):
        label = Image.open(tmp_path / "pred/labels" / path.name)
        assert label.size == Image.open(path).size
        assert np.asarray(label).max() < 5
        assert Image.open(tmp_path / "pred/overlays" / path.name).size == label.size

    # the same run again is recognised as finished instead of training twice
    again = train(cfg)
    assert again.already_finished and again.run_id == result.run_id

    # the S3 secret is nowhere: MLflow's store and artifacts, the checkpoints, Ray's logs, the output
    from raysseg.io.storage import copy_tree

    copy_tree("s3://quick/runs", str(tmp_path / "checkpoints"))
    secret = s3_server.secret_key.encode()
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    files = [p for root in (tmp_path, session) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "mlruns.db" for p in files) and any(p.name == "model.pt" for p in files)
    assert any(p.suffix in (".log", ".out", ".err") for p in files if session in p.parents)
    leaks = [str(p) for p in files if secret in p.read_bytes()]
    assert not leaks, f"the S3 secret is in {leaks}"
    out, err = capfd.readouterr()
    assert s3_server.secret_key not in out + err


@pytest.mark.slow  # skipping and counting at the Ray Data level: tests/test_data.py
def test_bad_files_are_skipped_counted_and_reported(tmp_path, ray_local, synth_data):
    from raysseg.runtime.evaluate import evaluate
    from raysseg.runtime.driver import train

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    (data / "train/images/zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "train/images/zz_empty.png").write_bytes(b"")
    (data / "val/images/zz_empty.png").write_bytes(b"")
    (data / "val/labels/zz_empty.png").write_bytes(b"")
    first = sorted((data / "val/labels").glob("*.png"))[0]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(first)  # wrong size for its image
    cfg = synth_config(tmp_path, str(data / "train"), str(data / "val"))
    result = train(cfg)

    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.run_id).data.metrics["skipped_files"] == 2
    skipped_txt = Path(client.download_artifacts(result.run_id, "skipped_files.txt", str(tmp_path))).read_text()
    assert "zz_corrupt.png" in skipped_txt and "zz_empty.png" in skipped_txt

    report = evaluate(result.checkpoint, crf=False, probe=False, out=str(tmp_path / "eval"))
    assert report["skipped_files"] == 2 and report["n_images"] == 3
    reasons = " ".join(e for _, e in report["skipped"])
    assert first.name in " ".join(p for p, _ in report["skipped"]) and "label" in reasons


def test_wrong_s3_secret_is_one_line_naming_endpoint_and_variables(tmp_path, s3_server):
    env = {**__import__("os").environ, **s3_server.client_env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    proc = subprocess.run(
        [sys.executable, "-m", "raysseg.apps.cli", "train", "--config", "kmeans_synth",
         "--set", "data.train=s3://quick/synth/train"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert s3_server.endpoint in lines[0] and "AWS_SECRET_ACCESS_KEY" in lines[0] and "AWS_ACCESS_KEY_ID" in lines[0]
