"""The raw distributions `raysseg data prepare` reads, and how each maps to the project's split layout
(pure numpy + PIL; the parallel job is :mod:`raysseg.runtime.prepare`)."""
from __future__ import annotations

from raysseg.io.datasets.cityscapes import CITYSCAPES27
from raysseg.io.datasets.cocostuff import COCOSTUFF27
from raysseg.io.datasets.layout import Dataset
from raysseg.io.datasets.potsdam import POTSDAM3
from raysseg.io.datasets.voc import VOC2012
from raysseg.settings import ConfigError

DATASETS: dict[str, Dataset] = {d.name: d for d in (COCOSTUFF27, CITYSCAPES27, POTSDAM3, VOC2012)}


def dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}: one of {', '.join(DATASETS)}")
    return DATASETS[name]
