"""MLflow: one run per training run (found again by name on resume), logged through a client.

No address means a local SQLite store (``mlruns.db``) with artifacts in ``mlartifacts/``
in the working directory; ``MLFLOW_TRACKING_URI`` or ``mlflow.tracking_uri`` points
at a server instead. Only the driver creates runs; rank 0 logs into them by id.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np

RUN_NAME_TAG = "raysseg.run_name"
CHECKPOINT_TAG = "raysseg.checkpoint"


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


def start_or_resume_run(uri: str, experiment: str, run_name: str, params: dict) -> tuple[str, bool]:
    """(run_id, resumed). A run that did not finish is reopened; otherwise a new one starts."""
    client = _client(uri)
    run = find_run(uri, experiment, run_name)
    if run is not None and run.info.status != "FINISHED":
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, True
    run = client.create_run(experiment_id(uri, experiment), run_name=run_name, tags={RUN_NAME_TAG: run_name})
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

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_bytes(self, data: bytes, artifact_path: str) -> None:
        """Log ``data`` as the artifact file ``artifact_path`` (e.g. ``eval/confusion.png``)."""
        folder, name = os.path.split(artifact_path)
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
