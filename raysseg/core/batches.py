"""Batches of decoded rows (dicts of numpy arrays with ``valid`` and ``error`` columns)."""
from __future__ import annotations

import numpy as np


def valid_rows(batch: dict) -> tuple[dict, list[tuple[str, str]]]:
    """Drop the rows with valid=False from a numpy batch; return (kept batch, [(path, error), ...])."""
    valid = np.asarray(batch["valid"], bool)
    skipped = [(str(p), str(e)) for p, e, ok in zip(batch["path"], batch["error"], valid) if not ok]
    if not skipped:
        return batch, []
    return {k: np.asarray(v)[valid] for k, v in batch.items()}, skipped


def rebatch(chunks, batch_size: int, drop_last: bool):
    """Batches of ``batch_size`` rows from chunks of any size (the last one shorter unless ``drop_last``)."""
    held = None
    for chunk in chunks:
        held = chunk if held is None else {k: np.concatenate([held[k], chunk[k]]) for k in chunk}
        while len(held["path"]) >= batch_size:
            yield {k: v[:batch_size] for k, v in held.items()}
            held = {k: v[batch_size:] for k, v in held.items()}
    if held is not None and len(held["path"]) and not drop_last:
        yield held


class BatchShard:
    """Given batches (dicts of numpy arrays), re-batched, with the ``iter_batches`` of a Ray Data shard:
    for tests, benchmarks and callers with rows of their own."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", drop_last: bool = False, **_):
        return rebatch(iter(self.batches), batch_size, drop_last)
