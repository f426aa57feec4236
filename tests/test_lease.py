"""One holder per run (raysseg.io.lease): a second command refuses with one line naming the holder, a crashed
holder's lease is taken over, two commands started at once never both run, and a new MLflow SQLite store
used by several commands at once is created once."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.test_local import small_config


@pytest.mark.parametrize("local", [True, False])
def test_a_second_command_for_a_held_run_refuses_naming_the_holder(local, synth_data, tmp_path, capsys):
    from raysseg.apps.cli import main
    from raysseg.io.lease import RunLease

    cfg = small_config("hp", synth_data, tmp_path)
    args = ["train", "--config", "hp_camvid"]
    for key, value in cfg.flat().items():  # the same run, given on the command line
        if key.startswith(("data.", "train.", "mlflow.", "hp.", "kmeans.")) and value != "":
            args += ["--set", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
    with RunLease(f"{tmp_path}/runs", cfg.run_name()):  # this test process holds the run, heartbeat and all
        with pytest.raises(SystemExit) as stop:
            main([*args, "--local"] if local else args)
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in lines[0] and cfg.run_name() in lines[0]
    assert not (tmp_path / "mlruns.db").exists()  # refused before touching MLflow or the checkpoints
    assert not (tmp_path / "runs" / cfg.run_name()).exists()


def _stale_lease(root, run, **holder):
    from raysseg.io.lease import lease_uri

    path = lease_uri(str(root), run)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "token": "x", "since": time.time() - 600,
                   "heartbeat": time.time(), **holder}, f)


def test_a_crashed_holders_lease_is_taken_over_after_the_timeout(tmp_path, capsys, monkeypatch):
    from raysseg.io.lease import RunBusy, RunLease

    monkeypatch.setenv("RAYSSEG_LEASE_TIMEOUT_S", "30")
    _stale_lease(tmp_path, "r", heartbeat=time.time() - 5)  # alive on another machine
    with pytest.raises(RunBusy, match="host elsewhere, pid 1"):
        RunLease(str(tmp_path), "r").acquire()
    _stale_lease(tmp_path, "r", heartbeat=time.time() - 31)  # silent past the timeout: crashed
    with RunLease(str(tmp_path), "r") as lease:
        assert lease.read().pid == os.getpid()
    assert "taking over the lease of host elsewhere, pid 1 (no heartbeat for 31 s)" in capsys.readouterr().out
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _stale_lease(tmp_path, "r", host=socket.gethostname(), pid=dead.pid)  # this machine, process gone: at once
    with RunLease(str(tmp_path), "r"):
        pass
    assert f"process {dead.pid} is gone" in capsys.readouterr().out
    assert RunLease(str(tmp_path), "r").read() is None  # released


HOLD = textwrap.dedent("""
    import sys, time
    from raysseg.io.lease import RunBusy, RunLease
    try:
        with RunLease(sys.argv[1], "r"):
            time.sleep(3)
        print("ran")
    except RunBusy as e:
        print("busy:", e)
""")


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_two_commands_started_at_once_never_both_run(where, tmp_path, request):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        server.create_bucket("leases")
        root = "s3://leases/runs"
    else:
        root = str(tmp_path / "runs")
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, root], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(o.split(":")[0] for o in outs) == ["busy", "busy", "ran"], outs


STORE = textwrap.dedent("""
    import sys
    from raysseg.io import tracking
    tracking.start_or_resume_run(sys.argv[1], "raysseg", sys.argv[2], {"a": 1})
    print("ok")
""")


def test_a_new_sqlite_store_used_by_commands_at_once_is_created_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    procs = [subprocess.Popen([sys.executable, "-c", STORE, uri, f"run-{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name("raysseg")
    assert len(MlflowClient(uri).search_runs([exp.experiment_id])) == 3
