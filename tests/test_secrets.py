"""Secrets never reach MLflow, job submissions or error lines. (A whole training run on S3 whose
secret is searched for in MLflow's store, the checkpoints and Ray's logs:
tests/test_train.py::test_kmeans_from_s3_with_checkpoints_on_s3_and_mlflow.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from raysseg.io import tracking

SECRET = "Zq7-not-a-real-secret-8Xw"


def test_redact_hides_secret_variables_and_url_passwords(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter22")
    text = f"key {SECRET} at https://alice:pa55word@mlflow.example.com/x and hunter22; s3://bucket/a:b@c stays"
    assert tracking.redact(text) == "key *** at https://alice:***@mlflow.example.com/x and ***; s3://bucket/a:b@c stays"


def test_nothing_logged_to_mlflow_holds_the_secret(tmp_path, monkeypatch):
    """Params, tags and text artifacts that would carry the secret are redacted before MLflow
    stores them; the SQLite store and the artifact folder are searched byte by byte."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    run_id, _ = tracking.start_or_resume_run(uri, "secrets", "r", {"data.train": f"s3://b/x?secret={SECRET}"},
                                             tags={"note": f"made with {SECRET}"})
    logger = tracking.RunLogger(uri, run_id)
    logger.set_tag("endpoint", f"https://user:{SECRET}@s3.example.com")
    logger.log_bytes(f"s3://b/img.png\tStorageError: refused {SECRET}\n".encode(), "skipped_files.txt")
    logger.finish()

    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["data.train"] == "s3://b/x?secret=***"
    assert run.data.tags["note"] == "made with ***" and run.data.tags["endpoint"] == "https://user:***@s3.example.com"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "skipped_files.txt" for p in files)
    assert not [str(p) for p in files if SECRET.encode() in p.read_bytes()]


def test_job_submission_never_forwards_credentials():
    """jobs/submit.sh sends this runtime env with every job: the endpoint goes, keys do not."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_SESSION_TOKEN": SECRET + "t", "AWS_ENDPOINT_URL": "http://s3.example.com"}
    script = Path(__file__).parents[1] / "jobs" / "runtime_env.py"
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True).stdout
    assert SECRET not in out and "AKIDEXAMPLE" not in out
    assert json.loads(out)["env_vars"]["AWS_ENDPOINT_URL"] == "http://s3.example.com"


def test_cli_error_lines_are_redacted(tmp_path, monkeypatch, capsys):
    from raysseg.apps.cli import _fail

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert _fail(f"error: something echoed {SECRET}\nmore") == 2
    assert capsys.readouterr().err == "error: something echoed ***\n"
