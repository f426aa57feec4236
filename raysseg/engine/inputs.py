"""Checks of a run's inputs that need no Ray: done by every runner before it starts anything."""
from __future__ import annotations

from raysseg.io.images import DatasetError, list_split
from raysseg.io.prepared import PreparedSplit, check_setting, prepare
from raysseg.methods.registry import output_stride, spec
from raysseg.settings import ConfigError


def check_inputs(cfg) -> int:
    """Everything that can be checked before training starts; returns the training image count."""
    try:
        check_setting(cfg.data.cache)
    except DatasetError as exc:
        raise ConfigError(str(exc)) from None
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


def prepared_split(cfg, run=None) -> PreparedSplit | None:
    """The prepared-data cache of the training split (``data.cache``), built first if there is none for the
    split as it is now (``run``: see :func:`raysseg.io.prepared.prepare`); None when ``data.cache`` is off."""
    return prepare(cfg.data.train, cfg.data.image_size, cfg.data.cache, run=run) if cfg.data.cache else None


def run_plan(cfg, prepared: PreparedSplit | None = None) -> tuple[dict, dict[str, dict]]:
    """(the method's plan, computed once for every worker; every dataset the run reads, name ->
    reading options of :func:`raysseg.io.images.read_plan` plus ``shuffle``): ``cluster``, the
    training split centre-cropped, and the method's own. With ``prepared`` (:func:`prepared_split`)
    every one of them reads that cache."""
    files = list_split(cfg.data.train, with_labels=False).images
    files = files[: cfg.data.limit] if cfg.data.limit else files
    method = spec(cfg.method)
    plan = method.plan(cfg, files, (cfg.data.image_size // output_stride(cfg)) ** 2) if method.plan else {}
    common = {"image_size": cfg.data.image_size, "with_labels": False, "limit": cfg.data.limit or None}
    if prepared is not None:
        common["prepared"] = prepared
    wanted = {"cluster": {"train": False}, **method.datasets(cfg, plan)}
    return plan, {name: {**common, **options} for name, options in wanted.items()}
