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

from raysseg.core.backbones import build_backbone, standardize
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
            from raysseg.methods.hp.core import HPModel

            self.head = HPModel(self.backbone.dim, cfg.model.code_dim)
        elif cfg.method == "pgg":
            from raysseg.methods.picie.core import PGGHead

            p = cfg.pgg
            self.head = PGGHead(self.backbone.dim, cae=p.cae, affinity=p.cae_affinity, n_global=p.global_clusters,
                                guidance=p.guidance != "none", modified_cam=p.cam == "modified")
        elif cfg.method in ("segsort", "concepts"):
            from raysseg.methods.segsort.core import EmbeddingHead

            self.head = EmbeddingHead(self.backbone.dim, cfg.segsort.embed_dim)
        self.code_dim = {"hp": cfg.model.code_dim, "segsort": cfg.segsort.embed_dim,
                         "concepts": cfg.segsort.embed_dim}.get(cfg.method, self.backbone.dim)
        if cfg.method == "concepts":  # the global-concept dictionary, copied from the concept bank every epoch
            self.register_buffer("concepts", torch.zeros(cfg.concepts.n_concepts, self.code_dim))
        self.register_buffer("centroids", torch.zeros(cfg.n_clusters, self.code_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def stride(self) -> int:
        return self.stride_of(self.cfg)

    @property
    def input_multiple(self) -> int:
        """Image sides must be multiples of this (ResNet trunks downsample by 32)."""
        return self.backbone.stride if self.backbone.stride > 4 else 32

    @staticmethod
    def stride_of(cfg: Config) -> int:
        """Pixels per code cell for this config, without building the model."""
        if cfg.method == "pgg":
            return 8
        return {"vit_small_patch16": 16, "vit_small_patch8": 8, "vit_base_patch8": 8}.get(cfg.model.backbone, 4)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (B, 3, H, W) -> unnormalised embedding (B, D, H/stride, W/stride).

        Differentiable: the methods that train the backbone call it inside their step."""
        feats = self.backbone(standardize(x)).features
        if self.cfg.method == "hp":
            return self.head.codes(feats)
        if self.cfg.method == "pgg":
            return self.head(feats, x)
        if self.head is not None:
            return self.head(feats)
        return feats

    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> L2-normalised codes (B, D, H/stride, W/stride)."""
        x = images.to(self.centroids.device).permute(0, 3, 1, 2).float().div_(255.0)
        return F.normalize(self.embed(x), dim=1)

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
    from raysseg.io.storage import write_bytes_atomic

    buf = io.BytesIO()
    torch.save({"config": segmenter.cfg.to_dict(), "state": segmenter.state_dict(), **extra}, buf)
    write_bytes_atomic(path, buf.getvalue())


def read_checkpoint(uri: str) -> dict:
    """Load a checkpoint dict from a file, a run directory, s3://, ``runs:/<id>/checkpoint``
    or a registered model ``models:/<name>@<alias>`` (or ``models:/<name>/<version>``)."""
    from raysseg.io.storage import StorageError, read_bytes

    if uri.startswith(("runs:/", "models:/")):
        import mlflow

        from raysseg.io.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())  # $MLFLOW_TRACKING_URI, else the local store
        try:
            uri = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        except mlflow.exceptions.MlflowException as e:
            raise StorageError(f"checkpoint {uri}: {e.message.splitlines()[0]} (MLflow at "
                               f"{mlflow.get_tracking_uri()}; set MLFLOW_TRACKING_URI)") from None
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
