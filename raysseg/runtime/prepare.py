"""`raysseg data prepare DATASET SRC DST`: a raw distribution into the project's split layout, as a
parallel, resumable Ray Data job (the per-file work and the layouts are in :mod:`raysseg.io.datasets`).

Before Ray starts: the source layout is checked (one line naming the layout expected) and the tasks
already finished by an earlier run (their marker exists) are left out. Each Ray Data map task converts
a batch of source files and writes their outputs, then each file's marker. The card and classes.txt are
written at the end from every marker, this run's and earlier ones'.
"""
from __future__ import annotations

import functools
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from raysseg.core.progress import Progress
from raysseg.io import storage
from raysseg.io.datasets import dataset as dataset_named
from raysseg.io.images import DatasetError
from raysseg.io.datasets.layout import (PrepareOptions, Task, card, check_same_options, is_done,
                                        remove_partial_writes, run_task, write_card)

TASKS_PER_BLOCK = 8  # source files per Ray Data map task (a COCO pair takes ~20-40 ms, a Potsdam tile seconds)


@dataclass
class PrepareResult:
    card: dict
    done_now: int  # tasks converted by this run
    done_before: int  # tasks found finished by an earlier run
    skipped: int  # tasks whose files could not be used (listed in the card)
    seconds: float


def _run_batch(batch: dict, name: str, dst: str, options: dict) -> dict:
    """Ray Data map: each row's ``task`` (JSON) converted and written; ``result`` (JSON) per row."""
    ds, opts = dataset_named(name), PrepareOptions(**options)
    results = [run_task(ds, Task(**json.loads(t)), opts, dst) for t in batch["task"]]
    return {"result": np.asarray([json.dumps(r) for r in results], dtype=object)}


def prepare(name: str, src: str, dst: str, options: PrepareOptions, *, local: bool = False,
            log=print) -> PrepareResult:
    """Prepare ``src`` (folder or s3://) into ``dst``; ``local``: threads in this process instead of Ray."""
    t0 = time.time()
    ds = dataset_named(name)
    tasks = ds.find(src, options)  # raises the one-line layout error before anything starts
    check_same_options(ds, dst, options)
    storage.makedirs(dst)
    stale = remove_partial_writes(dst)
    if stale:
        log(f"[prepare {name}] removed {stale} partial file(s) of an interrupted run")
    with ThreadPoolExecutor(max_workers=16) as pool:  # one marker read per task: I/O bound
        earlier = list(pool.map(lambda t: is_done(t, dst), tasks))
    todo = [t for t, done in zip(tasks, earlier) if done is None]
    results = [d for d in earlier if d is not None]
    log(f"[prepare {name}] {len(tasks)} source files: {len(results)} done by an earlier run, {len(todo)} to do")
    now: list[dict] = []
    if todo:
        bar = Progress(len(todo), f"prepare {name}", max(1, len(todo) // 20))
        for result in (_threads if local else _ray)(name, todo, dst, options):
            now.append(result)
            bar.update()
    results += now
    content = card(ds, src, options, results)
    write_card(dst, content)
    skipped = len(content["skipped"])
    result = PrepareResult(content, len(now), len(tasks) - len(todo), skipped, time.time() - t0)
    splits = ", ".join(f"{k} {v['images']} images" for k, v in content["splits"].items())
    log(f"[prepare {name}] wrote {dst}: {splits}; {result.done_now} source files now, {result.done_before} before, "
        f"{skipped} skipped, {result.seconds:.1f}s; card: {storage.join(dst, 'dataset_card.json')}")
    for item in content["skipped"][:5]:
        log(f"  skipped {item['split']}/{item['task']}: {item['reason']}")
    if skipped > 5:
        log(f"  ... {skipped - 5} more in the card")
    return result


def _threads(name: str, todo: list[Task], dst: str, options: PrepareOptions):
    ds = dataset_named(name)
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield from pool.map(lambda t: run_task(ds, t, options, dst), todo)


def _ray(name: str, todo: list[Task], dst: str, options: PrepareOptions):
    import ray.data

    from raysseg.runtime.driver import init_ray

    init_ray()
    items = [{"task": json.dumps(asdict(t))} for t in todo]
    data = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / TASKS_PER_BLOCK)))
    data.context.op_resource_reservation_enabled = False  # one map operator: nothing to starve
    fn = functools.partial(_run_batch, name=name, dst=dst, options=asdict(options))
    out = data.map_batches(fn, batch_size=TASKS_PER_BLOCK, batch_format="numpy")
    try:
        for batch in out.iter_batches(batch_size=1, batch_format="numpy"):
            for text in batch["result"]:
                yield json.loads(text)
    except Exception as exc:  # a task's one-line StorageError arrives wrapped by Ray Data: unwrap it
        raise _one_line_cause(exc) or exc from None


def _one_line_cause(exc: BaseException) -> BaseException | None:
    """The project's one-line error (StorageError, DatasetError) inside a Ray Data failure, if there is one."""
    seen: BaseException | None = exc
    while seen is not None:
        for candidate in (getattr(seen, "cause", None), seen):  # RayTaskError keeps the task's error in .cause
            if isinstance(candidate, (storage.StorageError, DatasetError)):
                return type(candidate)(str(candidate))
        seen = seen.__cause__
    return None
