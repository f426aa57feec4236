"""Ctrl-C / SIGTERM during training: one line saying which checkpoint was kept, the MLflow run KILLED, and the
same command resumes from the newest complete checkpoint without logging any metric step twice."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_local import small_config


def command(cfg, *extra) -> list[str]:
    args = [sys.executable, "-m", "raysseg.apps.cli", "train", "--config", "hp_camvid", *extra]
    for key, value in cfg.flat().items():
        if key.startswith(("data.", "train.", "mlflow.", "hp.", "kmeans.", "model.")) and value != "":
            args += ["--set", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
    return args


def stop_when(proc: subprocess.Popen, marker: str, timeout: float = 400) -> list[str]:
    """Read ``proc``'s output until a line holds ``marker``, SIGTERM it, and return all of its lines."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if marker in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, lines
    lines += proc.stdout.read().splitlines()
    proc.wait(120)
    return lines


def assert_steps_strictly_increase(uri: str, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    steps = {k: [m.step for m in client.get_metric_history(run_id, k)] for k in client.get_run(run_id).data.metrics}
    for key, values in steps.items():
        assert all(a < b for a, b in zip(values, values[1:])), (key, values)
    return steps


def test_sigterm_in_process_keeps_the_newest_checkpoint_and_resumes_without_repeating_steps(synth_data, tmp_path):
    from raysseg.io import tracking

    cfg = small_config("hp", synth_data, tmp_path, "train.epochs=3", "train.checkpoint_every=2")
    run = command(cfg, "--local", "--mlflow")
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = stop_when(proc, "[hp epoch 2/3] 2/3")  # step 5: after the step-4 checkpoint, with step 5 logged
    assert proc.returncode == 130, "\n".join(lines[-15:])
    kept = f"{cfg.train.storage}/{cfg.run_name()}/local_000000004/model.pt"
    assert lines[-1].startswith(f"run {cfg.run_name()} stopped: kept {kept} (epoch 2/3, step 4)"), lines  # as progress
    assert "marked KILLED" in lines[-1] and "run the same command again to resume" in lines[-1]
    uri = cfg.mlflow.tracking_uri
    found = tracking.find_run(uri, cfg.mlflow.experiment, cfg.run_name())
    assert found.info.status == "KILLED"

    again = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {kept} at epoch 1, step 4" in again.stdout
    resumed = tracking.find_run(uri, cfg.mlflow.experiment, cfg.run_name())
    assert resumed.info.run_id == found.info.run_id and resumed.info.status == "FINISHED"
    steps = assert_steps_strictly_increase(uri, found.info.run_id)
    assert steps["train/loss_total"] == list(range(1, 10)) and steps["epoch/loss_total"] == [3, 6, 9]


@pytest.mark.slow  # two Ray runs of 3 epochs: minutes on 2 cores
def test_sigterm_on_ray_keeps_the_newest_complete_checkpoint_and_resumes_from_it(synth_data, tmp_path):
    from raysseg.io import tracking

    cfg = small_config("hp", synth_data, tmp_path, "train.epochs=3")
    run = command(cfg)
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    lines = stop_when(proc, "epoch 2/3:")
    assert proc.returncode == 130, "\n".join(lines[-15:])
    assert lines[-1].startswith(f"run {cfg.run_name()} stopped: kept "), lines
    assert "(end of epoch 2/3, step 6)" in lines[-1] or "(end of epoch 1/3, step 3)" in lines[-1], lines
    found = tracking.find_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.run_name())
    assert found.info.status == "KILLED"

    again = subprocess.run(run, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    kept_step = 6 if "(end of epoch 2/3, step 6)" in lines[-1] else 3
    assert f"step {kept_step}" in again.stdout.split("resumed from", 1)[1].splitlines()[0]
    steps = assert_steps_strictly_increase(cfg.mlflow.tracking_uri, found.info.run_id)
    assert steps["epoch/loss_total"] == [3, 6, 9]
    folders = sorted(f for f in Path(cfg.train.storage, cfg.run_name()).glob("checkpoint_*") if f.is_dir())
    assert 0 < len(folders) <= cfg.train.checkpoints_to_keep and all((f / "model.pt").is_file() for f in folders)
