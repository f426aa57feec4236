"""A raysseg checkpoint as an MLflow Model (pyfunc flavor): image in, label map out.

:func:`save_model` writes an MLflow Model folder: the checkpoint as its data (``data/model.pt``), this module
as its loader, the checkpoint's config in its metadata (``metadata.raysseg.config``), a signature, an input
example, and pip requirements pinned to the installed versions of raysseg's dependencies (given, not inferred:
nothing is downloaded). Loaded with ``mlflow.pyfunc.load_model(uri)``, ``predict(x)`` takes one uint8 image
(H, W, 3) and returns its label map (H, W), or a batch (N, H, W, 3) and returns (N, H, W): the same label map
as ``raysseg predict`` (:func:`raysseg.core.label_maps.label_map`). The signature declares the output only:
MLflow's tensor schema fixes the input's rank and would refuse one of the two forms. Loading needs raysseg
installed (``mlflow models serve ... --env-manager local``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

MODEL_ARTIFACT = "model"  # the run's artifact folder that holds the MLflow Model
CHECKPOINT_DATA = "model.pt"  # the checkpoint's name under the model's data/ folder


class ImageSegmenter:
    """What ``mlflow.pyfunc.load_model`` wraps: a segmenter that maps images to label maps."""

    def __init__(self, seg):
        self.seg = seg

    def predict(self, model_input, params=None):
        from raysseg.core.label_maps import label_map

        x = np.asarray(model_input)
        if x.ndim not in (3, 4) or x.shape[-1] != 3 or 0 in x.shape:
            raise ValueError(f"expected one image (H, W, 3) or a batch (N, H, W, 3) of uint8, got shape {x.shape}")
        if x.dtype != np.uint8:  # JSON from `mlflow models serve` arrives as int64
            if not np.issubdtype(x.dtype, np.integer) or x.min() < 0 or x.max() > 255:
                raise ValueError(f"expected uint8 pixel values 0..255, got {x.dtype} values "
                                 f"{x.min()}..{x.max()}; pass the image as uint8 RGB")
            x = x.astype(np.uint8)
        if x.ndim == 3:
            return label_map(self.seg, x)
        return np.stack([label_map(self.seg, image) for image in x])


def _load_pyfunc(data_path: str) -> ImageSegmenter:
    """MLflow's entry point (``loader_module``): the model from its data, on a GPU when there is one."""
    import torch

    from raysseg.io.checkpoints import read_checkpoint, segmenter_from

    seg = segmenter_from(read_checkpoint(data_path))
    return ImageSegmenter(seg.cuda() if torch.cuda.is_available() else seg)


def pip_requirements() -> list[str]:
    """raysseg's dependencies (not its extras) at their installed versions, e.g. ``torch==2.15.0``."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    pins = []
    for line in requires("raysseg") or []:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        pins.append(f"{req.name}{extras}=={installed}")
    return pins


def save_model(checkpoint: str, path: str, **metadata) -> None:
    """Write the MLflow Model of the raysseg checkpoint file ``checkpoint`` to the new folder ``path``;
    ``metadata`` (e.g. ``run_id``) goes into ``metadata.raysseg`` beside the config."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from raysseg.config import config_from_dict
    from raysseg.core.label_maps import label_dtype
    from raysseg.io.checkpoints import read_checkpoint

    cfg = read_checkpoint(checkpoint)["config"]
    n_clusters = config_from_dict(cfg).n_clusters
    labels = TensorSpec(np.dtype(label_dtype(n_clusters)), (-1, -1, -1), "labels")
    example = np.zeros((8, 8, 3), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / CHECKPOINT_DATA
        data.symlink_to(Path(checkpoint).resolve())
        mlflow.pyfunc.save_model(
            path, loader_module=__name__, data_path=str(data), pip_requirements=pip_requirements(),
            signature=ModelSignature(outputs=Schema([labels])), input_example=example,
            metadata={"raysseg": {"config": cfg, "method": cfg["method"], "n_clusters": n_clusters,
                                  **metadata}})


def log_model(client, run_id: str, checkpoint: str) -> None:
    """Log the MLflow Model of ``checkpoint`` into run ``run_id`` under ``model/``; its ``MLmodel`` last, so a
    run that has ``model/MLmodel`` has the whole model."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / MODEL_ARTIFACT
        save_model(checkpoint, str(folder), run_id=run_id)
        for entry in sorted(folder.iterdir()):
            if entry.name == "MLmodel":
                continue
            if entry.is_dir():
                client.log_artifacts(run_id, str(entry), f"{MODEL_ARTIFACT}/{entry.name}")
            else:
                client.log_artifact(run_id, str(entry), MODEL_ARTIFACT)
        client.log_artifact(run_id, str(folder / "MLmodel"), MODEL_ARTIFACT)


def has_model(client, run_id: str) -> bool:
    """Whether run ``run_id`` holds a complete MLflow Model under ``model/``."""
    return any(f.path == f"{MODEL_ARTIFACT}/MLmodel" for f in client.list_artifacts(run_id, MODEL_ARTIFACT))
