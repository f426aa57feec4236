"""SegSort and visual concepts: their config sections, datasets and benchmark timers."""
from __future__ import annotations

from dataclasses import dataclass

from raysseg.methods.base import MethodSpec
from raysseg.settings import setting


@dataclass
class SegSortConfig:
    embed_dim: int = setting(32, lo=2, hi=4096, help="pixel embedding size (unit sphere)")
    kappa: float = setting(10.0, lo=1e-3, hi=1000.0, help="vMF concentration: similarity exp(kappa * cos)")
    memory_batches: int = setting(2, lo=0, hi=1000, help="prototypes of the last B global batches, held by the concept bank")
    min_cells: int = setting(1, lo=1, hi=4096, help="SegSort training segments (pixel sorting x pseudo "
                             "segments) smaller than this many embedding cells merge into a neighbour (1: off; "
                             "visual concepts ignores it)")


@dataclass
class ConceptsConfig:
    n_concepts: int = setting(512, lo=2, hi=1_000_000, help="global concepts: VQ dictionary size")
    beta: float = setting(0.5, lo=0.0, hi=100.0, help="VQ commitment constant")
    decay: float = setting(0.99, lo=0.0, hi=1.0, help="EMA decay of the dictionary and the co-occurrence counts")
    lambda_s: float = setting(1.0, lo=0.0, help="weight of the local-concept loss")
    lambda_v: float = setting(2.0, lo=0.0, help="weight of the global-concept (VQ) loss")
    lambda_c: float = setting(1.0, lo=0.0, help="weight of the co-occurrence loss")
    warmup: int = setting(0, lo=0, help="steps training only the local-concept term (the dictionary still learns)")
    restart_after: int = setting(0, lo=0, help="a concept with no assignment in this many + 1 global steps "
                                 "restarts at a current prototype with one assignment's weight; the built-in "
                                 "concepts configs set 10 (0: the earlier, defective rule, ema count below 0.01 with "
                                 "restarts weighted as 1 / (1 - decay) assignments: ~460 idle steps at decay 0.99, "
                                 "so a 138-step CamVid run restarts nothing after step 1; 0 stays the field's "
                                 "default so that other methods' run names do not change)")


def _head(cfg, backbone_dim: int):
    from raysseg.methods.segsort.core import EmbeddingHead

    head = EmbeddingHead(backbone_dim, cfg.segsort.embed_dim)
    head.code_dim = cfg.segsort.embed_dim
    return head


def _concept_buffers(cfg, code_dim: int) -> dict:
    return {"concepts": (cfg.concepts.n_concepts, code_dim)}  # the dictionary, copied from the bank at checkpoints


def _datasets(cfg, plan: dict) -> dict:
    from raysseg.core.segments import oversegment_kwargs

    return {"train": {"train": False, "shuffle": True, "segments": oversegment_kwargs(cfg.segments)}}


_COMMON = dict(
    trainer="raysseg.methods.segsort.trainer:SegmentTrainer", head=_head, datasets=_datasets,
    step_timers=(("bank", "bank read"), ("augment", "views"), ("forward_segments", "fwd + segments"),
                 ("loss", "losses"), ("backward", "backward+opt")),
    bench_backbone="ResNet-18-FPN (trained)",
)
SEGSORT = MethodSpec(trains_trunk=True, name="segsort", summary="SegSort: pixel sorting within pseudo segments, vMF segment loss",
                     sections=(("segsort", SegSortConfig),), **_COMMON)
CONCEPTS = MethodSpec(trains_trunk=True, name="concepts", summary="visual concepts: local, global (VQ dictionary) and co-occurrence",
                      sections=(("segsort", SegSortConfig), ("concepts", ConceptsConfig)), buffers=_concept_buffers,
                      **_COMMON)
