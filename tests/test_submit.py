"""How a command reaches a cluster, without one: paths made absolute or refused at submission
(raysseg.apps.submit), relative paths refused inside Ray's upload folder, the job's pip spec tied to
pyproject.toml and requirements.lock, and evaluate --probe-train. The same paths on a real
`ray start --head` are in tests/test_jobs.py."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raysseg.apps.submit import job_exit_code, resolve
from raysseg.config import load_config
from raysseg.settings import ConfigError

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
REMOTE = "http://10.255.255.1:8265"  # not this machine: refused before anything is contacted


def _sets(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i in range(len(argv) - 1) if argv[i] == "--set")


def test_a_local_cluster_gets_absolute_paths_of_the_submitting_folder(tmp_path, monkeypatch):
    argv = ["train", "--config", "kmeans_synth", "--set", "data.train=data/mine/train", "--set", "train.epochs=2"]
    out, env = resolve(argv, tmp_path, ROOT, local=True, env={})
    sets = _sets(out)
    assert sets["data.train"] == f"{tmp_path}/data/mine/train"  # rewritten in place
    assert out.count("data.train=" + sets["data.train"]) == 1 and "data.train=data/mine/train" not in out
    assert sets["data.val"] == f"{tmp_path}/data/synth/val"  # from the config file
    assert sets["train.storage"] == f"{tmp_path}/runs" and sets["train.epochs"] == "2"
    assert env == {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db"}  # not Ray's upload folder
    # the job loads the same config as a local command in that folder: the same run name
    monkeypatch.chdir(tmp_path)
    here = load_config("kmeans_synth", ["data.train=data/mine/train", "train.epochs=2"]).run_name()
    monkeypatch.chdir(ROOT)
    assert load_config("kmeans_synth", [f"{k}={v}" for k, v in sets.items()]).run_name() == here

    out, env = resolve(["evaluate", "--checkpoint", "runs/x/model.pt", "--probe-train=data/t", "--split",
                        "s3://b/val"], tmp_path, ROOT, local=True, env={"MLFLOW_TRACKING_URI": "sqlite:///m.db"})
    assert out == ["evaluate", "--checkpoint", f"{tmp_path}/runs/x/model.pt", f"--probe-train={tmp_path}/data/t",
                   "--split", "s3://b/val", "--out", f"{tmp_path}/outputs/eval"]
    assert env == {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    mine = tmp_path / "mine.yaml"
    mine.write_text("method: kmeans\n")
    out, _ = resolve(["sweep", "--config", "mine.yaml", "--space", "hp_pool_tau"], tmp_path, ROOT, True, {})
    assert out[:5] == ["sweep", "--config", str(mine), "--space", "hp_pool_tau"]  # a built-in name stays


@pytest.mark.parametrize("argv, line", [
    (["train", "--config", "kmeans_synth", "--set", "train.storage=s3://b/runs"],
     "data.train=data/synth/train is a path on this machine; use s3://... or an absolute path the nodes share"),
    (["sweep", "--config", "kmeans_synth", "--space", "hp_pool_tau", "--set", "data.train=s3://b/t",
      "--set", "data.val=s3://b/v", "--set", "train.storage=s3://b/r", "--set", "model.weights=w.pth"],
     "model.weights=w.pth is a path on this machine"),
    (["evaluate", "--checkpoint", "models:/m@best", "--split", "data/val"], "--split data/val is a path on this"),
    (["train", "--config", "kmeans_synth", "--set", "data.train=s3://b/t", "--set", "data.val=/shared/v",
      "--set", "train.storage=s3://b/runs"], "MLFLOW_TRACKING_URI is not set: the job would keep its runs in "
                                              "mlruns.db inside Ray's temporary upload folder"),
    (["train", "--config", "outside.yaml"], "--config outside.yaml is a file on this machine that the upload"),
])
def test_a_remote_cluster_refuses_local_paths_with_one_line(tmp_path, argv, line):
    (tmp_path / "outside.yaml").write_text("method: kmeans\n")
    with pytest.raises(ConfigError) as err:
        resolve(argv, tmp_path, ROOT, local=False, env={})
    assert "\n" not in str(err.value) and line in str(err.value)


def test_submit_sh_refuses_before_uploading_with_exit_2(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": REMOTE, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "jobs/submit.sh"), "train", "--config", "kmeans_synth"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr == ("config error: data.train=data/synth/train is a path on this machine; use s3://... or an "
                           "absolute path the nodes share\n")


def test_a_remote_cluster_gets_files_of_the_repository_by_their_path_in_the_upload(tmp_path):
    config = ROOT / "raysseg/configs/kmeans_synth.yaml"
    argv = ["train", "--config", str(config), "--set", "data.train=s3://b/t", "--set", "data.val=/shared/val",
            "--set", "train.storage=s3://b/runs"]
    out, env = resolve(argv, tmp_path, ROOT, local=False, env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert out == ["train", "--config", "raysseg/configs/kmeans_synth.yaml", *argv[3:]] and env == {}
    # a default --out stays where the job runs (the report goes to MLflow too); a given one must be shared
    out, _ = resolve(["evaluate", "--checkpoint", "s3://b/m.pt"], tmp_path, ROOT, local=False, env={})
    assert out == ["evaluate", "--checkpoint", "s3://b/m.pt"]


def test_relative_paths_inside_rays_upload_folder_are_one_config_error(tmp_path, monkeypatch):
    upload = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123456789abcdef"
    upload.mkdir(parents=True)
    monkeypatch.chdir(upload)
    with pytest.raises(ConfigError) as err:
        load_config("kmeans_synth")
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.train=data/synth/train is relative")
    assert f"{upload} is Ray's temporary upload" in message and ".gitignored" in message
    assert "jobs/submit.sh" in message and "s3://" in message
    cfg = load_config("kmeans_synth", ["data.train=/d/train", "data.val=s3://b/val", "train.storage=/shared/runs"])
    assert (cfg.data.train, cfg.train.storage) == ("/d/train", "/shared/runs")


def test_the_jobs_exit_code_is_read_from_ray_job_status():
    failed = ("Job 'raysseg-sweep-1' failed\nStatus message: Job entrypoint command failed with exit code 2, "
              "last available logs (truncated to 20,000 chars):\nconfig error: unknown sweep 'x'\n")
    assert job_exit_code(failed, 1) == 2
    assert job_exit_code(failed.replace("code 2", "code -9"), 1) == 137
    assert job_exit_code("Job 'raysseg-run-1' succeeded\n", 0) == 0
    assert job_exit_code("Job 'raysseg-run-1' was stopped\n", 0) == 130
    setup = "Job 'j' failed\nStatus message: runtime_env setup failed: Failed to set up runtime environment.\n"
    assert job_exit_code(setup, 1) == 1


def _runtime_env(root: Path, **environ) -> dict:
    done = subprocess.run([sys.executable, str(root / "jobs/runtime_env.py")], env={**os.environ, **environ},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_the_jobs_pip_environment_is_the_lock_plus_the_package_and_changes_with_either(tmp_path):
    from ray._private.runtime_env.pip import get_uri  # the key Ray caches an environment by

    pins = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line.strip()]
    env = _runtime_env(ROOT)
    assert env["pip"][:-2] == pins and env["pip"][-2] == "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"
    assert env["pip"][-1].startswith("# raysseg 0.1.0, pyproject.toml + requirements.lock ")
    assert "pip" not in _runtime_env(ROOT, RAYSSEG_PREINSTALLED="1")

    copy = tmp_path / "repo"
    (copy / "jobs").mkdir(parents=True)
    for name in ("pyproject.toml", "requirements.lock", "jobs/runtime_env.py"):
        shutil.copy(ROOT / name, copy / name)
    keys = [get_uri(_runtime_env(copy))]
    assert keys[0] == get_uri(env)
    pyproject = copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "0.1.0"', 'version = "0.1.1"', 1))
    bumped = _runtime_env(copy)
    assert bumped["pip"][-1].startswith("# raysseg 0.1.1, ")
    keys.append(get_uri(bumped))
    with open(copy / "requirements.lock", "a") as lock:
        lock.write("tomli==2.2.1\n")
    keys.append(get_uri(_runtime_env(copy)))
    assert len(set(keys)) == 3


def test_check_evaluation_reads_the_probe_split_named_and_names_the_option(tmp_path, synth_data):
    from raysseg.engine import inputs
    from raysseg.io.images import DatasetError

    cfg = load_config("kmeans_synth", [f"data.train={tmp_path}/gone/train", f"data.val={synth_data}/val"])
    val = str(synth_data / "val")
    with pytest.raises(DatasetError) as err:
        inputs.check_evaluation(cfg, val, True, True)
    message = str(err.value)
    assert "\n" not in message and f"{tmp_path}/gone/train" in message
    assert "--probe-train SPLIT" in message and "--no-probe --no-retrieval" in message
    assert inputs.check_evaluation(cfg, val, True, True, probe_train=str(synth_data / "train")) is True


@pytest.mark.slow  # about 40 s on 2 cores (70 s when they are busy): a local Ray, a k-means run and its evaluation
def test_evaluate_trains_the_probe_on_the_split_named_by_probe_train(tmp_path, synth_data, ray_local, monkeypatch,
                                                                     capsys):
    """A checkpoint whose recorded training split is gone (another machine): --probe-train names one here."""
    from raysseg.apps import cli
    from raysseg.engine.local import train_local
    from raysseg.runtime.evaluate import evaluate

    train = tmp_path / "elsewhere" / "train"
    shutil.copytree(synth_data / "train", train)
    cfg = load_config("kmeans_synth", [f"data.train={train}", f"data.val={synth_data}/val", "data.image_size=64",
                                       f"train.storage={tmp_path}/runs", "kmeans.pixels_per_image=16",
                                       "eval.probe_epochs=5", "eval.overlays=0", "eval.crf=false",
                                       "eval.retrieval=false", "eval.workers=1"])
    checkpoint = train_local(cfg).checkpoint
    shutil.rmtree(train.parent)
    monkeypatch.chdir(tmp_path)  # the CLI's logs folder
    with pytest.raises(SystemExit) as exit_:
        cli.main(["evaluate", "--checkpoint", checkpoint, "--out", str(tmp_path / "eval")])
    assert exit_.value.code == 2 and "--probe-train SPLIT" in capsys.readouterr().err
    report = evaluate(checkpoint, out=str(tmp_path / "eval"), log_to_mlflow=False,
                      probe_train=str(synth_data / "train"))
    assert report["probe_train"] == str(synth_data / "train")
    assert set(report["scores"]) == {"clusters", "probe"} and 0 < report["scores"]["probe"]["accuracy"] <= 1
