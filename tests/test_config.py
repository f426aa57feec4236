import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raysseg.config import ConfigError, _run_exists, available_configs, load_config


def test_every_builtin_config_loads():
    names = available_configs()
    assert {"kmeans_synth", "kmeans_camvid", "hp_camvid", "hp_cocostuff", "hp_cityscapes", "hp_potsdam",
            "picie_camvid", "pgg_camvid", "picie_cocostuff", "pgg_cocostuff"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_paper_hyperparameters():
    coco, city, potsdam = load_config("hp_cocostuff"), load_config("hp_cityscapes"), load_config("hp_potsdam")
    assert (coco.hp.tau, city.hp.tau, potsdam.hp.tau) == (0.8, 0.6, 0.4)
    assert (coco.hp.pool_size, city.hp.pool_size, potsdam.hp.pool_size) == (2048, 2048, 1024)
    assert (coco.hp.renew_every, city.hp.renew_every) == (100, 20)
    assert (coco.hp.ema, city.hp.ema) == (0.99, 0.999)
    assert (coco.hp.warmup, city.hp.warmup) == (1000, 50)
    assert (coco.train.epochs, city.train.epochs, potsdam.train.epochs) == (3, 30, 10)
    assert coco.model.code_dim == 512 and coco.model.backbone == "vit_small_patch8"
    assert coco.train.batch_size == 64 and coco.train.lr == 5e-4 and coco.train.weight_decay == 0.1


def test_overrides_are_typed():
    cfg = load_config("hp_camvid", ["train.lr=0.001", "hp.local=false", "train.epochs=2", "data.class_names=[a,b]",
                                    "data.n_classes=2"])
    assert cfg.train.lr == 0.001 and cfg.hp.local is False and cfg.train.epochs == 2
    assert cfg.data.class_names == ["a", "b"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lrr=1", ["train.lrr", "train.lr"]),
        ("trian.lr=1", ["trian"]),
        ("train.epochs=two", ["train.epochs", "integer"]),
        ("train.epochs=0", ["train.epochs", "minimum"]),
        ("hp.rho=1.5", ["hp.rho", "maximum"]),
        ("model.backbone=vit_huge", ["model.backbone", "vit_small_patch16"]),
        ("data.image_size=100", ["data.image_size", "multiple of 16"]),
        ("hp.local=maybe", ["hp.local", "true or false"]),
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("hp_camvid", [override])
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_same_settings_same_run_name():
    a, b = load_config("kmeans_synth"), load_config("kmeans_synth")
    c = load_config("kmeans_synth", ["kmeans.iterations=5"])
    assert a.run_name() == b.run_name() != c.run_name()
    assert load_config("kmeans_synth", ["eval.crf=false"]).run_name() == a.run_name()


def test_cli_rejects_unknown_key_before_ray_starts(tmp_path):
    """One line on stderr, exit code 2, and no Ray session was started."""
    proc = subprocess.run(
        [sys.executable, "-m", "raysseg.apps.cli", "train", "--config", "kmeans_synth", "--set", "train.epohcs=2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "train.epohcs" in lines[0] and "train.epochs" in lines[0]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "mlruns.db").exists()


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_cli_missing_training_folder_is_one_line(tmp_path, command):
    proc = subprocess.run(
        [sys.executable, "-m", "raysseg.apps.cli", command, "--config", "pgg_camvid", "--set", f"data.train={tmp_path}/nope"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path}/nope" in lines[0], proc.stderr
    assert not (tmp_path / "mlruns.db").exists()


def test_local_weights_path_must_exist_and_becomes_absolute(tmp_path, monkeypatch):
    """Ray workers do not run in the caller's folder: a relative model.weights is made absolute."""
    (tmp_path / "w").mkdir()
    (tmp_path / "w/backbone.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("segsort_camvid", ["model.weights=w/backbone.pt"])
    assert cfg.model.weights == str(tmp_path / "w/backbone.pt")
    assert load_config("segsort_camvid", ["model.weights=s3://bucket/backbone.pt"]).model.weights == "s3://bucket/backbone.pt"
    with pytest.raises(ConfigError, match="model.weights: w/missing.pt does not exist"):
        load_config("segsort_camvid", ["model.weights=w/missing.pt"])


RUN_NAMES = json.loads((Path(__file__).parent / "fixtures" / "run_names.json").read_text())


@pytest.mark.parametrize("case", RUN_NAMES["cases"], ids=lambda c: " ".join([c["config"], *c["overrides"]]))
def test_runs_under_todays_names_keep_resuming(case):
    overrides = [*case["overrides"], *RUN_NAMES["paths"]]  # the absolute paths the names were recorded with
    cfg = load_config(case["config"], overrides)
    assert cfg.legacy_run_name() == case["run_name"]
    assert cfg.run_name() != case["run_name"]  # a new run gets the per-method name
    folder = Path(cfg.train.storage) / case["run_name"]
    folder.mkdir(parents=True)
    _run_exists.cache_clear()  # asked once per process: this test makes the folder after asking
    try:
        assert load_config(case["config"], overrides).run_name() == case["run_name"]  # the old run keeps its name
    finally:
        shutil.rmtree(Path(cfg.train.storage).parent)


def test_a_method_default_never_renames_another_methods_runs(tmp_path):
    base = load_config("hp_camvid", [f"train.storage={tmp_path}"])
    for other in ("concepts.restart_after=3", "pgg.global_clusters=7", "segsort.kappa=5.0"):
        assert load_config("hp_camvid", [other, f"train.storage={tmp_path}"]).run_name() == base.run_name()
    assert load_config("hp_camvid", ["hp.alpha=7.0", f"train.storage={tmp_path}"]).run_name() != base.run_name()
    concepts = load_config("concepts_camvid", [f"train.storage={tmp_path}"])
    assert load_config("concepts_camvid", ["concepts.restart_after=3", f"train.storage={tmp_path}"]).run_name() \
        != concepts.run_name()
