"""The concept bank: one Ray actor per run that owns the state workers share.

State is a set of named, versioned tables (for HP: ``pool`` = backbone features of M
patches, one per image, and ``sp`` = EMA-head codes of those patches; for PiCIE/PGG:
``centroids`` of each epoch and the fixed ``pgg_labels``; for SegSort and visual concepts:
``memory``, the segment prototypes of the last B global batches, and the concept
dictionary ``concepts`` with its ``cooccurrence`` counts, one version per step). Each worker
contributes its slice of a new version with :meth:`put_part`; the version is published
only when every worker has contributed, assembled in index order, so the result does
not depend on which worker was fastest. :meth:`get` blocks until a version is
published. Every worker therefore uses identical tables at a given step.

A worker asks for version v only after it has contributed to v, and v+1 cannot be
published before every worker has contributed to it, so a worker never skips a version.
The bank keeps an audit trail of what each rank read (version and checksum; the last
``TRACE_LENGTH`` reads); the driver logs it to MLflow and the tests compare it across workers.

The concept dictionary is owned by the bank: workers send their per-step assignment
statistics (:meth:`update_concepts`), and once every rank has contributed to a step the
bank applies one EMA update (:func:`raysseg.methods.segsort.core.update_dictionary`) and
publishes the result. No worker holds a private copy that could drift.
"""
from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
import ray

TRACE_LENGTH = 100_000


class BankLost(RuntimeError):
    """The bank's process died and Ray restarted it empty: training must restart from its latest
    checkpoint, which restores the bank (the driver does this on its own)."""


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
        self.trace: deque[dict] = deque(maxlen=TRACE_LENGTH)
        self.handoff: dict[str, dict[int, object]] = {}
        self.rings: dict[str, list[np.ndarray]] = {}  # the batches behind each ring table (see append)
        self.dictionary: dict[str, np.ndarray] | None = None  # EMA state of the concept dictionary
        self.dictionary_seed = 0
        self.changed = asyncio.Condition()
        # Ray restarted this actor after its process died: every table is gone. Refuse to serve until
        # a worker restores the state of the checkpoint the run restarts from.
        self.lost = ray.get_runtime_context().was_current_actor_reconstructed

    def _check(self) -> None:
        if self.lost:
            raise BankLost("the concept bank's process died and was restarted without its tables; "
                           "the run restarts from its latest checkpoint")

    async def put_part(self, name: str, version: int, rank: int, index: np.ndarray, values: np.ndarray) -> None:
        """Contribute rows ``index`` of version ``version`` of table ``name`` from ``rank``."""
        self._check()
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

    async def _publish(self, name: str, version: int, values: np.ndarray) -> None:
        self.tables[name] = (version, values)
        async with self.changed:
            self.changed.notify_all()

    async def get(self, name: str, version: int, rank: int = -1) -> tuple[int, np.ndarray]:
        """Wait for version >= ``version`` of ``name``; returns (version, table)."""
        self._check()
        async with self.changed:
            await self.changed.wait_for(lambda: self.tables.get(name, (0, None))[0] >= version)
        v, values = self.tables[name]
        self.trace.append({"rank": rank, "table": name, "version": v, "checksum": checksum(values)})
        return v, values

    async def get_many(self, names: list[str], version: int, rank: int = -1) -> dict[str, tuple[int, np.ndarray]]:
        """:meth:`get` of several tables in one round trip."""
        return {name: await self.get(name, version, rank) for name in names}

    async def append(self, name: str, version: int, rank: int, values: np.ndarray, keep: int) -> None:
        """Ring table: once every rank has contributed its rows to ``version``, the batch (rows in rank
        order) joins the ring, the oldest batches beyond ``keep`` leave it, and the table published as
        ``version`` is the ring's rows (oldest first). SegSort's memory bank of the last B batches."""
        self._check()
        if version <= self.tables.get(name, (0, None))[0]:
            return
        parts = self.pending.setdefault((name, version), {})
        parts[rank] = (np.zeros(0), np.asarray(values))
        if len(parts) < self.world_size:
            return
        batch = np.concatenate([parts[r][1] for r in sorted(parts)])
        del self.pending[(name, version)]
        ring = (self.rings.get(name, []) + [batch])[-keep:] if keep > 0 else []
        self.rings[name] = ring
        await self._publish(name, version, np.concatenate(ring) if ring else batch[:0])

    async def init_concepts(self, state: dict[str, np.ndarray], seed: int) -> None:
        """Publish version 1 of the dictionary (``concepts``, ``cooccurrence``) unless it exists."""
        self._check()
        if self.dictionary is not None:
            return
        self.dictionary, self.dictionary_seed = state, seed
        await self._publish("cooccurrence", 1, state["cooccurrence"])
        await self._publish("concepts", 1, state["concepts"])

    async def update_concepts(self, version: int, rank: int, stats: dict[str, np.ndarray], decay: float) -> None:
        """Contribute one rank's :func:`~raysseg.methods.segsort.core.concept_statistics` to
        ``version``; the last contribution triggers the EMA update and publishes ``version``."""
        self._check()
        from raysseg.methods.segsort.core import update_dictionary

        if version <= self.tables.get("concepts", (0, None))[0]:
            return
        parts = self.handoff.setdefault(f"concepts-{version}", {})
        parts[rank] = stats
        if len(parts) < self.world_size:
            return
        del self.handoff[f"concepts-{version}"]
        rng = np.random.default_rng([self.dictionary_seed, version])
        self.dictionary = update_dictionary(self.dictionary, [parts[r] for r in sorted(parts)], decay, rng)
        await self._publish("cooccurrence", version, self.dictionary["cooccurrence"])
        await self._publish("concepts", version, self.dictionary["concepts"])

    async def publish(self, name: str, version: int, values: np.ndarray) -> None:
        """A table with one writer (e.g. centroids computed by rank 0): publish it whole."""
        self._check()
        if version > self.tables.get(name, (0, None))[0]:
            await self._publish(name, version, np.asarray(values))

    async def share(self, key: str, rank: int, obj) -> None:
        """Hand a small object (e.g. object refs of feature blocks) to whoever calls :meth:`collect`."""
        self._check()
        self.handoff.setdefault(key, {})[rank] = obj
        async with self.changed:
            self.changed.notify_all()

    async def collect(self, key: str) -> list:
        """Wait until every rank has shared ``key``; returns the objects in rank order and forgets them."""
        self._check()
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.handoff.get(key, {})) == self.world_size)
        parts = self.handoff.pop(key)
        return [parts[r] for r in sorted(parts)]

    def version(self, name: str) -> int:
        self._check()
        return self.tables.get(name, (0, None))[0]

    def get_trace(self) -> list[dict]:
        return list(self.trace)

    def state(self) -> dict:
        """Everything needed to restore the bank (goes into each checkpoint)."""
        self._check()
        return {"tables": {k: (v, t.copy()) for k, (v, t) in self.tables.items()},
                "rings": {k: [b.copy() for b in ring] for k, ring in self.rings.items()},
                "dictionary": self.dictionary, "dictionary_seed": self.dictionary_seed}

    async def restore(self, state: dict) -> None:
        """Replace all state with ``state`` (from a checkpoint; ``{}`` = empty, a run's first start).
        Parts contributed by an earlier attempt are dropped, so every version is rebuilt by the ranks
        of the attempt that uses it."""
        self.lost = False
        self.handoff.clear()
        self.tables = {k: (int(v), np.asarray(t)) for k, (v, t) in state.get("tables", {}).items()}
        self.rings = {k: list(ring) for k, ring in state.get("rings", {}).items()}
        self.dictionary, self.dictionary_seed = state.get("dictionary"), state.get("dictionary_seed", 0)
        self.pending.clear()
        async with self.changed:
            self.changed.notify_all()
