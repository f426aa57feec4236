"""The way to a cluster, for real: `ray start --head` on 127.0.0.1, `jobs/train.sh` through
`ray job submit`, an `mlflow server` (SQLite backend, artifacts on the SeaweedFS S3 server),
then `raysseg pull-best` from that server; the job's exit code, its paths and its pip environment."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How long a server started by a test may take to answer: minutes on a shared 2-core machine under load
# (an MLflow server took over 120 s beside a quality run); one that never answers still fails the test.
SERVER_START_S = 300


def wait_for(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s:\n{log.read_text()[-3000:]}")


def wait_for_job_agent(address: str, seconds: float) -> None:
    """The dashboard answers before the head's job agent is up ("No available agent"): submit a no-op until one runs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + seconds
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError as e:
            if time.time() > deadline:
                raise AssertionError(f"no job agent on {address} within {seconds} s: {e}") from None
            time.sleep(1)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the process and everything it started (its own session), then SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3_server):
    """`mlflow server` on 127.0.0.1: runs in SQLite, artifacts proxied to s3://mlflow/artifacts."""
    tmp_path = tmp_path_factory.mktemp("mlflow-server")
    s3_server.create_bucket("mlflow")
    port = free_port()
    log = tmp_path / "mlflow-server.log"
    env = {**os.environ, **s3_server.client_env, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
             "--artifacts-destination", "s3://mlflow/artifacts", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", SERVER_START_S, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_server):
    """A real head started with `ray start --head --block` (stopping it leaves the test session's Ray alone).
    Yields (dashboard address, the head's temp folder with its sessions and logs)."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    dashboard = free_port()
    log = tmp_path_factory.mktemp("ray-head") / "ray-head.log"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "FAISS_OPT_LEVEL": "generic", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             "--include-dashboard=true", "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             # the session's local Ray already holds the default agent ports
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        wait_for(f"{address}/api/version", SERVER_START_S, proc, log)
        wait_for_job_agent(address, 120)
        yield address, Path(temp_dir)
    finally:
        stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_synth(s3_server, synth_data) -> str:
    from raysseg.io.images import upload

    s3_server.create_bucket("jobs")
    upload(str(synth_data), "s3://jobs/synth")
    return "s3://jobs/synth"


def job_env(s3_server, ray_head, mlflow_server) -> dict:
    return {**os.environ, **s3_server.client_env, "AWS_REGION": "us-east-1", "PATH": f"{BIN}:{os.environ['PATH']}",
            "RAY_ADDRESS": ray_head[0], "MLFLOW_TRACKING_URI": mlflow_server, "RAYSSEG_PREINSTALLED": "1"}


@pytest.mark.slow  # about 3.5 minutes on 2 cores
def test_job_submit_to_a_head_logs_to_an_mlflow_server_with_s3_artifacts_then_pull_best(
        tmp_path, s3_server, s3_synth, mlflow_server, ray_head):
    from mlflow.tracking import MlflowClient

    from pyarrow.fs import FileSelector

    from raysseg.io.storage import read_bytes, resolve

    env = job_env(s3_server, ray_head, mlflow_server)
    job = subprocess.run(
        ["bash", str(ROOT / "jobs/train.sh"), "kmeans_synth", "--set", "data.train=s3://jobs/synth/train",
         "--set", "data.val=s3://jobs/synth/val", "--set", "data.image_size=64", "--set", "train.storage=s3://jobs/runs",
         "--set", "kmeans.pixels_per_image=16", "--set", "train.run_name=job-run", "--set", "mlflow.experiment=jobs"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout + job.stderr

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("jobs")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "job-run"
    assert run.data.params["method"] == "kmeans" and run.data.params["data.train"] == "s3://jobs/synth/train"
    assert 0.0 <= run.data.metrics["view_nmi"] <= 1.0 and run.data.metrics["cluster_mean_cosine"] > 0
    checkpoint = run.data.tags["raysseg.checkpoint"]
    assert checkpoint.startswith("s3://jobs/runs/job-run/")
    # the server stored the artifacts in the S3 bucket, not on its own disk
    fs, root = resolve("s3://mlflow/artifacts")
    stored = ["s3://" + i.path for i in fs.get_file_info(FileSelector(root, recursive=True))
              if i.path.endswith("checkpoint/model.pt")]
    assert len(stored) == 1 and run.info.run_id in stored[0]

    out = tmp_path / "best"
    pulled = subprocess.run(
        [str(BIN / "raysseg"), "pull-best", "--experiment", "jobs", "--metric", "view_nmi", "--out", str(out)],
        env={**env, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert f"best run {run.info.run_id}" in pulled.stdout
    assert (out / "model.pt").read_bytes() == read_bytes(checkpoint) == read_bytes(stored[0])
    info = json.loads((out / "run.json").read_text())
    assert info["run_id"] == run.info.run_id and info["value"] == pytest.approx(run.data.metrics["view_nmi"])

    # the job ran with the head's own credentials: the secret is in none of the head's files (job
    # logs, runtime-env agent log, dashboard), nor in what the submission printed
    head_files = [p for p in ray_head[1].rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.startswith("job-driver-") for p in head_files)
    secret = s3_server.secret_key
    assert not [str(p) for p in head_files if secret.encode() in p.read_bytes()]
    assert secret not in job.stdout + job.stderr + pulled.stdout + pulled.stderr


SWEEP = """
metric: loss_total
mode: min
search: grid
scheduler: asha
grace_epochs: 1
space:
  hp.alpha: {grid: [0.0, 100.0]}
"""


@pytest.mark.slow  # about 6 minutes on 2 cores: two HP trials through Tune, a head and an mlflow server
def test_sweep_job_with_asha_one_parent_run_one_child_per_trial_and_best_registered(
        tmp_path, s3_server, s3_synth, mlflow_server, ray_head, monkeypatch):
    """jobs/sweep.sh on the head: HP trials with alpha 0 then 100 (a consistency term 100x
    heavier, so a loss far higher after epoch 1): ASHA stops the second at its first rung."""
    from mlflow.tracking import MlflowClient

    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.io.tracking import pull_best

    space = tmp_path / "alpha.yaml"
    space.write_text(SWEEP)
    hp = [f"data.train={s3_synth}/train", f"data.val={s3_synth}/val", "data.image_size=64", "data.n_classes=5",
          "data.class_names=[]", "train.storage=s3://jobs/sweep-runs", "mlflow.experiment=sweeps",
          "train.num_workers=1", "train.batch_size=2", "train.epochs=3", "hp.pool_size=6", "hp.renew_every=1",
          "hp.warmup=0", "hp.sigma=4.0", "kmeans.pixels_per_image=16"]
    job = subprocess.run(["bash", str(ROOT / "jobs/sweep.sh"), "hp_camvid", str(space), "--name", "alpha",
                          *sum((["--set", o] for o in hp), [])],
                         cwd=tmp_path, env=job_env(s3_server, ray_head, mlflow_server), capture_output=True,
                         text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if "raysseg.runtime.sweep" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2  # one run per trial, none per worker
    by_alpha = {float(r.data.params["hp.alpha"]): r for r in children}
    kept, stopped = by_alpha[0.0], by_alpha[100.0]
    assert kept.info.status == "FINISHED" and 0 <= kept.data.metrics["view_nmi"] <= 1
    assert [m.step for m in client.get_metric_history(kept.info.run_id, "epoch/loss_total")] == [4, 8, 12]
    assert stopped.info.status == "KILLED" and stopped.data.tags["raysseg.stopped_early"] == "true"
    # ASHA decides on the epoch-1 report; the trial learns it at its next report, so it may log epoch 2 first
    # (Tune's controller also syncs its state to S3 between steps): stopped before its 3 epochs in any case
    assert len(client.get_metric_history(stopped.info.run_id, "epoch/loss_total")) < 3
    assert "view_nmi" not in stopped.data.metrics  # never reached its final clustering
    assert parent.info.status == "FINISHED" and parent.data.tags["raysseg.best_run_id"] == kept.info.run_id
    assert parent.data.metrics["best/loss_total"] == pytest.approx(
        client.get_metric_history(kept.info.run_id, "epoch/loss_total")[-1].value)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trials.csv", "sweep.png"}
    assert parent.data.tags["raysseg.best_checkpoint"].startswith("s3://jobs/sweep-runs/alpha-")

    # the best trial's checkpoint, found by a label-free metric among this sweep's trials, registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    info = pull_best("sweeps", "view_nmi", str(tmp_path / "best"), filter_string=f"tags.mlflow.parentRunId = "
                     f"'{parent.info.run_id}'", register_as="hp-synth")
    assert info["run_id"] == kept.info.run_id and info["registered"] == "models:/hp-synth@best"
    pulled = read_checkpoint(str(tmp_path / "best/model.pt"))
    registered = read_checkpoint("models:/hp-synth@best")
    assert registered["run_id"] == kept.info.run_id
    for key, value in pulled["state"].items():
        assert (registered["state"][key] == value).all(), key


def job_output(done: subprocess.CompletedProcess) -> str:
    return done.stdout[-6000:] + done.stderr[-3000:]


@pytest.mark.slow  # 3.8 minutes on 2 busy cores (plus 2.5 for the head and mlflow server): three small jobs
def test_jobs_scripts_return_the_jobs_own_exit_code(tmp_path, s3_server, mlflow_server, ray_head):
    """`ray job submit` says 1 for any failed job; jobs/*.sh say what the job said (2: bad input)."""
    env = job_env(s3_server, ray_head, mlflow_server)
    sweep = subprocess.run(["bash", str(ROOT / "jobs/sweep.sh"), "kmeans_synth", "no_such_sweep"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 2, job_output(sweep)
    assert "config error: unknown sweep 'no_such_sweep'" in sweep.stdout, job_output(sweep)
    evaluate = subprocess.run(["bash", str(ROOT / "jobs/evaluate.sh"), "gone/model.pt"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 2, job_output(evaluate)
    assert f"{tmp_path}/gone/model.pt" in evaluate.stdout  # the relative path, made absolute at submission
    version = subprocess.run(["bash", str(ROOT / "jobs/submit.sh"), "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert version.returncode == 0 and re.search(r"^raysseg \S+$", version.stdout, re.M), job_output(version)


@pytest.mark.slow  # 2.7 minutes on 2 busy cores: one k-means job on the head
def test_a_job_on_a_head_of_this_machine_reads_and_writes_the_submitting_folder(
        tmp_path, s3_server, synth_data, ray_head, monkeypatch):
    """Relative paths and the default MLflow store mean the submitting folder, not Ray's upload folder
    (which lacks the .gitignored data/), and the run's name is the one a local command gets there."""
    from mlflow.tracking import MlflowClient

    from raysseg.config import load_config

    shutil.copytree(synth_data, tmp_path / "data" / "synth")
    env = job_env(s3_server, ray_head, "")
    env.pop("MLFLOW_TRACKING_URI")  # the job logs to mlruns.db in the submitting folder
    overrides = ["data.image_size=64", "kmeans.pixels_per_image=16", "mlflow.experiment=paths"]
    job = subprocess.run(["bash", str(ROOT / "jobs/train.sh"), "kmeans_synth", *sum((["--set", o] for o in overrides),
                                                                                     [])],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job_output(job)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    [run] = client.search_runs([client.get_experiment_by_name("paths").experiment_id])
    assert run.data.params["data.train"] == f"{tmp_path}/data/synth/train"
    assert run.data.tags["raysseg.checkpoint"].startswith(f"{tmp_path}/runs/{run.info.run_name}/")
    assert (tmp_path / "runs" / run.info.run_name).is_dir()
    monkeypatch.chdir(tmp_path)
    assert run.info.run_name == load_config("kmeans_synth", overrides).run_name()


def working_tree_copy(dst: Path) -> Path:
    """The repository as `ray job submit --working-dir` uploads it: the files git tracks or would track."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    return dst


@pytest.mark.slow  # 3.4-6.2 minutes on 2 busy cores: two environments built, each a 6.4 GB virtualenv copy
def test_a_version_bump_in_pyproject_builds_a_new_environment_that_the_next_job_sees(tmp_path, s3_server, ray_head):
    """The job installs requirements.lock and the uploaded package; Ray reuses the environment while neither
    changes and builds a new one after a version bump. Prints the submission times (the setup cost)."""
    repo = working_tree_copy(tmp_path / "repo")
    env = job_env(s3_server, ray_head, "")
    env.pop("RAYSSEG_PREINSTALLED")
    pip_envs = lambda: {p.name for p in ray_head[1].glob("session_2*/runtime_resources/pip/*")}  # noqa: E731

    def submit(**extra) -> tuple[set[str], float]:
        start = time.time()
        done = subprocess.run(["bash", str(repo / "jobs/submit.sh"), "--version"], cwd=tmp_path, env={**env, **extra},
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, job_output(done)
        return set(re.findall(r"^raysseg (\S+)$", done.stdout, re.M)), time.time() - start

    pyproject = repo / "pyproject.toml"
    version = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M).group(1)
    seen, preinstalled = submit(RAYSSEG_PREINSTALLED="1")
    assert not pip_envs()
    seen, first = submit()
    assert seen == {version} and len(pip_envs()) == 1
    built = pip_envs()
    seen, again = submit()
    assert seen == {version} and pip_envs() == built  # the same spec: the cached environment
    pyproject.write_text(pyproject.read_text().replace(f'version = "{version}"', f'version = "{version}.post1"', 1))
    seen, bumped = submit()
    assert seen == {f"{version}.post1"} and pip_envs() - built  # a new environment (Ray may evict the old one)
    print(f"\nsubmission to the end of `raysseg --version`: preinstalled {preinstalled:.0f} s, first {first:.0f} s, "
          f"repeated {again:.0f} s, after the version bump {bumped:.0f} s")
