"""The one list of methods. Adding a method: a folder ``methods/<name>/`` (core.py, trainer.py,
spec.py), one line here, and a YAML config in ``raysseg/configs/``."""
from __future__ import annotations

import importlib

from raysseg.methods.base import MethodSpec
from raysseg.methods.hp.spec import HP
from raysseg.methods.kmeans.spec import KMEANS
from raysseg.methods.moco.spec import MOCO
from raysseg.methods.picie.spec import PGG, PICIE
from raysseg.methods.segsort.spec import CONCEPTS, SEGSORT
from raysseg.methods.stego.spec import STEGO

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (KMEANS, HP, PICIE, PGG, SEGSORT, CONCEPTS, STEGO)}
PRETRAINING = MOCO  # `raysseg pretrain`: trains a backbone, not a segmenter


def spec(name: str) -> MethodSpec:
    return METHODS[name]


def trained_methods() -> list[str]:
    return [name for name, s in METHODS.items() if s.trainer]


def config_sections() -> list[tuple[str, type]]:
    """Every method's config sections, once each, in registry order."""
    out: dict[str, type] = {}
    for s in (*METHODS.values(), PRETRAINING):
        for name, cls in s.sections:
            out.setdefault(name, cls)
    return list(out.items())


def trainer_class(s: MethodSpec):
    module, cls = s.trainer.split(":")
    return getattr(importlib.import_module(module), cls)


def output_stride(cfg) -> int:
    """Pixels per code cell for ``cfg``, without building the model."""
    from raysseg.core.geometry import feature_stride

    stride = spec(cfg.method).output_stride
    stride = stride(cfg) if callable(stride) else stride
    return stride or feature_stride(cfg.model.backbone)


def build_segmenter(cfg, load_backbone_weights: bool = True, read_bytes=None):
    """The Segmenter of ``cfg``: its backbone, its method's head and buffers (``read_bytes``: see
    :func:`raysseg.core.backbones.build_backbone`)."""
    from raysseg.core.segmenter import Segmenter

    s = spec(cfg.method)
    return Segmenter(cfg, head=s.head, buffers=s.buffers, stride=output_stride(cfg),
                     load_backbone_weights=load_backbone_weights, read_bytes=read_bytes)


def build_trainer(cfg, seg, ctx):
    """The method's trainer for one worker (see :class:`raysseg.methods.base.Trainer`)."""
    return trainer_class(spec(cfg.method))(cfg, seg, ctx)
