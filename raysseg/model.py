"""The segmenter every method produces, and its checkpoint file.

A :class:`Segmenter` is a backbone, an optional method head and the k-means centroids
fitted on the training split. ``codes`` gives L2-normalised per-location embeddings;
clustering them against the centroids gives the unsupervised segmentation. The same
object is used by training, evaluation and ``predict``.
"""
from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch import nn

from raysseg.backbones import build_backbone, normalize
from raysseg.config import Config, config_from_dict

CHECKPOINT_FILE = "model.pt"


class Segmenter(nn.Module):
    def __init__(self, cfg: Config, load_backbone_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        weights = cfg.model.weights or None if load_backbone_weights else None
        fpn_dim = cfg.model.fpn_dim if cfg.model.backbone.endswith("_fpn") else None
        self.backbone = build_backbone(cfg.model.backbone, weights=weights, frozen=cfg.model.frozen, fpn_dim=fpn_dim)
        self.head: nn.Module | None = None
        if cfg.method == "hp":
            from raysseg.methods.hp_core import HPModel

            self.head = HPModel(self.backbone.dim, cfg.model.code_dim)
        self.code_dim = cfg.model.code_dim if self.head is not None else self.backbone.dim
        self.register_buffer("centroids", torch.zeros(cfg.n_clusters, self.code_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def stride(self) -> int:
        return self.backbone.stride

    @staticmethod
    def stride_of(cfg: Config) -> int:
        """Feature stride of the configured backbone, without building it."""
        return {"vit_small_patch16": 16, "vit_small_patch8": 8, "vit_base_patch8": 8}.get(cfg.model.backbone, 4)

    def codes_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, C, h, w) -> L2-normalised codes (B, D, h, w)."""
        codes = self.head.codes(feats) if self.head is not None else feats
        return F.normalize(codes, dim=1)

    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> L2-normalised codes (B, D, H/stride, W/stride)."""
        device = self.centroids.device
        feats = self.backbone(normalize(images.to(device))).features
        return self.codes_from_features(feats)

    def cluster_logits(self, codes: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to each centroid: codes (B, D, h, w) -> (B, K, h, w)."""
        return torch.einsum("bdhw,kd->bkhw", codes, F.normalize(self.centroids, dim=1))

    @torch.no_grad()
    def cluster_map(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> cluster ids (B, H', W') at ``size`` (default: image size)."""
        logits = self.cluster_logits(self.codes(images))
        size = size or tuple(images.shape[1:3])
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)


def save_checkpoint(path: str, segmenter: Segmenter, **extra) -> None:
    """Write ``{config, state, **extra}`` atomically (local path or s3:// URI)."""
    from raysseg.storage import write_bytes_atomic

    buf = io.BytesIO()
    torch.save({"config": segmenter.cfg.to_dict(), "state": segmenter.state_dict(), **extra}, buf)
    write_bytes_atomic(path, buf.getvalue())


def read_checkpoint(uri: str) -> dict:
    """Load a checkpoint dict from a file, a run directory, s3:// or ``runs:/<id>/...``."""
    from raysseg.storage import StorageError, read_bytes

    if uri.startswith("runs:/"):
        import mlflow

        uri = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    if not uri.endswith(".pt"):
        uri = uri.rstrip("/") + "/" + CHECKPOINT_FILE
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise StorageError(f"checkpoint {uri} not found; pass the model.pt of a finished run") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise StorageError(f"checkpoint {uri} is not a raysseg checkpoint ({type(e).__name__}: {e})") from None


def load_segmenter(uri: str) -> tuple[Segmenter, dict]:
    """A Segmenter (eval mode) from a checkpoint, and the checkpoint's extra fields."""
    ckpt = read_checkpoint(uri)
    cfg = config_from_dict(ckpt["config"])
    seg = Segmenter(cfg, load_backbone_weights=False)
    seg.load_state_dict(ckpt["state"])
    return seg.eval(), ckpt
