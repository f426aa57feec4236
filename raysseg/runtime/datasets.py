"""The Ray Data input pipeline: decoded, cropped rows of a split (decoding itself is in :mod:`raysseg.io.images`)."""
from __future__ import annotations

import ray.data

from raysseg.io.images import read_plan

def make_dataset(
    split_uri: str, *, image_size: int, train: bool, with_labels: bool, crop_scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = True, seed: int | None = 0, limit: int | None = None, files: list[str] | None = None,
    shuffle: bool = False, segments: dict | None = None, n_classes: int | None = None, ignore_index: int = 255,
) -> "ray.data.Dataset":
    """A Ray Dataset of decoded, cropped rows of a split: see :func:`raysseg.io.images.read_plan`.
    ``shuffle`` visits the images in a fresh random order every epoch (the file list is shuffled, not pixels)."""
    items, fn = read_plan(split_uri, image_size=image_size, train=train, with_labels=with_labels,
                          crop_scale=crop_scale, hflip=hflip, seed=seed, limit=limit, files=files,
                          segments=segments, n_classes=n_classes, ignore_index=ignore_index)
    ds = ray.data.from_items(items)
    if shuffle:
        ds = ds.random_shuffle()
    return ds.map_batches(fn, batch_size=16, batch_format="numpy")

