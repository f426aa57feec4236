"""The concept bank: one Ray actor per run that owns the state workers share.

State is a set of named, versioned tables (for HP: ``pool`` = backbone features of M
patches, one per image, and ``sp`` = EMA-head codes of those patches; for PiCIE/PGG:
``centroids`` of each epoch and the fixed ``pgg_labels``). Each worker
contributes its slice of a new version with :meth:`put_part`; the version is published
only when every worker has contributed, assembled in index order, so the result does
not depend on which worker was fastest. :meth:`get` blocks until a version is
published. Every worker therefore uses identical tables at a given step.

A worker asks for version v only after it has contributed to v, and v+1 cannot be
published before every worker has contributed to it, so a worker never skips a version.
The bank keeps an audit trail of what each rank read (version and checksum); the
driver logs it to MLflow and the tests compare it across workers.
"""
from __future__ import annotations

import asyncio

import numpy as np
import ray


def checksum(values: np.ndarray) -> float:
    """An order-sensitive fingerprint of a table, to compare what workers saw."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return float(np.dot(v, np.cos(np.arange(v.size, dtype=np.float64))))


def reads_by_version(trace: list[dict]) -> dict[tuple[str, int], dict[int, float]]:
    """A bank trace (``bank_trace.json``) as {(table, version): {rank: checksum}}: equal checksums
    across ranks mean every worker used the same table."""
    seen: dict = {}
    for t in trace:
        seen.setdefault((t["table"], t["version"]), {})[t["rank"]] = t["checksum"]
    return seen


@ray.remote(num_cpus=0, max_restarts=-1)
class ConceptBank:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.tables: dict[str, tuple[int, np.ndarray]] = {}
        self.pending: dict[tuple[str, int], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self.trace: list[dict] = []
        self.handoff: dict[str, dict[int, object]] = {}
        self.changed = asyncio.Condition()

    async def put_part(self, name: str, version: int, rank: int, index: np.ndarray, values: np.ndarray) -> None:
        """Contribute rows ``index`` of version ``version`` of table ``name`` from ``rank``."""
        current = self.tables.get(name, (0, None))[0]
        if version <= current:
            return  # already published (a restarted worker repeating itself)
        parts = self.pending.setdefault((name, version), {})
        parts[rank] = (np.asarray(index), np.asarray(values))
        if len(parts) == self.world_size:
            idx = np.concatenate([p[0] for p in parts.values()])
            vals = np.concatenate([p[1] for p in parts.values()])
            order = np.argsort(idx, kind="stable")
            self.tables[name] = (version, vals[order])
            del self.pending[(name, version)]
            async with self.changed:
                self.changed.notify_all()

    async def get(self, name: str, version: int, rank: int = -1) -> tuple[int, np.ndarray]:
        """Wait for version >= ``version`` of ``name``; returns (version, table)."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.tables.get(name, (0, None))[0] >= version)
        v, values = self.tables[name]
        self.trace.append({"rank": rank, "table": name, "version": v, "checksum": checksum(values)})
        return v, values

    async def publish(self, name: str, version: int, values: np.ndarray) -> None:
        """A table with one writer (e.g. centroids computed by rank 0): publish it whole."""
        if version > self.tables.get(name, (0, None))[0]:
            self.tables[name] = (version, np.asarray(values))
            async with self.changed:
                self.changed.notify_all()

    async def share(self, key: str, rank: int, obj) -> None:
        """Hand a small object (e.g. object refs of feature blocks) to whoever calls :meth:`collect`."""
        self.handoff.setdefault(key, {})[rank] = obj
        async with self.changed:
            self.changed.notify_all()

    async def collect(self, key: str) -> list:
        """Wait until every rank has shared ``key``; returns the objects in rank order and forgets them."""
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.handoff.get(key, {})) == self.world_size)
        parts = self.handoff.pop(key)
        return [parts[r] for r in sorted(parts)]

    def version(self, name: str) -> int:
        return self.tables.get(name, (0, None))[0]

    def get_trace(self) -> list[dict]:
        return list(self.trace)

    def state(self) -> dict:
        """Everything needed to restore the bank (goes into each checkpoint)."""
        return {"tables": {k: (v, t.copy()) for k, (v, t) in self.tables.items()}}

    async def restore(self, state: dict) -> None:
        self.tables = {k: (int(v), np.asarray(t)) for k, (v, t) in state.get("tables", {}).items()}
        self.pending.clear()
        async with self.changed:
            self.changed.notify_all()
