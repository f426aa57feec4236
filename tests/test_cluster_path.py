"""The cluster path as users run it, on a real two-node Ray cluster: a head and a second raylet started with
`ray start` (1 CPU each), a real `mlflow server` with S3 artifacts, the S3 server for data and checkpoints,
driven by jobs/sweep.sh (`ray job submit`) and `ray job status|logs|stop`.

The cluster is sized so that one HP trial with one Train worker fills its CPUs exactly (1 worker + data.cpus=1
for decoding and k-means): the case that used to wait forever."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_jobs import (BIN, ROOT, SERVER_START_S, free_port, mlflow_server, s3_synth, stop, wait_for,  # noqa: F401
                             wait_for_job_agent)

SPACE = """
metric: view_nmi
mode: max
search: grid
space:
  hp.alpha: {grid: [0.0, 100.0]}
"""


class Cluster:
    def __init__(self, address: str, gcs: str, temp_dir: Path):
        self.address, self.gcs, self.temp_dir = address, gcs, temp_dir

    def query(self, code: str):
        """Run ``code`` (which sets ``out``) in a fresh driver connected to the cluster; returns ``out``."""
        script = f"import json, ray\nray.init(address={self.gcs!r}, logging_level='ERROR')\n{code}\nprint(json.dumps(out))"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "RAY_ADDRESS": ""})
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def live_placement_groups(self) -> list[dict]:
        return self.query("out = [g for g in ray.util.placement_group_table().values() "
                          "if g['state'] != 'REMOVED']")

    def cpus(self) -> float:
        return self.query("out = ray.cluster_resources().get('CPU', 0)")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3_server):
    """A head (1 CPU) and a second node (1 CPU), both `ray start --block` on 127.0.0.1, with the S3 server's
    variables in their environment (as a cluster's nodes hold their own credentials)."""
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    logs = tmp_path_factory.mktemp("two-nodes")
    gcs_port, dashboard = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "FAISS_OPT_LEVEL": "generic", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    ports = lambda: [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",  # noqa: E731
                     f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    procs = []
    try:
        with open(logs / "head.log", "w") as out:
            procs.append(subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                 "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats", *ports()],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        address = f"http://127.0.0.1:{dashboard}"
        wait_for(f"{address}/api/version", SERVER_START_S, procs[0], logs / "head.log")
        def start_node():
            with open(logs / "node.log", "a") as out:
                return subprocess.Popen(
                    [str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{gcs_port}",
                     "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
                     f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}", *ports()],
                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        procs.append(start_node())
        cluster = Cluster(address, f"127.0.0.1:{gcs_port}", Path(temp_dir))
        deadline = time.time() + SERVER_START_S
        while cluster.cpus() < 2:
            assert time.time() < deadline, (logs / "node.log").read_text()[-3000:]
            if procs[-1].poll() is not None:  # on a loaded machine `ray start` can time out joining: start it again
                procs[-1] = start_node()
            time.sleep(2)
        wait_for_job_agent(address, 120)
        yield cluster
    finally:
        for proc in reversed(procs):
            stop(proc)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def env_for(s3_server, cluster: Cluster, mlflow: str) -> dict:
    return {**os.environ, **s3_server.client_env, "AWS_REGION": "us-east-1", "PATH": f"{BIN}:{os.environ['PATH']}",
            "RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": mlflow, "RAYSSEG_PREINSTALLED": "1"}


def hp_settings(s3_synth: str, experiment: str, **extra) -> list[str]:
    settings = {"data.train": f"{s3_synth}/train", "data.val": f"{s3_synth}/val", "data.image_size": 64,
                "data.n_classes": 5, "data.class_names": "[]", "train.storage": "s3://jobs/cluster-runs",
                "mlflow.experiment": experiment, "train.num_workers": 1, "train.batch_size": 2, "train.epochs": 2,
                "hp.pool_size": 6, "hp.renew_every": 1, "hp.warmup": 0, "hp.sigma": 4.0, "kmeans.pixels_per_image": 16,
                **extra}
    return sum((["--set", f"{k}={v}"] for k, v in settings.items()), [])


def job_of(cluster: Cluster, marker: str):
    """The newest job whose entrypoint contains ``marker``."""
    from ray.job_submission import JobSubmissionClient

    jobs = [j for j in JobSubmissionClient(cluster.address).list_jobs() if marker in (j.entrypoint or "")]
    return max(jobs, key=lambda j: j.start_time or 0) if jobs else None


def test_a_sweep_the_cluster_cannot_place_fails_within_60_s_with_one_line(
        tmp_path, s3_server, s3_synth, mlflow_server, two_nodes):
    """Two Train workers + one CPU for decoding = 3 CPUs, on a 2-CPU cluster: this used to stay RUNNING forever."""
    from mlflow.tracking import MlflowClient

    space = tmp_path / "alpha.yaml"
    space.write_text(SPACE)
    job = subprocess.run(["bash", str(ROOT / "jobs/sweep.sh"), "hp_camvid", str(space), "--name", "too-big",
                          *hp_settings(s3_synth, "cluster-too-big", **{"train.num_workers": 2})],
                         cwd=tmp_path, env=env_for(s3_server, two_nodes, mlflow_server), capture_output=True,
                         text=True, timeout=300)
    out = job.stdout + job.stderr
    assert job.returncode != 0, out[-3000:]
    [line] = {ln for ln in out.splitlines() if "one run needs" in ln}  # followed, then repeated by jobs/submit.sh
    assert "3 CPUs (train.num_workers=2 workers x 1 CPU + data.cpus=1" in line, line
    assert "the Ray cluster has 2 CPUs in all" in line and "lower train.num_workers or data.cpus" in line, line
    info = job_of(two_nodes, "--name too-big")
    assert info.status == "FAILED" and (info.end_time - info.start_time) / 1000 < 60
    client = MlflowClient(mlflow_server)
    [parent] = client.search_runs([client.get_experiment_by_name("cluster-too-big").experiment_id])
    assert parent.info.status == "FAILED"
    assert two_nodes.live_placement_groups() == []


def _wait_for_log(cluster: Cluster, job_id: str, text: str, seconds: float) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.address)
    deadline = time.time() + seconds
    while time.time() < deadline:
        logs = client.get_job_logs(job_id)
        if text in logs:
            return logs
        assert client.get_job_status(job_id) in ("PENDING", "RUNNING"), logs[-4000:]
        time.sleep(2)
    raise AssertionError(f"{text!r} not in the job's logs within {seconds} s:\n{client.get_job_logs(job_id)[-4000:]}")


@pytest.mark.slow  # two 2-epoch HP trials on a cluster of 2 CPUs, stopped, resubmitted, and a fresh run: minutes
def test_ray_job_stop_of_a_sweep_leaves_nothing_running_and_the_resubmitted_job_resumes_where_a_fresh_run_ends(
        tmp_path, s3_server, s3_synth, mlflow_server, two_nodes):
    import torch
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    from raysseg.io.storage import resolve

    space = tmp_path / "alpha.yaml"
    space.write_text(SPACE)
    args = ["bash", str(ROOT / "jobs/sweep.sh"), "hp_camvid", str(space), "--name", "stop-me",
            *hp_settings(s3_synth, "cluster-stop")]
    env = env_for(s3_server, two_nodes, mlflow_server)
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while (job := job_of(two_nodes, "--name stop-me")) is None:
        assert time.time() < deadline and first.poll() is None, first.stdout.read()[-3000:] if first.poll() else ""
        time.sleep(1)
    # the first trial finished, the second is training: stop the job there
    _wait_for_log(two_nodes, job.submission_id, "finished ({'hp.alpha': 0.0})", 600)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("cluster-stop").experiment_id
    deadline = time.time() + 300
    while len(client.search_runs([experiment], "attributes.status = 'RUNNING'")) < 2:  # the sweep's and trial 2's
        assert time.time() < deadline
        time.sleep(2)
    stopped = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", two_nodes.address, job.submission_id],
                             env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    first.wait(120)
    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(two_nodes.address).get_job_logs(job.submission_id)
    assert JobSubmissionClient(two_nodes.address).get_job_status(job.submission_id) == "STOPPED"
    [line] = [ln for ln in logs.splitlines() if "sweep stop-me stopped" in ln] or [logs[-3000:]]
    assert "run the same command again to resume" in line, line
    runs = client.search_runs([experiment])
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    statuses = sorted(r.info.status for r in runs)
    assert statuses == ["FINISHED", "KILLED", "KILLED"], statuses  # trial 1; trial 2 and the sweep
    finished = [r for r in runs if r.info.status == "FINISHED"][0]
    assert two_nodes.live_placement_groups() == []

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-5000:]
    assert "resuming sweep stop-me" in out
    runs = client.search_runs([experiment])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3  # the same three runs, none added
    kept = client.get_run(finished.info.run_id)
    assert [m.step for m in client.get_metric_history(kept.info.run_id, "epoch/loss_total")] == [4, 8]  # not redone
    parent = [r for r in runs if "raysseg.runtime.sweep" in r.data.tags][0]
    best_id = parent.data.tags["raysseg.best_run_id"]

    # the trial stopped mid-run and resumed ends where a fresh run of its settings ends
    [resumed] = [r for r in runs if r.data.params.get("hp.alpha") == "100.0"]
    fresh = subprocess.run(["bash", str(ROOT / "jobs/train.sh"), "hp_camvid",
                            *hp_settings(s3_synth, "cluster-stop", **{"hp.alpha": 100.0, "train.run_name": "fresh"})],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert fresh.returncode == 0, (fresh.stdout + fresh.stderr)[-4000:]
    [fresh_run] = [r for r in client.search_runs([experiment]) if r.info.run_name == "fresh"]
    for key in ("epoch/loss_total", "view_nmi", "cluster_mean_cosine"):
        assert resumed.data.metrics[key] == fresh_run.data.metrics[key], key

    # Tune's own tools find each trial's checkpoint (Tune copied the final model.pt into the trial's folder)
    fs, path = resolve("s3://jobs/cluster-runs/sweeps/stop-me")
    analysis = ExperimentAnalysis(path, storage_filesystem=fs, default_metric="view_nmi", default_mode="max")
    best = analysis.best_checkpoint
    assert best is not None
    with best.as_directory() as d:
        state = torch.load(Path(d) / "model.pt", map_location="cpu", weights_only=False)
    assert state["run_id"] == best_id and state["finished"]

    # pull the sweep's best into the registry, and load it as an MLflow Model
    import mlflow
    import numpy as np

    pulled = subprocess.run([str(BIN / "raysseg"), "pull-best", "--experiment", "cluster-stop", "--metric", "view_nmi",
                             "--filter", f"tags.mlflow.parentRunId = '{parent.info.run_id}'", "--out",
                             str(tmp_path / "best"), "--register-as", "stop-me"],
                            env={**env, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert f"best run {best_id}" in pulled.stdout
    mlflow.set_tracking_uri(mlflow_server)
    maps = mlflow.pyfunc.load_model("models:/stop-me@best").predict(np.zeros((48, 64, 3), np.uint8))
    assert maps.shape == (48, 64) and np.issubdtype(maps.dtype, np.integer)
