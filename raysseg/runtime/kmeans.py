"""Distributed spherical k-means over feature blocks held in the Ray object store: the algorithm
of :func:`raysseg.core.kmeans.blockwise_kmeans`, its per-block tasks run as 1-CPU Ray tasks."""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator

import ray

from raysseg.core.kmeans import KMeansResult, blockwise_kmeans, limit_threads


def _task_threads() -> int:
    """The CPUs Ray gave this task (at least 1): faiss must not use every core of a shared node."""
    if not ray.is_initialized():  # called outside Ray (asking the runtime context would start one)
        return 1
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


@functools.lru_cache(maxsize=None)
def _remote(fn: Callable):
    """``fn`` as a 1-CPU Ray task, made once per process; inside it faiss, BLAS and torch use
    only the CPUs Ray gave the task."""

    def task(*args, **kwargs):
        with limit_threads(_task_threads()):
            return fn(*args, **kwargs)

    task.__name__ = task.__qualname__ = fn.__name__  # the task's name in Ray's dashboard and logs
    task.__doc__ = fn.__doc__
    return ray.remote(num_cpus=1)(task)


class RayExecutor:
    """The executor of :func:`raysseg.core.kmeans.blockwise_kmeans` on Ray: blocks are
    ``ray.ObjectRef``s, each task a 1-CPU Ray task, handles stay in the object store, and
    :meth:`map` yields the results as the tasks finish (the caller holds one at a time)."""

    def put(self, obj: Any) -> ray.ObjectRef:
        return ray.put(obj)

    def submit(self, fn: Callable, *args: Any) -> ray.ObjectRef:
        return _remote(fn).remote(*args)

    def call(self, fn: Callable, *args: Any) -> Any:
        return ray.get(self.submit(fn, *args))

    def wait(self, handles: list) -> None:
        """Until every task behind ``handles`` has finished (their results stay in the object store)."""
        ray.wait(handles, num_returns=len(handles), fetch_local=False)

    def gather(self, handles: list) -> list:
        return ray.get(handles)

    def map(self, fn: Callable, arg_lists: Iterable[tuple]) -> Iterator[Any]:
        task = _remote(fn)
        pending = [task.remote(*args) for args in arg_lists]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            result = ray.get(done[0])
            del done
            yield result
            del result


def kmeans_ray(blocks: list, k: int, *, init_sample: int, assign_passes: int, iterations: int = 20,
               redo: int = 1, seed: int = 0, init: str = "k-means++") -> KMeansResult:
    """Spherical k-means of the rows of ``blocks`` (``ray.ObjectRef``s to float32 (n_i, D) arrays
    of L2-normalised features), without bringing the blocks to the caller:
    :func:`raysseg.core.kmeans.blockwise_kmeans` with a :class:`RayExecutor`, each per-block step a Ray task.

    Without faiss, the clustering of the sample falls back to torch and the assignment to numpy.
    """
    return blockwise_kmeans(blocks, k, init_sample=init_sample, assign_passes=assign_passes,
                            iterations=iterations, redo=redo, seed=seed, init=init, executor=RayExecutor())
