"""MLflow that does not answer: one line within seconds before anything starts, and an outage in mid-run
that training rides out (raysseg.io.tracking: check_reachable, RunLogger keeps and resends)."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_jobs import SERVER_START_S, free_port, wait_for
from tests.test_local import small_config

BIN = Path(sys.executable).parent


def test_an_unreachable_server_is_one_line_within_seconds_before_ray(synth_data, tmp_path, capsys):
    from raysseg.apps.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", "kmeans_synth", "--set", f"data.train={synth_data}/train",
              "--set", f"data.val={synth_data}/val", "--set", f"train.storage={tmp_path}/runs",
              "--set", "mlflow.tracking_uri=http://127.0.0.1:9"])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert "http://127.0.0.1:9" in lines[0] and "MLFLOW_TRACKING_URI" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing started


def test_the_reachability_check_takes_seconds():
    from raysseg.io.tracking import TrackingError, check_reachable

    t0 = time.time()
    with pytest.raises(TrackingError, match="did not answer within 2 s"):
        check_reachable("http://127.0.0.1:9", seconds=2)
    assert time.time() - t0 < 5


class MlflowServer:
    """`mlflow server` on 127.0.0.1 (SQLite, local artifacts) that a test can stop and start again."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        log = self.folder / "server.log"
        with open(log, "a") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
                 "--artifacts-destination", f"{self.folder}/artifacts", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(f"{self.uri}/health", SERVER_START_S, self.proc, log)

    def stop(self) -> None:
        os.killpg(self.proc.pid, 9)
        self.proc.wait()


class OutageDuringTraining:
    """The training shard, stopping the server before batch ``down_at`` and starting it again (on a thread,
    while training goes on) before batch ``up_at``."""

    def __init__(self, shard, server: MlflowServer, down_at: int, up_at: int):
        self.shard, self.server, self.down_at, self.up_at = shard, server, down_at, up_at
        self.batches, self.restart = 0, None

    def iter_batches(self, *args, **kwargs):
        for batch in self.shard.iter_batches(*args, **kwargs):
            self.batches += 1
            if self.batches == self.down_at:
                self.server.stop()
            if self.batches == self.up_at:
                self.restart = threading.Thread(target=self.server.start)
                self.restart.start()
            yield batch


@pytest.mark.slow  # an mlflow server started twice and a 3-epoch run: minutes on 2 cores
def test_an_mlflow_outage_mid_run_does_not_stop_training(synth_data, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from raysseg.engine.inputs import run_plan
    from raysseg.engine.local import local_shards, train_local
    from raysseg.io import tracking

    monkeypatch.setenv("RAYSSEG_MLFLOW_RETRY_SECONDS", "180")  # close() waits for the restarted server
    server = MlflowServer(tmp_path)
    server.start()
    try:
        cfg = small_config("hp", synth_data, tmp_path, "train.epochs=3", f"mlflow.tracking_uri={server.uri}")
        _, reads = run_plan(cfg, None)
        datasets = local_shards(cfg, reads)
        datasets["train"] = outage = OutageDuringTraining(datasets["train"], server, down_at=4, up_at=7)
        result = train_local(cfg, tracking_uri=server.uri, datasets=datasets)
        outage.restart.join()
        out = capsys.readouterr().out
        assert "does not answer" in out and "answers again" in out, out
        client = MlflowClient(server.uri)
        run = tracking.find_run(server.uri, cfg.mlflow.experiment, cfg.run_name())
        assert run.info.status == "FINISHED" and result.checkpoint
        assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/loss_total")] == [3, 6, 9]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_total")]
        assert steps == list(range(1, 10))  # nothing lost, nothing twice, the outage's steps included
    finally:
        if server.proc.poll() is None:
            server.stop()
