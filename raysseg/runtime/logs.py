"""The terminal is the tool's: Ray's, Tune's and MLflow's logs go to a file, the tool's lines to the terminal.

- :func:`setup` (before Ray starts) sends the driver's library loggers, Python warnings and
  whatever Ray's C++ core writes to the process's stderr into ``outputs/logs/<name>.log``;
  Ray's worker processes keep their logs in Ray's session folder (``ray_logs_dir``), and
  ``ray.init(log_to_driver=False)`` keeps them off the terminal.
- Rank 0's printed lines (progress, resume, k-means) come to the driver through a
  :class:`Console` actor and are printed once, by the driver.
- Ray also prints on the driver by itself, to ``sys.stdout``: its raylet's warnings (``(raylet) WARNING: 8
  PYTHON worker processes have been started ...``, whatever ``log_to_driver`` says) and, with ``log_to_driver``,
  its workers' lines. :class:`ToolLines` sends each such line (:func:`library_line`) to the log file instead.
- ``raysseg -v`` (``RAYSSEG_VERBOSE=1``) shows all of it on the terminal, as Ray prints it.
"""
from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import ray

LOG_FOLDER = "outputs/logs"
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "mlflow", "alembic", "py.warnings",
                   "filelock", "urllib3")
_state: dict = {}


def verbose() -> bool:
    return os.environ.get("RAYSSEG_VERBOSE", "") not in ("", "0")


def log_file() -> str:
    """Where this command's library logs go ("" before :func:`setup` or with ``-v``)."""
    return _state.get("file", "")


def log_folder(cwd: Path | None = None) -> Path:
    """``outputs/logs``; in a Ray job, whose working directory is Ray's temporary upload of the repository,
    the Ray session's ``logs/raysseg/`` instead, beside the job's own ``job-driver-<id>.log``."""
    cwd = cwd or Path.cwd()
    parts = cwd.parts
    if "runtime_resources" in parts and any(p.startswith("_ray_pkg_") for p in parts):
        return Path(*parts[:parts.index("runtime_resources")]) / "logs" / "raysseg"
    return cwd / LOG_FOLDER


def setup(name: str) -> str:
    """Route library logs of this process to ``outputs/logs/<name>.log`` (once per process; nothing with ``-v``).

    Python-level ``sys.stderr`` and ``sys.stdout`` keep the terminal, less Ray's lines (:class:`ToolLines`);
    file descriptor 2, which Ray's C++ core and the processes a local Ray starts write to (``RAY_LOG_TO_STDERR``
    too), goes to the file. Returns the file."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Train/Tune status tables on the driver
    if verbose() or _state:
        return log_file()
    path = log_folder() / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a", buffering=1)
    _state["file"], _state["handle"] = str(path.resolve()), handle
    handle.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    if sys.stderr is sys.__stderr__ and _has_fd(sys.stderr):
        terminal = os.dup(2)
        os.dup2(handle.fileno(), 2)
        sys.stderr = ToolLines(io.TextIOWrapper(os.fdopen(terminal, "wb", buffering=0), write_through=True), handle)
    if sys.stdout is sys.__stdout__:
        sys.stdout = ToolLines(sys.stdout, handle)
    logging.captureWarnings(True)
    import mlflow  # noqa: F401 - it installs its own log handlers on import: replaced here

    quiet_libraries()
    return _state["file"]


def _has_fd(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (OSError, ValueError, AttributeError):
        return False


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# What Ray prints on the driver: a line under a process's prefix, e.g. "(raylet) WARNING: ...",
# "(autoscaler +2s) ...", "(MapBatches(decode) pid=123, ip=10.0.0.2) ...", or a log record in Ray's format,
# "2026-01-01 12:00:00,123\tINFO streaming_executor.py:123 -- ...".
RAY_LINE = re.compile(r"\((?:raylet|autoscaler|gcs_server|monitor|dashboard)\b[^)\n]*\)"
                      r"|\([^\n]*?\bpid=\d+[^)\n]*\)"
                      r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+"
                      r"(?:TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+:\d+ -- ")


def library_line(text: str) -> bool:
    """Whether ``text`` (a line, or the start of one) is a line Ray prints, colour codes or not."""
    return bool(RAY_LINE.match(ANSI.sub("", text).lstrip("\r")))


class ToolLines:
    """The terminal as the tool's lines see it: a text stream that writes to ``terminal``, except Ray's lines
    (:func:`library_line`, judged by the start of each line), which go to ``log`` without their colour codes."""

    def __init__(self, terminal, log):
        self.terminal, self.log = terminal, log
        self._to_log = False  # the line begun by the last write is Ray's: its rest goes to the log too
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            for piece in re.split(r"(?<=\n)", text):
                if not piece:
                    continue
                if self._to_log or library_line(piece):
                    self.log.write(ANSI.sub("", piece))
                    self._to_log = not piece.endswith("\n")
                else:
                    self.terminal.write(piece)
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the terminal's
        return getattr(self.terminal, name)


def quiet_libraries() -> None:
    """Point the library loggers at the log file (again after ``ray.init``, which installs its own handlers)."""
    handle = _state.get("handle")
    if handle is None:
        return
    handler = logging.StreamHandler(handle)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


def ray_logs_dir() -> str:
    """Ray's session log folder (every worker's output), or "" when unknown."""
    try:
        return ray._private.worker._global_node.get_logs_dir_path()  # noqa: SLF001 - no public accessor
    except AttributeError:
        return ""


def where_logs_go() -> str:
    if verbose():
        return "logs: on this terminal (-v)"
    ray_dir = ray_logs_dir()
    return f"logs: {log_file() or 'this terminal'}" + (f", Ray's workers: {ray_dir}" if ray_dir else "")


@ray.remote(num_cpus=0)
class Console:
    """Lines from workers, printed by the driver (:class:`ConsolePrinter`)."""

    def __init__(self):
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)

    def drain(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


class ConsoleWriter(io.TextIOBase):
    """A stream for ``contextlib.redirect_stdout`` in a worker: each whole line goes to the Console actor."""

    def __init__(self, console):
        self.console, self.partial = console, ""

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            if line.strip():
                self.console.say.remote(line)
        return len(text)

    def flush(self) -> None:
        pass


class LinesStartingWith(io.TextIOBase):
    """A stream that sends each whole line starting with ``prefix`` to ``chosen`` and the others to ``rest``: in a
    worker's checkpoint report, the storage layer's ``[storage]`` lines to the console, Ray Train's own log
    records ("Reporting training result ...") to the worker's log."""

    def __init__(self, prefix: str, chosen, rest):
        self.prefix, self.chosen, self.rest, self.partial = prefix, chosen, rest, ""

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            (self.chosen if line.startswith(self.prefix) else self.rest).write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.chosen.flush()
        self.rest.flush()


class ConsolePrinter:
    """On the driver: a Console actor and a thread printing its lines. ``with ConsolePrinter() as console:``
    hands ``console.actor`` to the workers."""

    def __init__(self, every_s: float = 0.5):
        self.actor = Console.remote()
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)

    def _print_new(self) -> None:
        for line in ray.get(self.actor.drain.remote()):
            print(line, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._print_new()
            except Exception:  # noqa: BLE001 - the console is gone (Ray shutting down): nothing more to print
                return

    def __enter__(self) -> "ConsolePrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._print_new()
        except Exception:  # noqa: BLE001
            pass
        ray.kill(self.actor)
