"""PiCIE and PGG + CAE: their config section, datasets, input checks and benchmark timers."""
from __future__ import annotations

from dataclasses import dataclass

from raysseg.methods.base import MethodSpec
from raysseg.settings import ConfigError, setting


@dataclass
class PGGConfig:
    guidance: str = setting("pyramid", choices=("none", "image", "pyramid"),
                            help="image-level pseudo labels: none (PiCIE + CAE), one per image (GG), or 6 pyramid views (PGG)")
    global_clusters: int = setting(50, lo=2, help="k-means clusters of the pooled self-supervised features")
    keep_fraction: float = setting(0.4, lo=0.01, hi=1.0, help="active selection: views closest to their centre kept")
    cam: str = setting("modified", choices=("classic", "modified"), help="classic: GAP-Linear; modified: GAP-Linear-ReLU-Linear")
    weight: float = setting(1.0, lo=0.0, help="weight of the image-level loss")
    cae: bool = setting(True, help="context-aware embedding at twice the output stride (1/16 by default)")
    cae_affinity: str = setting("both", choices=("both", "feature", "raw"),
                                help="CAE affinity: cosine x colour/position kernels, cosine only, or kernels only")
    output_stride: int = setting(8, choices=(4, 8), help="pixels per embedding cell: 8 (the paper; CAE at 1/16) or 4 "
                                 "(PiCIE's resolution; CAE at 1/8), for small images")


def _pgg_head(cfg, backbone_dim: int):
    from raysseg.methods.picie.core import PGGHead

    p = cfg.pgg
    head = PGGHead(backbone_dim, cae=p.cae, affinity=p.cae_affinity, n_global=p.global_clusters,
                   guidance=p.guidance != "none", modified_cam=p.cam == "modified", output_stride=p.output_stride)
    head.code_dim = backbone_dim
    return head


def _check_config(cfg) -> None:
    if not cfg.model.backbone.endswith("_fpn"):
        raise ConfigError(f"model.backbone: {cfg.method} trains a ResNet-FPN, got {cfg.model.backbone}")
    if cfg.model.frozen:
        raise ConfigError(f"model.frozen: {cfg.method} trains the backbone; set model.frozen=false")


def _plan(cfg, files: list[str], grid: int) -> dict:
    return {"files": files}  # a row index per training file (PGG's pseudo-label table)


def _datasets(cfg, plan: dict) -> dict:
    return {"train": {"train": False, "shuffle": True}}  # whole images: the trainer crops and augments


_COMMON = dict(
    trainer="raysseg.methods.picie.trainer:PiCIETrainer", datasets=_datasets, plan=_plan, check_config=_check_config,
    step_timers=(("labels", "views + snapshot labels"), ("forward_loss", "fwd + loss"), ("backward", "backward+opt")),
    once_timers=(("extract", "feature extraction s (per epoch)"), ("cluster_total", "extraction + k-means s (per epoch)")),
    bench_backbone="ResNet-18-FPN (trained)",
)
PICIE = MethodSpec(trains_trunk=True, name="picie", summary="PiCIE: clustering with photometric invariance and geometric equivariance",
                   **_COMMON)
PGG = MethodSpec(trains_trunk=True, name="pgg", summary="PiCIE + pyramid global guidance + context-aware embedding",
                 sections=(("pgg", PGGConfig),), head=_pgg_head,
                 output_stride=lambda cfg: cfg.pgg.output_stride, **_COMMON)
