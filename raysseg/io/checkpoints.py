"""The one checkpoint format and its one loader: ``{config, state, **extra}`` in ``model.pt``."""
from __future__ import annotations

import io

import torch

from raysseg.config import config_from_dict
from raysseg.methods.registry import build_segmenter

CHECKPOINT_FILE = "model.pt"


class CheckpointError(ValueError):
    """A checkpoint's weights do not fit the model its own config builds; the message is one line."""


def save_checkpoint(path: str, segmenter, **extra) -> None:
    """Write ``{config, state, **extra}`` atomically (local path or s3:// URI)."""
    from raysseg.io.storage import write_bytes_atomic

    buf = io.BytesIO()
    torch.save({"config": segmenter.cfg.to_dict(), "state": segmenter.state_dict(), **extra}, buf)
    write_bytes_atomic(path, buf.getvalue())


def read_checkpoint(uri: str) -> dict:
    """Load a checkpoint dict from a file, a run directory, s3://, ``runs:/<id>/checkpoint``
    or a registered model ``models:/<name>@<alias>`` (or ``models:/<name>/<version>``): an MLflow Model
    (:mod:`raysseg.io.registry`; its data is the checkpoint) or, registered before, a bare checkpoint folder."""
    from raysseg.io.storage import StorageError, read_bytes

    if uri.startswith(("runs:/", "models:/")):
        import mlflow

        from raysseg.io.store_uri import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())  # $MLFLOW_TRACKING_URI, else the local store
        try:
            uri = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        except mlflow.exceptions.MlflowException as e:
            raise StorageError(f"checkpoint {uri}: {e.message.splitlines()[0]} (MLflow at "
                               f"{mlflow.get_tracking_uri()}; set MLFLOW_TRACKING_URI)") from None
    uri = model_data(uri)
    if not uri.endswith(".pt"):
        uri = uri.rstrip("/") + "/" + CHECKPOINT_FILE
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise StorageError(f"checkpoint {uri} not found; pass the model.pt of a finished run") from None
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise StorageError(f"checkpoint {uri} is not a raysseg checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(ckpt, dict) and "config" in ckpt and "state" in ckpt:
        check_fits(ckpt, uri)
    return ckpt


def model_data(folder: str) -> str:
    """The data path (the checkpoint) of the MLflow Model in the local ``folder``, else ``folder`` itself."""
    from pathlib import Path

    import yaml

    mlmodel = Path(folder) / "MLmodel"
    if not mlmodel.is_file():
        return folder
    data = yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {}).get("data")
    return str(Path(folder) / data) if data else folder


def check_fits(ckpt: dict, uri: str) -> None:
    """Raise a one-line CheckpointError when ``ckpt["state"]`` does not fit the model ``ckpt["config"]`` builds
    (e.g. the config names another backbone). The model is built on the meta device: no memory, no weights."""
    cfg = config_from_dict(ckpt["config"])
    with torch.device("meta"):
        expected = build_segmenter(cfg, load_backbone_weights=False).state_dict()
    state = ckpt["state"]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights it does not have (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (e.g. {k}: {tuple(state[k].shape)} in the checkpoint, "
                        f"{tuple(expected[k].shape)} in the model)")
    raise CheckpointError(
        f"checkpoint {uri} does not fit its config (method {cfg.method}, model.backbone {cfg.model.backbone}): "
        f"{'; '.join(problems)}: pass a checkpoint written with that config, or fix the config stored in it")


def segmenter_from(ckpt: dict):
    """The Segmenter (eval mode) a loaded checkpoint dict holds."""
    seg = build_segmenter(config_from_dict(ckpt["config"]), load_backbone_weights=False)
    seg.load_state_dict(ckpt["state"])
    return seg.eval()


def load_segmenter(uri: str):
    """A Segmenter (eval mode) from a checkpoint, and the checkpoint's extra fields."""
    ckpt = read_checkpoint(uri)
    return segmenter_from(ckpt), ckpt
