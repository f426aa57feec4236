"""MLflow: one run per training run (found again by name on resume), logged through a client.

No address means a local SQLite store (``mlruns.db``) with artifacts in ``mlartifacts/``
in the working directory; ``MLFLOW_TRACKING_URI`` or ``mlflow.tracking_uri`` points
at a server instead. Only the driver creates runs; rank 0 logs into them by id.

- :func:`check_reachable` answers within seconds, before Ray starts, when a server does not.
- A new SQLite store is created under a file lock, so commands started at once do not race
  on its schema.
- :class:`RunLogger` keeps what a server that stopped answering could not take and sends it
  when the server is back (training goes on); a metric step already logged for a key is never
  logged again (a resumed run that redoes steps).
"""
from __future__ import annotations

import io
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from raysseg.io.store_uri import tracking_uri  # noqa: F401  (defined below io.checkpoints, which needs it)

# MLflow 3 prints "View run ... at: <url>" to stdout whenever a run on a server ends: the terminal is the tool's.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

RUN_NAME_TAG = "raysseg.run_name"
CHECKPOINT_TAG = "raysseg.checkpoint"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a sweep's trials under it
# Environment variables whose values must never reach MLflow or a log line.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                    "HF_TOKEN")
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+):[^/\s@]+@")  # https://user:password@host


def redact(text: str) -> str:
    """``text`` without secrets: the values of :data:`SECRET_VARIABLES` and passwords in URLs become ``***``."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return _URL_PASSWORD.sub(r"\1:***@", text)

REACH_SECONDS = 5.0  # how long check_reachable waits for a server's answer
RETRY_SECONDS = 60.0  # how long RunLogger.close waits for a server that stopped answering (RAYSSEG_MLFLOW_RETRY_SECONDS)
RETRY_EVERY_S = 10.0  # while a server does not answer, RunLogger's first wait before trying again (doubling to 2 min)
_prepared_stores: set[str] = set()


class TrackingError(RuntimeError):
    """An MLflow lookup found nothing usable; the message is one line and says what to do."""


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _unreachable_reason(uri: str, seconds: float) -> str:
    """Why the server at ``uri`` did not answer within ``seconds``, or "" when it answered (any HTTP status)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=seconds):
            return ""
    except urllib.error.HTTPError:
        return ""  # it answered (e.g. 401 behind a proxy): reachable
    except (OSError, ValueError) as e:
        return str(getattr(e, "reason", "") or e) or type(e).__name__


def check_reachable(uri: str, seconds: float = REACH_SECONDS) -> None:
    """Raise a one-line TrackingError when the MLflow server at ``uri`` does not answer within ``seconds``.

    Called before Ray starts: MLflow's own client would retry for minutes before failing."""
    if not _is_server(uri):
        return
    reason = _unreachable_reason(uri, seconds)
    if reason:
        raise TrackingError(f"MLflow server {uri} did not answer within {seconds:.0f} s ({reason}): start it, or "
                            f"fix mlflow.tracking_uri / MLFLOW_TRACKING_URI (unset both for the local store mlruns.db)")


def _prepare_store(uri: str) -> None:
    """Create (or migrate) a SQLite store under a file lock: commands started at once would race on its schema."""
    if not uri.startswith("sqlite:///") or uri in _prepared_stores:
        return
    import fcntl

    from mlflow.tracking import MlflowClient

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates tables and the default one
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _prepared_stores.add(uri)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    _prepare_store(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another command created it at the same moment
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(uri: str, experiment: str, run_name: str):
    """The newest MLflow run tagged with this raysseg run name, or None."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0] if runs else None


def start_or_resume_run(uri: str, experiment: str, run_name: str, params: dict,
                        tags: dict | None = None) -> tuple[str, bool]:
    """(run_id, resumed). A run that did not finish is reopened; otherwise a new one starts.

    ``tags`` go on a new run, e.g. ``{PARENT_TAG: sweep_run_id}`` for a sweep's trial."""
    client = _client(uri)
    run = find_run(uri, experiment, run_name)
    if run is not None and run.info.status != "FINISHED":
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, True
    run = client.create_run(experiment_id(uri, experiment), run_name=run_name,
                            tags={RUN_NAME_TAG: run_name, **{k: redact(str(v)) for k, v in (tags or {}).items()}})
    logger = RunLogger(uri, run.info.run_id)
    logger.log_params(params)
    return run.info.run_id, False


class RunLogger:
    """Logs into one existing run; safe to construct inside Ray workers.

    Every call is queued and sent at once. When a server stops answering, the queue is kept (one
    warning line) and sent on a later call once it answers again, so training goes on;
    :meth:`close` waits up to ``RAYSSEG_MLFLOW_RETRY_SECONDS`` for what is still queued. A metric
    step at or below the highest step already logged for that key is dropped, so a resumed run
    that redoes a few steps never logs them twice."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)
        self.pending: list[tuple] = []  # (kind, *arguments) in call order
        self.logged_steps: dict[str, int] | None = None  # key -> highest step in MLflow (read on first use)
        self.down_since = 0.0  # when the server stopped answering (0: it answers)
        self.next_try, self.wait_s = 0.0, RETRY_EVERY_S

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._send("params", items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        now = int(time.time() * 1000)
        items = [(k, float(v), now, int(step)) for k, v in metrics.items() if np.isfinite(v)]
        if items:
            self._send("metrics", items)

    def set_tag(self, key: str, value: str) -> None:
        self._send("tag", key, redact(str(value)))

    def log_bytes(self, data: bytes, artifact_path: str) -> None:
        """Log ``data`` as the artifact file ``artifact_path`` (e.g. ``eval/confusion.png``)."""
        folder, name = os.path.split(artifact_path)
        if name.endswith((".txt", ".json", ".csv", ".yaml", ".log")):
            data = redact(data.decode("utf-8", errors="replace")).encode()
        self._send("artifact", folder or None, name, data)

    def log_image(self, image: np.ndarray, artifact_path: str) -> None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
        self.log_bytes(buf.getvalue(), artifact_path)

    def log_file(self, local_path: str, folder: str | None = None) -> None:
        self._send("artifact", folder, Path(local_path).name, Path(local_path).read_bytes())

    def finish(self, status: str = "FINISHED", seconds: float | None = None) -> None:
        """Send what is queued (see :meth:`close`), then mark the run ``status``."""
        self._send("status", status)
        self.close(seconds)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def close(self, seconds: float | None = None) -> None:
        """Send what is queued, waiting up to ``seconds`` (default ``RAYSSEG_MLFLOW_RETRY_SECONDS``) for a
        server that does not answer; then a one-line TrackingError."""
        if seconds is None:
            seconds = float(os.environ.get("RAYSSEG_MLFLOW_RETRY_SECONDS", RETRY_SECONDS))
        deadline = time.time() + seconds
        while True:
            self.next_try = 0.0
            self._flush()
            if not self.pending:
                return
            if time.time() >= deadline:
                raise TrackingError(
                    f"MLflow server {self.uri} has not answered for {time.time() - self.down_since:.0f} s; "
                    f"{len(self.pending)} records of run {self.run_id} were not logged; the checkpoints are kept: "
                    f"run the same command again once the server is back")
            time.sleep(min(2.0, max(0.0, deadline - time.time())))

    def _send(self, *call) -> None:
        self.pending.append(call)
        self._flush()

    def _flush(self) -> None:
        if not self.pending or time.time() < self.next_try:
            return
        try:
            with _quick_requests(_is_server(self.uri)):
                while self.pending:
                    self._apply(self.pending[0])
                    self.pending.pop(0)
        except Exception as e:  # noqa: BLE001 - only an outage is kept for later; anything else is raised
            if not _is_server(self.uri) or not _unreachable_reason(self.uri, REACH_SECONDS):
                raise
            if not self.down_since:
                self.down_since = time.time()
                print(f"warning: MLflow server {self.uri} does not answer ({redact(str(e)).splitlines()[0][:160]}); "
                      f"training goes on and its {len(self.pending)} records are sent when it is back", flush=True)
            self.next_try = time.time() + self.wait_s  # a server that times out must not stall training often
            self.wait_s = min(2 * self.wait_s, 120.0)
            return
        if self.down_since:
            print(f"MLflow server {self.uri} answers again after {time.time() - self.down_since:.0f} s; "
                  f"the records kept meanwhile are logged", flush=True)
            self.down_since, self.wait_s = 0.0, RETRY_EVERY_S

    def _apply(self, call: tuple) -> None:
        from mlflow.entities import Metric

        kind, *args = call
        if kind == "params":
            self.client.log_batch(self.run_id, params=args[0])
        elif kind == "metrics":
            if self.logged_steps is None:
                self.logged_steps = self._read_logged_steps()
            fresh = [Metric(k, v, t, step) for k, v, t, step in args[0] if step > self.logged_steps.get(k, -1)]
            if fresh:
                self.client.log_batch(self.run_id, metrics=fresh)
            for m in fresh:
                self.logged_steps[m.key] = max(m.step, self.logged_steps.get(m.key, -1))
        elif kind == "tag":
            self.client.set_tag(self.run_id, *args)
        elif kind == "status":
            self.client.set_terminated(self.run_id, args[0])
        else:
            folder, name, data = args
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / name).write_bytes(data)
                self.client.log_artifact(self.run_id, str(Path(tmp) / name), folder)

    def _read_logged_steps(self) -> dict[str, int]:
        keys = self.client.get_run(self.run_id).data.metrics
        return {k: max((m.step for m in self.client.get_metric_history(self.run_id, k)), default=-1) for k in keys}


class _quick_requests:
    """MLflow's HTTP client without its minutes of retries: RunLogger retries itself, later."""

    SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

    def __init__(self, active: bool):
        self.active, self.saved = active, {}

    def __enter__(self):
        if self.active:
            self.saved = {k: os.environ.get(k) for k in self.SETTINGS}
            os.environ.update(self.SETTINGS)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pick_best(items: list, value, run_id, mode: str = "max"):
    """The best of ``items`` (None when empty): the highest (``mode`` max) or lowest (min) ``value(item)``, and at
    an exact tie the smallest MLflow run id ``run_id(item)``. The one rule of the sweep's ``raysseg.best_run_id``
    and of :func:`pull_best`."""
    sign = -1.0 if mode == "max" else 1.0
    return min(items, key=lambda item: (sign * float(value(item)), run_id(item)), default=None)


def pull_best(experiment: str, metric: str, out: str, mode: str = "max", filter_string: str = "",
              uri: str = "", register_as: str = "", alias: str = "best") -> dict:
    """Download the checkpoint of the finished run with the best ``metric`` in ``experiment``
    (:func:`pick_best`: at an exact tie, the smallest run id, as the sweep's ``raysseg.best_run_id``).

    Writes ``out/model.pt`` and ``out/run.json`` (run id, metric, params) and returns the
    latter. ``register_as`` also registers that run's MLflow Model (:func:`register`) and points
    ``alias`` at it: ``models:/<name>@<alias>`` then loads with ``mlflow.pyfunc.load_model``."""
    import json
    import shutil

    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    if _client(uri).get_experiment_by_name(experiment) is None:
        raise TrackingError(f"no MLflow experiment {experiment!r} at {uri}; set --experiment or MLFLOW_TRACKING_URI")
    where = "attributes.status = 'FINISHED'" + (f" and {filter_string}" if filter_string else "")
    try:
        runs = mlflow.search_runs(experiment_names=[experiment], filter_string=where, output_format="list")
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"--filter {filter_string!r}: {e.message.splitlines()[0]}") from None
    candidates = [r for r in runs if metric in r.data.metrics and CHECKPOINT_TAG in r.data.tags
                  and np.isfinite(r.data.metrics[metric])]
    if not candidates:
        seen = sorted({k for r in runs for k in r.data.metrics})
        raise TrackingError(f"no finished run with a checkpoint in {experiment!r} has metric {metric!r}"
                            + (f"; metrics there: {', '.join(seen[:20])}" if seen else ""))
    best = pick_best(candidates, lambda r: r.data.metrics[metric], lambda r: r.info.run_id, mode)
    run_id = best.info.run_id
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/model.pt",
                                                    dst_path=tmp, tracking_uri=uri)
        shutil.move(local, out_dir / "model.pt")
    info = {"run_id": run_id, "run_name": best.data.tags.get(RUN_NAME_TAG, best.info.run_name),
            "metric": metric, "value": best.data.metrics[metric], "mode": mode, "tracking_uri": uri,
            "checkpoint": str(out_dir / "model.pt"), "source": f"runs:/{run_id}/checkpoint",
            "params": dict(best.data.params)}
    if register_as:
        info["registered"] = register(uri, run_id, register_as, alias, {metric: str(info["value"])},
                                      checkpoint=info["checkpoint"])
    (out_dir / "run.json").write_text(json.dumps(info, indent=2))
    return info


def register(uri: str, run_id: str, name: str, alias: str, tags: dict | None = None, checkpoint: str = "") -> str:
    """Register run ``run_id``'s MLflow Model (``model/``, :mod:`raysseg.io.registry`) as a version of model
    ``name`` and point ``alias`` at it; returns ``models:/<name>@<alias>``.

    The model is logged into the run once, from the local ``checkpoint`` file (default: the run's
    ``checkpoint/model.pt``). A run already registered under ``name`` as an MLflow Model keeps its version:
    only the alias (and ``tags``) are set again (a version registered before as a bare checkpoint folder
    is left as it is; the run gets a loadable one)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from raysseg.io import registry

    client = _client(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="raysseg segmenters: MLflow pyfunc models, image -> label map")
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + registry.MODEL_ARTIFACT
    versions = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                if v.source == source]
    if versions:
        version = min(versions, key=lambda v: int(v.version))
        for key, value in (tags or {}).items():
            client.set_model_version_tag(name, version.version, key, value)
    else:
        if not registry.has_model(client, run_id):
            with tempfile.TemporaryDirectory() as tmp:
                if not checkpoint:
                    checkpoint = mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path="checkpoint/model.pt", dst_path=tmp, tracking_uri=uri)
                registry.log_model(client, run_id, checkpoint)
        version = client.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
    client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}@{alias}"
