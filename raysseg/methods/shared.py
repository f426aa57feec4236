"""The state workers share, as named, versioned tables (numpy only).

For HP: ``pool`` (backbone features of M patches, one per image) and ``sp`` (EMA-head codes of
those patches); for PiCIE/PGG: ``centroids`` of each epoch and the fixed ``pgg_labels``; for
SegSort and visual concepts: ``memory`` (segment prototypes of the last B global batches) and
the concept dictionary ``concepts`` with its ``cooccurrence`` counts, one version per step.

Each worker contributes its slice of a new version (:meth:`TableStore.put_part`); the version
is published only when every worker has contributed, assembled in index order, so the result
does not depend on which worker was fastest. A worker asks for version v only after it has
contributed to v, and v+1 cannot be published before every worker has contributed to it, so
a worker never skips a version. Every read is traced (rank, version, checksum).

A *reduced* state (the concept dictionary) is owned here, not by any worker: each rank sends
its contribution for a version and the last one triggers ``reducer(state, parts, rng)``, whose
arrays are published as tables. No worker holds a private copy that could drift.

:class:`TableStore` is the logic; :class:`LocalSharedState` serves one process with it, and
:class:`raysseg.runtime.bank.ConceptBank` (a Ray actor) serves every worker of a run with it.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np

TRACE_LENGTH = 100_000


def checksum(values: np.ndarray) -> float:
    """An order-sensitive fingerprint of a table, to compare what workers saw."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return float(np.dot(v, np.cos(np.arange(v.size, dtype=np.float64))))


def reads_by_version(trace: list[dict]) -> dict[tuple[str, int], dict[int, float]]:
    """A trace (``bank_trace.json``) as {(table, version): {rank: checksum}}: equal checksums
    across ranks mean every worker used the same table."""
    seen: dict = {}
    for t in trace:
        seen.setdefault((t["table"], t["version"]), {})[t["rank"]] = t["checksum"]
    return seen


class TableStore:
    """Versioned tables assembled from every rank's parts. Methods that may publish return True
    when they did (the Ray actor then wakes its waiting readers)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.tables: dict[str, tuple[int, np.ndarray]] = {}
        self.pending: dict[tuple[str, int], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self.handoff: dict[str, dict[int, object]] = {}
        self.rings: dict[str, list[np.ndarray]] = {}  # the batches behind each ring table (see append)
        self.dictionary: dict[str, np.ndarray] | None = None  # the reduced state
        self.dictionary_seed = 0
        self.trace: deque[dict] = deque(maxlen=TRACE_LENGTH)

    def version(self, name: str) -> int:
        return self.tables.get(name, (0, None))[0]

    def read(self, name: str, rank: int) -> tuple[int, np.ndarray]:
        v, values = self.tables[name]
        self.trace.append({"rank": rank, "table": name, "version": v, "checksum": checksum(values)})
        return v, values

    def _publish(self, name: str, version: int, values: np.ndarray) -> bool:
        self.tables[name] = (version, values)
        return True

    def _parts(self, name: str, version: int, rank: int, part) -> dict | None:
        """Record ``rank``'s part of a version; all parts once every rank has sent (else None)."""
        parts = self.pending.setdefault((name, version), {})
        parts[rank] = part
        if len(parts) < self.world_size:
            return None
        return self.pending.pop((name, version))

    def put_part(self, name: str, version: int, rank: int, index: np.ndarray, values: np.ndarray) -> bool:
        """Contribute rows ``index`` of version ``version`` of table ``name`` from ``rank``."""
        if version <= self.version(name):
            return False  # already published (a restarted worker repeating itself)
        parts = self._parts(name, version, rank, (np.asarray(index), np.asarray(values)))
        if parts is None:
            return False
        idx = np.concatenate([p[0] for p in parts.values()])
        vals = np.concatenate([p[1] for p in parts.values()])
        return self._publish(name, version, vals[np.argsort(idx, kind="stable")])

    def append(self, name: str, version: int, rank: int, values: np.ndarray, keep: int) -> bool:
        """Ring table: once every rank has contributed its rows to ``version``, the batch (rows in rank
        order) joins the ring, the oldest batches beyond ``keep`` leave it, and the table published as
        ``version`` is the ring's rows (oldest first). SegSort's memory bank of the last B batches."""
        if version <= self.version(name):
            return False
        parts = self._parts(name, version, rank, np.asarray(values))
        if parts is None:
            return False
        batch = np.concatenate([parts[r] for r in sorted(parts)])
        ring = (self.rings.get(name, []) + [batch])[-keep:] if keep > 0 else []
        self.rings[name] = ring
        return self._publish(name, version, np.concatenate(ring) if ring else batch[:0])

    def publish(self, name: str, version: int, values: np.ndarray) -> bool:
        """A table with one writer (e.g. centroids computed by rank 0): publish it whole."""
        return version > self.version(name) and self._publish(name, version, np.asarray(values))

    def init_reduced(self, state: dict[str, np.ndarray], seed: int) -> bool:
        """Publish version 1 of each array of the reduced ``state`` unless a state exists."""
        if self.dictionary is not None:
            return False
        self.dictionary, self.dictionary_seed = state, seed
        for name, values in state.items():
            self._publish(name, 1, values)
        return True

    def reduce(self, version: int, rank: int, contribution: Any, reducer: Callable) -> bool:
        """Contribute one rank's part to ``version`` of the reduced state; the last contribution applies
        ``reducer(state, [parts in rank order], rng=rng)`` and publishes its arrays as ``version``."""
        if version <= max(self.version(name) for name in self.dictionary):
            return False
        parts = self._parts("reduced", version, rank, contribution)
        if parts is None:
            return False
        rng = np.random.default_rng([self.dictionary_seed, version])
        self.dictionary = reducer(self.dictionary, [parts[r] for r in sorted(parts)], rng=rng)
        for name, values in self.dictionary.items():
            self._publish(name, version, values)
        return True

    def share(self, key: str, rank: int, obj) -> bool:
        """Hand a small object (e.g. references to feature blocks) to whoever calls :meth:`collect`."""
        self.handoff.setdefault(key, {})[rank] = obj
        return True

    def complete(self, key: str) -> bool:
        return len(self.handoff.get(key, {})) == self.world_size

    def collect(self, key: str) -> list:
        """Every rank's object shared as ``key``, in rank order (forgotten after)."""
        parts = self.handoff.pop(key)
        return [parts[r] for r in sorted(parts)]

    def state(self) -> dict:
        """Everything needed to restore the tables (goes into each checkpoint)."""
        return {"tables": {k: (v, t.copy()) for k, (v, t) in self.tables.items()},
                "rings": {k: [b.copy() for b in ring] for k, ring in self.rings.items()},
                "dictionary": self.dictionary, "dictionary_seed": self.dictionary_seed}

    def restore(self, state: dict) -> None:
        """Replace all state with ``state`` (from a checkpoint; ``{}`` = empty, a run's first start).
        Parts contributed by an earlier attempt are dropped, so every version is rebuilt by the ranks
        of the attempt that uses it."""
        self.handoff.clear()
        self.pending.clear()
        self.tables = {k: (int(v), np.asarray(t)) for k, (v, t) in state.get("tables", {}).items()}
        self.rings = {k: list(ring) for k, ring in state.get("rings", {}).items()}
        self.dictionary, self.dictionary_seed = state.get("dictionary"), state.get("dictionary_seed", 0)


class SharedStateError(RuntimeError):
    """A trainer read a version nobody can publish (in one process, every write comes first)."""


class LocalSharedState:
    """:class:`raysseg.methods.base.SharedState` for one process (world size 1): writes apply at
    once, so a read of an unpublished version is a bug, raised instead of waiting forever. Blocks
    stay numpy arrays and k-means runs here (:func:`raysseg.core.kmeans.blockwise_kmeans`)."""

    def __init__(self):
        self.store = TableStore(1)

    def version(self, name: str) -> int:
        return self.store.version(name)

    def get(self, name: str, version: int, rank: int = -1) -> tuple[int, np.ndarray]:
        if self.store.version(name) < version:
            raise SharedStateError(f"table {name!r} version {version} was never published "
                                   f"(latest {self.store.version(name)})")
        return self.store.read(name, rank)

    def get_many(self, names: list[str], version: int, rank: int = -1) -> dict[str, tuple[int, np.ndarray]]:
        return {name: self.get(name, version, rank) for name in names}

    def put_part(self, name, version, rank, index, values) -> None:
        self.store.put_part(name, version, rank, index, values)

    def append(self, name, version, rank, values, keep) -> None:
        self.store.append(name, version, rank, values, keep)

    def publish(self, name, version, values) -> None:
        self.store.publish(name, version, values)

    def init_reduced(self, state, seed) -> None:
        self.store.init_reduced(state, seed)

    def reduce(self, version, rank, contribution, reducer) -> None:
        self.store.reduce(version, rank, contribution, reducer)

    def share(self, key, rank, obj) -> None:
        self.store.share(key, rank, obj)

    def collect(self, key: str) -> list:
        if not self.store.complete(key):
            raise SharedStateError(f"{key!r} was collected before it was shared")
        return self.store.collect(key)

    def put_block(self, array: np.ndarray) -> np.ndarray:
        return array

    def get_blocks(self, handles: list) -> list[np.ndarray]:
        return list(handles)

    def kmeans(self, blocks: list, k: int, **options):
        from raysseg.core.kmeans import LocalExecutor, blockwise_kmeans

        return blockwise_kmeans(blocks, k, executor=LocalExecutor(), **options)

    def trace(self) -> list[dict]:
        return list(self.store.trace)

    def state(self) -> dict:
        return self.store.state()

    def restore(self, state: dict) -> None:
        self.store.restore(state)
