"""The README's quick start works as written, in order, from a fresh folder (issue 18, item 9).

The quick start is the ``## Quick start`` section's fenced bash blocks. Its install line (``make install &&
source .venv/bin/activate``) is what this test environment already is, so lines starting with ``make`` or
``source`` are not run; every other line runs as written, in a bash with this venv first on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysseg.apps import cli

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


def quick_start_blocks(text: str | None = None) -> list[list[str]]:
    """The command lines of each fenced bash block of the README's quick start (comment-only lines dropped)."""
    text = text if text is not None else (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)
    lines = [[line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
             for block in blocks]
    assert lines and all(lines), "the quick start has no (or an empty) bash block"
    return lines


def _runnable(line: str) -> bool:
    return not line.startswith(("make ", "source "))


def _argv(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def test_quick_start_commands_are_complete_cli_calls():
    """Every raysseg line parses with the CLI as written: no placeholder, no unknown option."""
    commands = [line for block in quick_start_blocks() for line in block if _argv(line)[0] == "raysseg"]
    assert len(commands) >= 5
    for line in commands:
        assert not re.search(r"<[a-z ]+>|\.\.\.|\bCKPT\b|\bDIR\b", line), f"placeholder in {line!r}"
        try:
            cli.parser().parse_args(_argv(line)[1:])
        except SystemExit as exc:
            pytest.fail(f"README quick start: {line!r} does not parse (exit {exc.code})")


def test_quick_start_s3_uris_use_the_bucket_storage_serve_creates():
    bucket = cli.parser().parse_args(["storage", "serve"]).bucket
    text = (ROOT / "README.md").read_text()
    uris = re.findall(r"s3://([^/\s`]+)", " ".join(line for block in quick_start_blocks(text) for line in block))
    upload = re.search(r"^raysseg data upload \S+ s3://([^/\s]+)", text, re.M)  # the Commands list too
    assert uris and upload and set(uris) | {upload.group(1)} == {bucket}, (uris, bucket)
    assert f"bucket\n`{bucket}`" in text or f"bucket `{bucket}`" in text  # the README names it


def test_quick_start_data_line_runs_as_written(tmp_path, monkeypatch):
    """The first step, in process (the rest trains: test_quick_start_runs_as_written, slow)."""
    line = next(line for line in quick_start_blocks()[0] if _runnable(line))
    assert line.startswith("raysseg data synth ")
    monkeypatch.chdir(tmp_path)
    cli.main(_argv(line)[1:])
    out = Path(_argv(line)[3])
    assert len(list((tmp_path / out / "train" / "images").iterdir())) == 48
    assert len(list((tmp_path / out / "val" / "labels").iterdir())) == 16


def _bash(line: str, cwd: Path, env: dict) -> str:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{line!r} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _serve(line: str, cwd: Path, env: dict) -> tuple[subprocess.Popen, dict]:
    """Start the `storage serve` line as written; return it and the variables of its export lines."""
    proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    exports, seen = {}, []
    deadline = time.monotonic() + 120
    while len(exports) < 3 and time.monotonic() < deadline:
        out = proc.stdout.readline()
        if not out and proc.poll() is not None:
            break
        seen.append(out)
        found = re.match(r"\s*export (\w+)=(\S+)", out)
        if found:
            exports[found.group(1)] = found.group(2)
    assert len(exports) == 3, "".join(seen)
    return proc, exports


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    """Every block in order in an empty folder: the local run, pull-best, the concepts query (which must match
    something), then the S3 server and a training run reading the uploaded data."""
    if not (_port_free(8333) and _port_free(18333)):
        pytest.skip("port 8333 (the README's S3 server) is in use")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    blocks = quick_start_blocks()
    server = None
    try:
        for block in blocks:
            for line in filter(_runnable, block):
                if " storage serve" in line:
                    server, exports = _serve(line, tmp_path, env)
                    env.update(exports)
                    continue
                _bash(line, tmp_path, env)
        queries = json.loads((tmp_path / "outputs" / "concepts" / "queries.json").read_text())
        assert queries and all(q["n_images"] > 0 for q in queries), queries
        assert (tmp_path / "best" / "model.pt").is_file()
        assert server is not None and server.poll() is None
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
