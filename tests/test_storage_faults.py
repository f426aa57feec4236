"""Storage faults inside Ray Train's own storage path (checkpoint uploads, Ray's snapshot and marker files),
with the real parts: the session's SeaweedFS server (``s3_server``) stopped and started again, a real local Ray
(``ray_local``), MLflow on SQLite, and a small tmpfs mounted as a full disk. RELIABILITY.md lists each case."""
from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from raysseg.config import load_config
from raysseg.io import storage
from tests.test_faults import _in_background


def _sets(tmp_path: Path, data: Path, run: str, *overrides: str) -> list[str]:
    """HP on 64 px images, 1 worker, batch 2 (4 steps an epoch on 8 images), ~90 MB checkpoints."""
    return [f"data.train={data}/train", f"data.val={data}/val", "data.image_size=64", "data.n_classes=5",
            "data.ignore_index=255", "data.class_names=[]", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
            "train.num_workers=1", "train.batch_size=2", f"train.run_name={run}", "hp.pool_size=6", "hp.renew_every=1",
            "hp.warmup=0", "hp.sigma=4.0", "kmeans.pixels_per_image=16", "train.log_every=1", *overrides]


def _hp(tmp_path: Path, data: Path, run: str, *overrides: str):
    return load_config("hp_camvid", _sets(tmp_path, data, run, *overrides))


def _cli(sets: list[str], capsys) -> tuple[int, str]:
    """``raysseg train --config hp_camvid --set ...`` in this process (on the session's Ray): (exit code, the
    error line)."""
    from raysseg.apps.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "hp_camvid", *sum((["--set", s] for s in sets), [])])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return e.value.code, errors[0]


def _mlflow_status(tmp_path: Path, cfg) -> str:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    [run] = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
                               f"tags.mlflow.runName = '{cfg.run_name()}'")
    return run.info.status


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A tmpfs of ``size`` mounted at ``where`` (a real full disk); skips where mounting is not allowed (not root)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _wait(condition, what: str, run: tuple, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert run[0].is_alive(), f"the run ended before {what}: {run[1]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _checkpoints(root: str) -> list[str]:
    try:
        return [u for u in storage.list_files(root, suffixes=("model.pt",), recursive=True) if "/checkpoint_" in u]
    except storage.StorageError:
        return []


def _loads(uri: str) -> dict:
    import io

    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=False)


# ---------------------------------------------------------------- the filesystem handed to Ray


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs."""
    with tmpfs(tmp_path / "disk", "3m") as where:
        yield where


def test_rays_filesystem_writes_atomically_and_names_the_path_of_a_full_disk(small_disk, tmp_path):
    """What Ray Train writes through ``ray_filesystem`` on a full disk: one line naming the file, no file
    (whole or partial) under its name, no temp file left; a missing file stays Ray's FileNotFoundError; it
    pickles (Ray ships it to its processes)."""
    import pickle

    import pyarrow.fs as pafs

    fs, root = storage.ray_filesystem(str(small_disk / "runs"))
    assert pickle.loads(pickle.dumps(fs)) == fs
    with fs.open_output_stream(f"{root}/r/checkpoint_manager_snapshot.json") as f:
        f.write(b"{}")
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{root}/r/nothing")
    (tmp_path / "checkpoint").mkdir()
    big = tmp_path / "checkpoint/model.pt"
    big.write_bytes(os.urandom(4 << 20))
    for write in (lambda: storage.guarded(fs).put_file(f"{root}/r/checkpoint_1/model.pt", str(big)),
                  lambda: pafs.copy_files(str(big.parent), f"{root}/r/checkpoint_2", destination_filesystem=fs),
                  lambda: fs.open_output_stream(f"{root}/r/checkpoint_manager_snapshot.json").write(big.read_bytes())):
        with pytest.raises(storage.StorageError) as e:
            write()
        message = str(e.value)
        assert "\n" not in message and f"{root}/r/" in message and "no space left" in message
        assert "run the same command again" in message
    left = sorted(str(p.relative_to(small_disk)) for p in small_disk.rglob("*") if p.is_file())
    assert left == ["runs/r/checkpoint_manager_snapshot.json"]  # the old content, whole
    assert (small_disk / "runs/r/checkpoint_manager_snapshot.json").read_bytes() == b"{}"


# ---------------------------------------------------------------- whole Ray runs


@pytest.mark.slow  # about 60 s: a Ray run with a 15 s outage
def test_an_s3_outage_during_the_checkpoint_upload_is_ridden_through(tmp_path, ray_local, s3_server, synth_data,
                                                                     capfd):
    """Checkpoints on S3; the server is stopped once Ray Train has started the run (its marker file is there)
    and started again 15 s later. The worker's checkpoint upload waits for it (its warning line is printed)
    and the run finishes with a checkpoint that loads, the MLflow run FINISHED."""
    from raysseg.runtime.driver import train

    s3_server.create_bucket("outage")
    cfg = _hp(tmp_path, synth_data, "outage", "train.epochs=1", "train.storage=s3://outage/runs")
    marker = f"s3://outage/runs/{cfg.run_name()}/.validate_storage_marker"
    run = _in_background(train, cfg)
    _wait(lambda: storage.exists(marker), "Ray Train's storage marker", run)
    s3_server.stop()
    stopped = time.monotonic()
    seen = ""
    try:
        while "checkpoint_" not in seen.split("[storage]", 1)[-1] and time.monotonic() - stopped < 60:
            assert run[0].is_alive(), run[1]
            seen += "".join(capfd.readouterr())
            time.sleep(0.5)
        time.sleep(max(0.0, 15 - (time.monotonic() - stopped)))
    finally:
        s3_server.start()
    run[0].join(timeout=300)
    seen += "".join(capfd.readouterr())
    assert "result" in run[1], run[1]
    waited = [line for line in seen.splitlines() if "[storage]" in line and "/checkpoint_" in line]
    assert waited, "the checkpoint upload never waited for the server:\n" + seen[-3000:]
    result = run[1]["result"]
    assert result.checkpoint.startswith("s3://outage/runs/")
    assert _loads(result.checkpoint)["progress"]["clustered"]
    assert MlflowClient(result.tracking_uri).get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.slow  # about 2 minutes: a Ray run that fails after 8 s of retries, then its resumption
def test_s3_down_for_good_is_one_line_naming_the_kept_checkpoint(tmp_path, ray_local, s3_server, capsys,
                                                                 monkeypatch):
    """Checkpoints on S3, a 2-epoch run of 16 steps an epoch; the server is stopped for good once epoch 1's
    checkpoint is stored (and Ray's snapshot listing it). Epoch 2's upload gives up after
    RAYSSEG_S3_RETRY_SECONDS: exit 2 and one line naming the endpoint, the checkpoint it could not write, the
    epoch-1 checkpoint that is kept (it loads once the server is back) and that the same command resumes; the
    MLflow run is FAILED. Run again with the server back, it resumes from that checkpoint."""
    from raysseg.apps.synth import synth_dataset

    synth_dataset(str(tmp_path / "data"), n_train=32, n_val=4, size=(48, 64), seed=1)
    s3_server.create_bucket("down")
    monkeypatch.setenv("RAYSSEG_S3_RETRY_SECONDS", "8")
    monkeypatch.chdir(tmp_path)
    sets = _sets(tmp_path, tmp_path / "data", "down", "train.epochs=2", "train.storage=s3://down/runs")
    cfg = load_config("hp_camvid", sets)
    root = f"s3://down/runs/{cfg.run_name()}"
    at_stop: list[str] = []

    def stop_after_the_first_checkpoint():
        deadline = time.time() + 300
        while not (_checkpoints(root) and storage.exists(f"{root}/checkpoint_manager_snapshot.json")):
            if time.time() > deadline:
                return
            time.sleep(0.2)
        at_stop.extend(_checkpoints(root))
        s3_server.stop()

    watcher = threading.Thread(target=stop_after_the_first_checkpoint, daemon=True)
    watcher.start()
    try:
        code, line = _cli(sets, capsys)
    finally:
        watcher.join(timeout=300)
        s3_server.start()
    assert at_stop, "no checkpoint was stored within 5 minutes"
    assert code == 2
    assert f"cannot reach S3 endpoint {s3_server.endpoint} for {root}/checkpoint_" in line
    assert "after" in line and "over 8 s" in line and line.endswith("run the same command again to resume")
    assert "; kept " in line, line
    kept = line.split("; kept ", 1)[1].split(" (epoch ", 1)[0]
    assert kept in at_stop
    progress = _loads(kept)["progress"]
    assert f"(epoch {progress['epoch']}, step {progress['step']})" in line and progress["epoch"] == 1
    assert s3_server.secret_key not in line
    assert _mlflow_status(tmp_path, cfg) == "FAILED"

    from raysseg.runtime.driver import train

    # the failed command could not remove its lease from the stopped server; a new command (another pid) takes
    # it over at once, but this test runs again in the same process, which the lease takes for a live holder
    storage.remove_tree(f"s3://down/runs/.leases/{cfg.run_name()}.json")
    result = train(cfg)  # the same run again, the server back: resumes from the kept checkpoint
    lineage = [(c["epoch"], c["step"], c["attempt"]) for c in _loads(result.checkpoint)["progress"]["lineage"]]
    assert lineage == [(1, 16, 1), (2, 32, 2), (2, 32, 2)]  # epoch 1 not trained again
    assert MlflowClient(result.tracking_uri).get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.slow  # about 60 s: one Ray run
def test_a_full_disk_under_train_storage_is_one_line_naming_the_file(tmp_path, ray_local, synth_data, capsys,
                                                                     monkeypatch):
    """train.storage on a 140 MiB tmpfs: epoch 1's checkpoint (~90 MB) fits, the final one does not. Exit 2 and
    one line naming the file it could not write, the kept checkpoint and that the same command resumes; every
    model.pt left on the disk loads and no temp file is left."""
    with tmpfs(tmp_path / "disk", "140m") as disk:
        monkeypatch.chdir(tmp_path)
        sets = _sets(tmp_path, synth_data, "full", "train.epochs=1", f"train.storage={disk}/runs")
        cfg = load_config("hp_camvid", sets)
        code, line = _cli(sets, capsys)
        assert code == 2
        root = f"{disk}/runs/{cfg.run_name()}"
        assert f"no space left for {root}/checkpoint_" in line and "/model.pt (" in line
        assert line.endswith("run the same command again to resume")
        kept = line.split("; kept ", 1)[1].split(" (epoch ", 1)[0]
        assert kept.startswith(root) and "(epoch 1, step 4)" in line
        stored = sorted(disk.rglob("model.pt"))
        assert [str(p) for p in stored] == [kept]
        assert _loads(kept)["progress"]["step"] == 4
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
        assert _mlflow_status(tmp_path, cfg) == "FAILED"
