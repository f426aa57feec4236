"""The concept bank: one Ray actor per run that serves the state workers share.

The tables and their rules are :class:`raysseg.methods.shared.TableStore`'s; this actor adds
waiting (a read blocks until its version is published) and survival: when Ray restarts the
actor after its process died, every table is gone, so it refuses to serve (:class:`BankLost`)
until a worker restores the state of the checkpoint the run restarts from. Workers reach it
through :class:`RaySharedState`, the :class:`raysseg.methods.base.SharedState` of Ray runs.
"""
from __future__ import annotations

import asyncio

import numpy as np
import ray

from raysseg.methods.shared import TableStore, checksum, reads_by_version  # noqa: F401 - re-exported for tests

__all__ = ["BankLost", "ConceptBank", "RaySharedState", "checksum", "reads_by_version"]


class BankLost(RuntimeError):
    """The bank's process died and Ray restarted it empty: training must restart from its latest
    checkpoint, which restores the bank (the driver does this on its own)."""


@ray.remote(num_cpus=0, max_restarts=-1)
class ConceptBank:
    def __init__(self, world_size: int):
        self.store = TableStore(world_size)
        self.current_epoch = 0  # set by rank 0 as each epoch starts; the epoch's crops are seeded by it
        self.changed = asyncio.Condition()
        self.lost = ray.get_runtime_context().was_current_actor_reconstructed

    def set_epoch(self, epoch: int) -> None:
        self.current_epoch = epoch

    def epoch(self) -> int:
        return self.current_epoch

    def _check(self) -> None:
        if self.lost:
            raise BankLost("the concept bank's process died and was restarted without its tables; "
                           "the run restarts from its latest checkpoint")

    async def _write(self, published: bool) -> None:
        if published:
            async with self.changed:
                self.changed.notify_all()

    async def put_part(self, name: str, version: int, rank: int, index: np.ndarray, values: np.ndarray) -> None:
        self._check()
        await self._write(self.store.put_part(name, version, rank, index, values))

    async def append(self, name: str, version: int, rank: int, values: np.ndarray, keep: int) -> None:
        self._check()
        await self._write(self.store.append(name, version, rank, values, keep))

    async def publish(self, name: str, version: int, values: np.ndarray) -> None:
        self._check()
        await self._write(self.store.publish(name, version, values))

    async def init_reduced(self, state: dict, seed: int) -> None:
        self._check()
        await self._write(self.store.init_reduced(state, seed))

    async def reduce(self, version: int, rank: int, contribution, reducer) -> None:
        self._check()
        await self._write(self.store.reduce(version, rank, contribution, reducer))

    async def share(self, key: str, rank: int, obj) -> None:
        self._check()
        await self._write(self.store.share(key, rank, obj))

    async def get(self, name: str, version: int, rank: int = -1) -> tuple[int, np.ndarray]:
        """Wait for version >= ``version`` of ``name``; returns (version, table)."""
        self._check()
        async with self.changed:
            await self.changed.wait_for(lambda: self.store.version(name) >= version)
        return self.store.read(name, rank)

    async def get_many(self, names: list[str], version: int, rank: int = -1) -> dict[str, tuple[int, np.ndarray]]:
        """:meth:`get` of several tables in one round trip."""
        return {name: await self.get(name, version, rank) for name in names}

    async def collect(self, key: str) -> list:
        """Wait until every rank has shared ``key``; returns the objects in rank order and forgets them."""
        self._check()
        async with self.changed:
            await self.changed.wait_for(lambda: self.store.complete(key))
        return self.store.collect(key)

    def version(self, name: str) -> int:
        self._check()
        return self.store.version(name)

    def get_trace(self) -> list[dict]:
        return list(self.store.trace)

    def state(self) -> dict:
        self._check()
        return self.store.state()

    async def restore(self, state: dict) -> None:
        self.lost = False
        self.store.restore(state)
        await self._write(True)


class RaySharedState:
    """:class:`raysseg.methods.base.SharedState` over a :class:`ConceptBank` handle. Writes are sent
    without waiting (readers wait for the versions they need); blocks live in the object store and
    k-means runs as Ray tasks (:func:`raysseg.runtime.kmeans.kmeans_ray`)."""

    def __init__(self, bank):
        self.bank = bank

    def version(self, name):
        return ray.get(self.bank.version.remote(name))

    def get(self, name, version, rank=-1):
        return ray.get(self.bank.get.remote(name, version, rank))

    def get_many(self, names, version, rank=-1):
        return ray.get(self.bank.get_many.remote(names, version, rank))

    def put_part(self, name, version, rank, index, values) -> None:
        self.bank.put_part.remote(name, version, rank, index, values)

    def append(self, name, version, rank, values, keep) -> None:
        self.bank.append.remote(name, version, rank, values, keep)

    def publish(self, name, version, values) -> None:
        self.bank.publish.remote(name, version, values)

    def init_reduced(self, state, seed) -> None:
        ray.get(self.bank.init_reduced.remote(state, seed))

    def reduce(self, version, rank, contribution, reducer) -> None:
        self.bank.reduce.remote(version, rank, contribution, reducer)

    def share(self, key, rank, obj) -> None:
        self.bank.share.remote(key, rank, obj)

    def collect(self, key):
        return ray.get(self.bank.collect.remote(key))

    def put_block(self, array):
        return ray.put(array)  # owned by this worker: alive until it exits or drops the reference

    def get_blocks(self, handles):
        return ray.get(list(handles))

    def kmeans(self, blocks, k, **options):
        from raysseg.runtime.kmeans import kmeans_ray

        return kmeans_ray(blocks, k, **options)

    def state(self) -> dict:
        return ray.get(self.bank.state.remote())

    def restore(self, state: dict) -> None:
        ray.get(self.bank.restore.remote(state))

    def trace(self) -> list[dict]:
        return ray.get(self.bank.get_trace.remote())
