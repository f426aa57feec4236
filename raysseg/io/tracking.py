"""MLflow: one run per training run (found again by name on resume), logged through a client.

No address means a local SQLite store (``mlruns.db``) with artifacts in ``mlartifacts/``
in the working directory; ``MLFLOW_TRACKING_URI`` or ``mlflow.tracking_uri`` points
at a server instead. Only the driver creates runs; rank 0 logs into them by id.
"""
from __future__ import annotations

import io
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

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


def tracking_uri(configured: str = "") -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


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
    """Logs into one existing run; safe to construct inside Ray workers."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, redact(str(value)))

    def log_bytes(self, data: bytes, artifact_path: str) -> None:
        """Log ``data`` as the artifact file ``artifact_path`` (e.g. ``eval/confusion.png``)."""
        folder, name = os.path.split(artifact_path)
        if name.endswith((".txt", ".json", ".csv", ".yaml", ".log")):
            data = redact(data.decode("utf-8", errors="replace")).encode()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), folder or None)

    def log_image(self, image: np.ndarray, artifact_path: str) -> None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
        self.log_bytes(buf.getvalue(), artifact_path)

    def log_file(self, local_path: str, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, folder)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status


class TrackingError(RuntimeError):
    """An MLflow lookup found nothing usable; the message is one line and says what to do."""


def pull_best(experiment: str, metric: str, out: str, mode: str = "max", filter_string: str = "",
              uri: str = "", register_as: str = "", alias: str = "best") -> dict:
    """Download the checkpoint of the finished run with the best ``metric`` in ``experiment``.

    Writes ``out/model.pt`` and ``out/run.json`` (run id, metric, params) and returns the
    latter. ``register_as`` also registers that checkpoint in the MLflow model registry and
    points ``alias`` at the new version: ``models:/<name>@<alias>`` then loads it."""
    import json
    import shutil

    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    if _client(uri).get_experiment_by_name(experiment) is None:
        raise TrackingError(f"no MLflow experiment {experiment!r} at {uri}; set --experiment or MLFLOW_TRACKING_URI")
    where = "attributes.status = 'FINISHED'" + (f" and {filter_string}" if filter_string else "")
    try:
        runs = mlflow.search_runs(experiment_names=[experiment], filter_string=where, output_format="list",
                                  order_by=[f"metrics.`{metric}` {'DESC' if mode == 'max' else 'ASC'}"])
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"--filter {filter_string!r}: {e.message.splitlines()[0]}") from None
    candidates = [r for r in runs if metric in r.data.metrics and CHECKPOINT_TAG in r.data.tags
                  and np.isfinite(r.data.metrics[metric])]
    if not candidates:
        seen = sorted({k for r in runs for k in r.data.metrics})
        raise TrackingError(f"no finished run with a checkpoint in {experiment!r} has metric {metric!r}"
                            + (f"; metrics there: {', '.join(seen[:20])}" if seen else ""))
    best = candidates[0]
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
        info["registered"] = register(uri, run_id, register_as, alias, {metric: str(info["value"])})
    (out_dir / "run.json").write_text(json.dumps(info, indent=2))
    return info


def register(uri: str, run_id: str, name: str, alias: str, tags: dict | None = None) -> str:
    """Register a run's ``checkpoint/`` artifact folder as a new version of model ``name``
    and point ``alias`` at it; returns ``models:/<name>@<alias>``."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="raysseg checkpoints (model.pt)")
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/checkpoint"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
    client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}@{alias}"
