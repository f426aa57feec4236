"""Fault injection with real processes: a Ray Train worker, the concept bank, the S3 server and the
driver are killed mid-run, and a checkpoint write is interrupted. RELIABILITY.md lists each fault,
what happens and which test here shows it.

The end-to-end runs watch the run's MLflow store (SQLite, read with sqlite3) to strike mid-epoch,
and kill processes with SIGKILL, found by their Ray process titles."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raysseg.config import load_config
from tests.test_segsort_train import segment_config

STEPS_PER_EPOCH = 8  # 32 images, 2 workers x 2 images per step
EVERY = 3  # train.checkpoint_every


def _config(tmp_path: Path, data: str, *overrides: str):
    """Visual concepts (a bank table version per step) on 64 px images, 2 workers."""
    return segment_config(tmp_path, data, "concepts_camvid", "concepts.warmup=0", f"train.checkpoint_every={EVERY}",
                          "train.run_name=faults", *overrides)


@pytest.fixture(scope="module")
def data32(tmp_path_factory) -> Path:
    from raysseg.apps.synth import synth_dataset

    root = tmp_path_factory.mktemp("synth32")
    synth_dataset(str(root), n_train=32, n_val=4, size=(48, 64), seed=1)
    return root


def _last_step(db: Path) -> int:
    """The highest training step logged so far (0 before the first)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            row = con.execute("SELECT max(step) FROM metrics WHERE key = 'train/loss_total'").fetchone()
    except sqlite3.OperationalError:  # the tables are not created yet
        return 0
    return int(row[0] or 0)


def _epochs_logged(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT count(*) FROM metrics WHERE key = 'epoch/step'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _wait(condition, what: str, worker: tuple | None = None, timeout: float = 600) -> None:
    """Poll ``condition`` until true; ``worker`` = (thread, box) of a run that must still be going."""
    deadline = time.time() + timeout
    while not condition():
        assert worker is None or worker[0].is_alive(), f"training ended before {what}: {worker[1]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _pids(title: str) -> list[int]:
    """Processes whose command line (Ray sets it to ``ray::<Actor>...``) contains ``title``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith("ray::") and title in cmdline:
                found.append(int(entry.name))
    return found


def _kill(title: str) -> int:
    pids = _pids(title)
    assert pids, f"no process titled {title!r} to kill"
    os.kill(pids[-1], signal.SIGKILL)
    return pids[-1]


def _in_background(fn, *args):
    """Run ``fn(*args)`` in a thread; returns (thread, box) where box gets "result" or "error"."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


# ---------------------------------------------------------------- fast: the pieces


def test_lost_processes_restart_and_errors_in_the_run_do_not():
    import ray

    from raysseg.runtime.driver import restartable

    assert restartable(RuntimeError("WorkerGroupError: ... ActorDiedError: The actor died unexpectedly"))
    assert restartable(RuntimeError("ray::RayTrainWorker.run() (BankLost) the concept bank's process died"))
    died = ray.exceptions.ActorDiedError()
    assert restartable(type("WorkerGroupError", (RuntimeError,), {"worker_failures": {1: died}})("Training failed"))
    assert not restartable(RuntimeError("NonFiniteLoss: the loss became nan at step 3"))
    assert not restartable(RuntimeError("StorageError: cannot reach S3 endpoint ... ActorDiedError"))
    assert not restartable(ValueError("bad value"))


def test_a_killed_bank_refuses_to_serve_until_restored(ray_local):
    """Ray restarts the bank's process empty; it raises BankLost (which restarts training from the
    latest checkpoint) instead of serving empty tables, until a worker restores it."""
    import numpy as np
    import ray

    from raysseg.runtime.bank import ConceptBank

    bank = ConceptBank.remote(1)
    ray.get(bank.publish.remote("pool", 3, np.ones((2, 2))))
    state = ray.get(bank.state.remote())
    ray.kill(bank, no_restart=False)  # the process dies; Ray starts a new one
    for _ in range(50):  # calls in flight while it restarts fail as unavailable (also a restart for training)
        try:
            ray.get(bank.get.remote("pool", 1), timeout=60)
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.2)
            continue
        except Exception as e:  # noqa: BLE001
            assert "restarted without its tables" in str(e)
            break
    else:
        pytest.fail("the restarted bank never answered")
    with pytest.raises(Exception, match="restarted without its tables"):
        ray.get(bank.state.remote(), timeout=60)
    ray.get(bank.restore.remote(state))
    version, table = ray.get(bank.get.remote("pool", 3))
    assert version == 3 and np.array_equal(table, np.ones((2, 2)))
    ray.kill(bank)


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path):
    """SIGKILL a process while it writes a large checkpoint over an existing one: the old file is
    intact and loads; the partial bytes sit only in a hidden temp file."""
    from raysseg.methods.registry import build_segmenter
    from raysseg.io.checkpoints import read_checkpoint, save_checkpoint

    cfg = load_config("kmeans_synth", ["model.backbone=resnet18_fpn", "model.weights="])
    target = tmp_path / "model.pt"
    save_checkpoint(str(target), build_segmenter(cfg), progress={"epoch": 1})
    before = target.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch\n"
        "from raysseg.config import load_config\n"
        "from raysseg.methods.registry import build_segmenter\nfrom raysseg.io.checkpoints import save_checkpoint\n"
        "cfg = load_config('kmeans_synth', ['model.backbone=resnet18_fpn', 'model.weights='])\n"
        "save_checkpoint(sys.argv[1], build_segmenter(cfg), progress={'epoch': 2}, big=torch.ones(300_000_000, dtype=torch.uint8))\n"
    ), str(target)], stderr=subprocess.PIPE)
    temp = lambda: [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p.stat().st_size > 0]  # noqa: E731
    deadline = time.time() + 120
    while not temp():
        assert writer.poll() is None, writer.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the writer never started writing"
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert target.read_bytes() == before
    assert read_checkpoint(str(target))["progress"] == {"epoch": 1}
    [partial] = temp()
    assert partial.name.startswith(".model.pt.")  # hidden, never read as a checkpoint
    partial.unlink()  # hundreds of MB


# ---------------------------------------------------------------- slow: whole runs


@pytest.mark.slow  # about 4 minutes: one run with two restarts
def test_a_killed_worker_then_a_killed_bank_restart_from_the_latest_checkpoint(tmp_path, ray_local, data32):
    """3 epochs of 8 steps with a checkpoint every 3 steps. A Train worker is SIGKILLed in epoch 2,
    then the bank's process in epoch 3. Each time the run restarts from its latest checkpoint
    (losing at most 3 steps), the bank comes back from that checkpoint and both workers read the
    same table at every version after it; the run finishes with 24 steps under one MLflow run."""
    from raysseg.runtime.bank import reads_by_version
    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.runtime.driver import train

    db = tmp_path / "mlruns.db"
    thread, box = _in_background(train, _config(tmp_path, str(data32), "train.epochs=3"))
    _wait(lambda: _last_step(db) >= STEPS_PER_EPOCH + 4, "step 12", (thread, box))
    killed_worker_at = _last_step(db)
    _kill("RayTrainWorker")
    _wait(lambda: _last_step(db) >= 2 * STEPS_PER_EPOCH + 4 and _pids("ConceptBank"), "step 20", (thread, box))
    killed_bank_at = _last_step(db)
    _kill("ConceptBank")
    thread.join(timeout=900)
    assert "error" not in box, box.get("error")
    result = box["result"]

    progress = read_checkpoint(result.checkpoint)["progress"]
    assert (progress["epoch"], progress["step"], progress["clustered"]) == (3, 3 * STEPS_PER_EPOCH, True)
    lineage = progress["lineage"]
    steps = [c["step"] for c in lineage]
    assert steps == sorted(steps) and steps[-1] == 3 * STEPS_PER_EPOCH
    assert all(c["epoch"] == c["step"] // STEPS_PER_EPOCH for c in lineage)
    assert all(c["epoch_step"] == c["step"] - STEPS_PER_EPOCH * c["epoch"] for c in lineage)
    attempts = [c["attempt"] for c in lineage]
    assert attempts == sorted(attempts) and set(attempts) == {1, 2, 3}
    for attempt, killed_at in ((1, killed_worker_at), (2, killed_bank_at)):
        resumed_from = max(c["step"] for c in lineage if c["attempt"] == attempt)
        assert killed_at - resumed_from <= EVERY + 1, (attempt, killed_at, lineage)  # +1: a step logged late

    # the bank restarted empty and was restored from the last checkpoint of attempt 2
    restored = max(c["step"] for c in lineage if c["attempt"] == 2)
    seen = reads_by_version(result.bank_trace)
    versions = sorted({v for table, v in seen if table == "concepts"})
    assert versions == list(range(restored + 1, 3 * STEPS_PER_EPOCH + 2))
    for (table, version), by_rank in seen.items():
        assert set(by_rank) == {0, 1} and by_rank[0] == by_rank[1], (table, version)

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["restarts"] == 2
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow  # about 3 minutes
def test_the_s3_server_stopped_for_seconds_then_for_good(tmp_path, ray_local, data32, monkeypatch, capfd):
    """Images on a private S3 server, checkpoints on local disk. The server is stopped for ~6 s
    as epoch 2 starts reading: reads retry and the epoch completes with no image skipped. Stopped
    for good in epoch 3: a one-line error after the bounded retries, the checkpoints are kept, and
    once the server is back the same run resumes and finishes."""
    from raysseg.io.images import upload
    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.io.storage import SeaweedServer
    from raysseg.runtime.driver import RunFailed, train

    access, secret = SeaweedServer.generate_credentials()
    server = SeaweedServer(tmp_path / "seaweed", access_key=access, secret_key=secret).start()
    try:
        for name, value in server.client_env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("RAYSSEG_S3_RETRY_SECONDS", "30")
        server.create_bucket("images")
        upload(str(data32), "s3://images/synth32")
        cfg = _config(tmp_path, "s3://images/synth32", "train.epochs=3", "train.num_workers=1",
                      "train.batch_size=4", "train.checkpoint_every=0")
        db = tmp_path / "mlruns.db"

        thread, box = _in_background(train, cfg)
        _wait(lambda: _epochs_logged(db) >= 1, "epoch 1", (thread, box))
        server.stop()
        time.sleep(6)
        server.start()
        _wait(lambda: _epochs_logged(db) >= 2, "epoch 2", (thread, box))
        time.sleep(1)  # Ray forwards the workers' lines to this process about once a second
        assert "unreachable" in "".join(capfd.readouterr())  # epoch 2's reads waited for the server
        server.stop()
        thread.join(timeout=600)
        assert isinstance(box.get("error"), RunFailed), box
        message = str(box["error"])
        assert "\n" not in message and "cannot reach S3 endpoint" in message
        assert f"the newest complete checkpoint in {tmp_path / 'runs/faults'} is kept: run the same command" in message
        assert secret not in message

        client = MlflowClient(f"sqlite:///{db}")
        [run] = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
        assert run.info.status == "FAILED"
        assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch/skipped_files")] == [0, 0]
        kept = sorted((tmp_path / "runs/faults").glob("checkpoint_*/model.pt"))
        assert kept and max(read_checkpoint(str(p))["progress"]["epoch"] for p in kept) == 2

        server.start()
        result = train(cfg)
        assert result.run_id == run.info.run_id
        progress = read_checkpoint(result.checkpoint)["progress"]
        assert progress["epoch"] == 3 and [c["attempt"] for c in progress["lineage"]][-1] == 2
        assert client.get_run(result.run_id).info.status == "FINISHED"
    finally:
        server.stop()


@pytest.mark.slow  # about 2 minutes
def test_a_killed_driver_resumes_its_run_when_the_command_is_run_again(tmp_path, ray_local, synth_data, monkeypatch):
    """`raysseg train` SIGKILLed (with its local Ray) after its first checkpoint; the same command
    again continues the same MLflow run from that checkpoint instead of starting over."""
    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.runtime.driver import train

    sets = [f"data.train={synth_data}/train", f"data.val={synth_data}/val", "data.image_size=64", "data.n_classes=5",
            "data.ignore_index=255", "data.class_names=[]",
            "train.num_workers=1", "train.batch_size=2", "train.epochs=3", "model.fpn_dim=32",
            "kmeans.pixels_per_image=20", "train.log_every=1"]
    cmd = [sys.executable, "-m", "raysseg.apps.cli", "train", "--config", "picie_camvid", *sum((["--set", s] for s in sets), [])]
    db = tmp_path / "mlruns.db"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": ""}, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while not list((tmp_path / "runs").glob("*/checkpoint_*/model.pt")):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint in 10 minutes"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    client = MlflowClient(f"sqlite:///{db}")
    cfg = load_config("picie_camvid", sets)
    [killed] = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert killed.info.status == "RUNNING"  # nobody was left to close it

    monkeypatch.chdir(tmp_path)  # the same command, from the same folder
    result = train(load_config("picie_camvid", sets))
    assert result.run_id == killed.info.run_id
    progress = read_checkpoint(result.checkpoint)["progress"]
    lineage = progress["lineage"]
    assert progress["epoch"] == 3 and lineage[0]["attempt"] == 1 and lineage[-1]["attempt"] == 2
    assert min(c["epoch"] for c in lineage if c["attempt"] == 2) >= 2  # epoch 1 was not trained again
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert len(client.search_runs([killed.info.experiment_id])) == 1
