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
