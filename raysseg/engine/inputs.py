"""Checks of a run's inputs that need no Ray: done by every runner before it starts anything."""
from __future__ import annotations

from raysseg.io.images import list_split
from raysseg.methods.registry import output_stride, spec
from raysseg.settings import ConfigError


def check_inputs(cfg) -> int:
    """Everything that can be checked before training starts; returns the training image count."""
    files = list_split(cfg.data.train, with_labels=False).images
    n = min(len(files), cfg.data.limit) if cfg.data.limit else len(files)
    per_worker = n // cfg.train.num_workers
    if spec(cfg.method).trainer and per_worker < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} images per worker but only {per_worker} per worker "
            f"({n} images, {cfg.train.num_workers} workers); lower train.batch_size or train.num_workers"
        )
    spec(cfg.method).check_inputs(cfg, n)
    return n


def run_plan(cfg) -> tuple[dict, dict[str, dict]]:
    """(the method's plan, computed once for every worker; every dataset the run reads, name ->
    reading options of :func:`raysseg.io.images.read_plan` plus ``shuffle``): ``cluster``, the
    training split centre-cropped, and the method's own."""
    files = list_split(cfg.data.train, with_labels=False).images
    files = files[: cfg.data.limit] if cfg.data.limit else files
    method = spec(cfg.method)
    plan = method.plan(cfg, files, (cfg.data.image_size // output_stride(cfg)) ** 2) if method.plan else {}
    common = {"image_size": cfg.data.image_size, "with_labels": False, "limit": cfg.data.limit or None}
    wanted = {"cluster": {"train": False}, **method.datasets(cfg, plan)}
    return plan, {name: {**common, **options} for name, options in wanted.items()}
