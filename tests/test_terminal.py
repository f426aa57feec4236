"""The terminal is the tool's: `raysseg run --config kmeans_synth` prints a header, the worker's lines once,
the summaries, and nothing of Ray's, Tune's or MLflow's own logs, which go to outputs/logs/ (slow: every command
that starts Ray, ten times over). Also the terminal's rough edges: Ray's raylet warnings, the S3 retry line, the
final line after a storage failure, skipped files of `train --local`, `evaluate --set`, the stop line's epoch and
the progress of `data upload`."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Lines that are not the tool's: Ray's process prefixes (colour codes or not) and log records, MLflow's and
# Python's logging, tracebacks.
LIBRARY = re.compile(r"\x1b\[|\((raylet|autoscaler|gcs_server)\b|\(\S+ pid=\d+|\bpid=\d+\)|"
                     r"^\[?\d{4}[-/]\d\d[-/]\d\d[ ,]|"
                     r" (INFO|WARNING|ERROR) |streaming_executor|core_worker|Traceback|^\s+File \"|warnings\.warn|"
                     r"TrainingReport|PlacementGroupCleaner|== Status ==")
RAYLET_WARNING = ("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: "
                  "5f1c2a0e with address: 127.0.0.1. This could be a result of using a large number of actors, or "
                  "due to tasks blocked in ray.get() calls (see https://github.com/ray-project/ray/issues/3644 for "
                  "some discussion of workarounds). 4x the maximum expected startup concurrency")
QUICK = ["--set", "data.image_size=64", "--set", "train.storage=runs", "--set", "eval.probe=false",
         "--set", "eval.retrieval=false", "--set", "eval.crf=false"]  # the shortest evaluation: clusters only


def _cli(args: list[str], cwd: Path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = subprocess.run([sys.executable, "-m", "raysseg.apps.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900, env={**os.environ, "RAY_ADDRESS": "", **env})
    return proc, [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]


def test_run_prints_the_tools_own_lines_and_ends_in_the_summary(synth_data, tmp_path):
    proc, lines = _cli(["run", "--config", "kmeans_synth", "--set", f"data.train={synth_data}/train",
                        "--set", f"data.val={synth_data}/val", *QUICK], tmp_path)
    assert proc.returncode == 0, "\n".join(lines[-40:])
    assert [ln for ln in lines if LIBRARY.search(ln)] == []
    assert lines[0].startswith("starting run kmeans_synth-") and "2 workers" in lines[0]
    assert lines[1].startswith("logs: ") and "outputs/logs/run-" in lines[1]
    assert sum("[k-means]" in ln for ln in lines) == 1  # rank 0's line, printed once by the driver
    assert any(ln.startswith("checkpoint: ") for ln in lines) and any(ln.strip().startswith("view_nmi") for ln in lines)
    assert lines[-1].startswith("MLflow run ") and "mlflow ui --backend-store-uri" in lines[-1]
    log = next(Path(tmp_path, "outputs", "logs").glob("run-*.log")).read_text()
    assert "Started a local Ray instance" in log or "ray" in log.lower()  # Ray's driver-side lines went there


SWEEP = "metric: view_nmi\nmode: max\nsearch: grid\nscheduler: none\nspace:\n  kmeans.pixels_per_image: {grid: [20]}\n"


@pytest.mark.slow  # five commands that each start a local Ray, ten times: about 40 minutes on 2 busy cores
@pytest.mark.parametrize("round_", range(10))
def test_no_command_prints_a_line_of_rays_or_a_librarys(round_, synth_data, tmp_path):
    """train, evaluate (with a data setting), predict, bench data and sweep, each run as a user runs it: every
    line on stdout and stderr is the tool's (Ray's raylet warnings come in about 1 run of 3 on a busy machine)."""
    data = ["--set", f"data.train={synth_data}/train", "--set", f"data.val={synth_data}/val"]
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    commands = {
        "train": ["train", "--config", "kmeans_synth", *data, *QUICK],
        "evaluate": ["evaluate", "--checkpoint", "CKPT", "--set", "data.n_classes=6", "--set", "data.class_names=[]",
                     "--out", "eval"],
        "predict": ["predict", "--checkpoint", "CKPT", "--images", f"{synth_data}/val/images", "--out", "pred",
                    "--workers", "1"],
        "bench data": ["bench", "data"],
        "sweep": ["sweep", "--config", "kmeans_synth", "--space", "sweep.yaml", *data, *QUICK],
    }
    checkpoint, foreign = "", {}
    for name, args in commands.items():
        proc, lines = _cli([a.replace("CKPT", checkpoint) for a in args], tmp_path, RAYSSEG_CAMVID=str(synth_data))
        assert proc.returncode == 0, (name, "\n".join(lines[-30:]))
        checkpoint = checkpoint or next(ln for ln in lines if ln.startswith("checkpoint: ")).split(": ", 1)[1]
        foreign[name] = [ln for ln in lines if LIBRARY.search(ln)]
    assert foreign == {name: [] for name in commands}
    scored = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert len(scored["scores"]["clusters"]["per_class_iou"]) == 6  # the evaluation's data setting


def test_rays_own_lines_go_to_the_log_and_the_tools_lines_stay(tmp_path):
    """The raylet's warning as Ray's driver prints it (its error listener, whatever log_to_driver says), with its
    colour codes, ends in the log file; the tool's lines, an updating progress line included, stay."""
    import ray._private.worker as ray_worker

    from raysseg.runtime.logs import ToolLines, library_line

    assert library_line(RAYLET_WARNING) and library_line("(MapBatches(decode) pid=4242) a worker's line")
    assert library_line("2026-12-06 06:16:39,568\tINFO streaming_executor.py:117 -- Starting execution of Dataset")
    assert not library_line("[hp epoch 2/3] 2/3 loss 1.2 3.10/s, 1s left") and not library_line("(step 4)")
    terminal, log = io.StringIO(), io.StringIO()
    lines = ToolLines(terminal, log)
    saved, sys.stdout = sys.stdout, lines
    try:
        print("epoch 1/2: loss_total 1.2345", flush=True)
        ray_worker.print_to_stdstream({"lines": [RAYLET_WARNING.split(" ", 1)[1]], "pid": "raylet", "is_err": False},
                                      ignore_prefix=False)
        print(RAYLET_WARNING)
        print("\r[upload to s3://b/p] 3/130 files", end="", flush=True)
        print("\r[upload to s3://b/p] 130 files in 1.0 s (130.0/s)")
    finally:
        sys.stdout = saved
    assert terminal.getvalue() == ("epoch 1/2: loss_total 1.2345\n\r[upload to s3://b/p] 3/130 files"
                                   "\r[upload to s3://b/p] 130 files in 1.0 s (130.0/s)\n")
    logged = log.getvalue().splitlines()
    assert logged == [RAYLET_WARNING.replace("\x1b[33m", "").replace("\x1b[0m", "")] * 2


class FakeClock:
    """time.monotonic and time.sleep for the retry loop: sleeping moves the clock on at once."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_one_retry_line_per_s3_outage_and_one_when_the_endpoint_answers_again(monkeypatch, capsys):
    """Two requests in one 45 s outage (each waits for the endpoint): one line, not one every 10 s of it; then one
    when a request gets through, and one for the next outage."""
    from raysseg.io import storage

    clock = FakeClock()
    monkeypatch.setattr(storage, "time", clock)
    monkeypatch.setattr(storage, "_outages", storage._Outages())
    settings = storage.S3Settings("http://127.0.0.1:9", "key", "secret", retry_s=60.0)
    down_until = clock.now + 45

    def request():
        if clock.now < down_until:
            raise ConnectionRefusedError("Connection refused")
        return b"ok"

    def stderr_lines() -> list[str]:
        return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[storage]")]

    with pytest.raises(storage.StorageError, match="cannot reach S3 endpoint http://127.0.0.1:9 for s3://b/one"):
        storage._retrying("s3://b/one", request, storage.S3Settings("http://127.0.0.1:9", "key", "secret",
                                                                     retry_s=20.0))  # gives up after 20 s
    assert storage._retrying("s3://b/two", request, settings) == b"ok"  # waits out the rest of the outage
    first = stderr_lines()
    assert len(first) == 2, first
    assert "S3 endpoint http://127.0.0.1:9 unreachable or failing (s3://b/one); retrying each request" in first[0]
    assert first[1].startswith("[storage] S3 endpoint http://127.0.0.1:9 answers again, after 4")
    assert storage._retrying("s3://b/three", request, settings) == b"ok" and stderr_lines() == []
    down_until = clock.now + 3
    assert storage._retrying("s3://b/four", request, settings) == b"ok"
    assert len(stderr_lines()) == 2  # the next outage: its line and the one when it ends


def test_evaluate_and_predict_say_what_they_keep_after_a_storage_failure(monkeypatch):
    """The storage layer's "checkpoints written so far are kept" fits training; evaluate and predict end with what
    they keep."""
    import socket

    from raysseg.apps import cli
    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.io.storage import StorageError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for name, value in {"AWS_ENDPOINT_URL": dead, "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret",
                        "RAYSSEG_S3_RETRY_SECONDS": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StorageError) as failed:
        read_checkpoint("s3://models/run/model.pt")  # what `raysseg evaluate` reads first
    message = str(failed.value)
    assert message.startswith(f"cannot reach S3 endpoint {dead} for s3://models/run/model.pt")
    evaluate = cli.parser().parse_args(["evaluate", "--checkpoint", "s3://models/run/model.pt"])
    assert cli._what_is_kept(evaluate, message).endswith(
        "; evaluate keeps nothing (its report is written at the end): run the same command again")
    predict = cli.parser().parse_args(["predict", "--checkpoint", "m.pt", "--images", "in", "--out", "s3://out"])
    assert cli._what_is_kept(predict, message).endswith(
        "; the label maps written so far are kept: run the same command again to predict the other images")
    train = cli.parser().parse_args(["train", "--config", "hp_camvid"])
    assert cli._what_is_kept(train, message) == message


def test_train_local_prints_the_skipped_files_and_lists_them_beside_the_checkpoint(synth_data, tmp_path, capsys):
    from raysseg.config import load_config
    from raysseg.engine.local import train_local

    data = tmp_path / "data"
    shutil.copytree(synth_data / "train", data / "train")
    (data / "train/images/zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "train/images/zz_empty.png").write_bytes(b"")
    cfg = load_config("kmeans_camvid", [
        f"data.train={data}/train", f"data.val={data}/train", "data.image_size=32", "data.n_classes=5",
        "data.ignore_index=255", "data.class_names=[]", "model.backbone=resnet18_fpn", "model.fpn_dim=16",
        "train.num_workers=1", "kmeans.pixels_per_image=10", f"train.storage={tmp_path}/runs"])
    result = train_local(cfg)
    listing = f"{result.checkpoint.rsplit('/', 1)[0]}/skipped_files.txt"
    line = [ln for ln in capsys.readouterr().out.splitlines() if "skipped_files" in ln]
    assert len(line) == 1 and re.fullmatch(r"  skipped_files +2 \(listed in (.+)\)", line[0])[1] == listing, line
    listed = Path(listing).read_text().splitlines()
    assert [Path(ln.split("\t")[0]).name for ln in listed] == ["zz_corrupt.png", "zz_empty.png"]
    assert "empty file (0 bytes)" in listed[1]


def test_evaluate_takes_data_settings_over_the_checkpoints(tmp_path):
    """`evaluate --set data.n_classes=12` (as the out-of-range-labels line suggests) parses, keeps the model's
    clusters, and a setting of the model is one line."""
    import lzma

    import torch

    from raysseg.apps import cli
    from raysseg.config import ConfigError, config_from_dict, with_data_settings
    from raysseg.io.checkpoints import segmenter_from

    args = cli.parser().parse_args(["evaluate", "--checkpoint", "m.pt", "--set", "data.n_classes=12",
                                    "--set", "data.class_names=[]"])
    assert args.set == ["data.n_classes=12", "data.class_names=[]"]
    fixture = Path(__file__).parent / "fixtures" / "checkpoints" / "kmeans.pt.xz"
    (tmp_path / "kmeans.pt").write_bytes(lzma.decompress(fixture.read_bytes()))
    ckpt = torch.load(tmp_path / "kmeans.pt", map_location="cpu", weights_only=False)
    raw = with_data_settings(ckpt["config"], args.set + ["data.val=val"])
    seg = segmenter_from({**ckpt, "config": raw})  # the checkpoint's weights load
    assert seg.cfg.data.n_classes == 12 and seg.cfg.n_clusters == config_from_dict(ckpt["config"]).n_clusters != 12
    assert seg.cfg.data.val == str(Path("val").absolute())
    with pytest.raises(ConfigError, match=r"^--set model.code_dim=8: evaluate takes data settings only"):
        with_data_settings(ckpt["config"], ["model.code_dim=8"])


def test_the_stop_line_numbers_epochs_as_the_progress_lines_do():
    from raysseg.engine.loop import checkpoint_position

    assert checkpoint_position({"epoch": 3, "step": 10, "epoch_step": 1}, 4) == "epoch 4/4, step 10"  # in epoch 4
    assert checkpoint_position({"epoch": 3, "step": 9, "epoch_step": 0}, 4) == "end of epoch 3/4, step 9"
    assert checkpoint_position({"epoch": 2, "step": 6}, 3) == "end of epoch 2/3, step 6"  # MoCo's (no epoch_step)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_data_upload_shows_one_progress_line(tty, s3_server, tmp_path, capsys, monkeypatch):
    """130 files: one line, rewritten in place on a terminal; elsewhere only the last (a line every 10 s)."""
    from raysseg.io.images import upload

    for i in range(130):
        (tmp_path / "data" / ("train" if i % 2 else "val")).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / ("train" if i % 2 else "val") / f"{i:03d}.png").write_bytes(b"x" * 10)
    s3_server.create_bucket("upload")
    terminal = Terminal()
    if tty:
        monkeypatch.setattr(sys, "stdout", terminal)
    assert upload(str(tmp_path / "data"), f"s3://upload/{tty}") == 130
    out = terminal.getvalue() if tty else capsys.readouterr().out
    assert out.count("\n") == 1 and out.endswith("\n") and f"[upload to s3://upload/{tty}] 130 files in " in out
    if tty:
        assert out.startswith("\r") and out.count("\r") >= 1
    else:
        assert out.startswith("[upload to ")


def test_a_jobs_library_logs_go_beside_rays_job_logs_not_into_the_temporary_upload(tmp_path):
    from raysseg.runtime.logs import log_folder

    session = tmp_path / "ray" / "session_2026-12-06_04-19-10_182082_28328"
    upload = session / "runtime_resources" / "working_dir_files" / "_ray_pkg_14e908ceff489eb7"
    assert log_folder(upload) == session / "logs" / "raysseg"
    assert log_folder(tmp_path) == tmp_path / "outputs" / "logs"
