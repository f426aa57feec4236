"""The terminal is the tool's: `raysseg run --config kmeans_synth` prints a header, the worker's lines once,
the summaries, and nothing of Ray's, Tune's or MLflow's own logs, which go to outputs/logs/."""
import os
import re
import subprocess
import sys
from pathlib import Path

# Lines that are not the tool's: Ray's worker prefixes and log records, MLflow's and Python's logging, tracebacks.
LIBRARY = re.compile(r"\(\w+ pid=\d+|\bpid=\d+\)|^\d{4}[-/]\d\d[-/]\d\d[ ,]| (INFO|WARNING|ERROR) |core_worker|"
                     r"Traceback|^\s+File \"|warnings\.warn|TrainingReport|PlacementGroupCleaner|== Status ==")


def test_run_prints_the_tools_own_lines_and_ends_in_the_summary(synth_data, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raysseg.apps.cli", "run", "--config", "kmeans_synth",
         "--set", f"data.train={synth_data}/train", "--set", f"data.val={synth_data}/val",
         "--set", "data.image_size=64", "--set", "train.storage=runs", "--set", "eval.probe=false",
         "--set", "eval.retrieval=false", "--set", "eval.crf=false"],  # the shortest evaluation: clusters only
        capture_output=True, text=True, cwd=tmp_path, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 0, "\n".join(lines[-40:])
    foreign = [ln for ln in lines if LIBRARY.search(ln)]
    assert len(lines) - len(foreign) >= 0.8 * len(lines), foreign
    assert lines[0].startswith("starting run kmeans_synth-") and "2 workers" in lines[0]
    assert lines[1].startswith("logs: ") and "outputs/logs/run-" in lines[1]
    assert sum("[k-means]" in ln for ln in lines) == 1  # rank 0's line, printed once by the driver
    assert any(ln.startswith("checkpoint: ") for ln in lines) and any(ln.strip().startswith("view_nmi") for ln in lines)
    assert lines[-1].startswith("MLflow run ") and "mlflow ui --backend-store-uri" in lines[-1]
    log = next(Path(tmp_path, "outputs", "logs").glob("run-*.log")).read_text()
    assert "Started a local Ray instance" in log or "ray" in log.lower()  # Ray's driver-side lines went there


def test_a_jobs_library_logs_go_beside_rays_job_logs_not_into_the_temporary_upload(tmp_path):
    from raysseg.runtime.logs import log_folder

    session = tmp_path / "ray" / "session_2026-12-06_04-19-10_182082_28328"
    upload = session / "runtime_resources" / "working_dir_files" / "_ray_pkg_14e908ceff489eb7"
    assert log_folder(upload) == session / "logs" / "raysseg"
    assert log_folder(tmp_path) == tmp_path / "outputs" / "logs"
