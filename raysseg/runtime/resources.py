"""What a run asks of the Ray cluster: planned before anything is launched, watched while it waits.

A run holds ``train.num_workers`` Train workers (1 CPU each, or 1 GPU each with ``train.use_gpu``) for its
whole life, and ``data.cpus`` CPUs for everything else it starts: Ray Data's decoding tasks (capped to
that many CPUs, see :func:`data_limits`) and the 1-CPU k-means tasks between epochs. If the Train workers
took every CPU, those tasks would never be scheduled and the run would wait forever; so before Ray Train or
Tune starts, :func:`plan` compares one run's needs with the most the cluster has (or can autoscale to) and
refuses with one line when a single run cannot fit, or lowers a sweep's concurrency to what fits.
:class:`WaitWatch` prints one line a minute while this job's placement groups wait for resources
(a shared cluster whose CPUs other jobs hold).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import ray

from raysseg.settings import ConfigError


@dataclass(frozen=True)
class RunNeeds:
    """The logical resources one training run (or sweep trial) holds at once."""

    workers: int
    worker: dict  # each Train worker's resources: {"CPU": 1} or {"GPU": 1}
    data_cpus: int  # Ray Data decoding and the k-means tasks
    eval_cpus: int = 0  # a trial that evaluates after training: scoring actors + decoding (not at the same time)

    @property
    def cpus(self) -> float:
        return max(self.workers * self.worker.get("CPU", 0) + self.data_cpus, self.eval_cpus)

    @property
    def gpus(self) -> float:
        return self.workers * self.worker.get("GPU", 0)

    def describe(self) -> str:
        kind = "GPU" if "GPU" in self.worker else "CPU"
        text = (f"{self.cpus:g} CPUs" + (f" and {self.gpus:g} GPUs" if self.gpus else "")
                + f" (train.num_workers={self.workers} workers x 1 {kind}"
                + (f" + data.cpus={self.data_cpus} for decoding and k-means" if self.data_cpus else ""))
        if self.eval_cpus > self.workers * self.worker.get("CPU", 0) + self.data_cpus:
            text += f"; evaluating after training: {self.eval_cpus} CPUs"
        return text + ")"


def worker_resources(cfg) -> dict:
    """One Train worker's resources, as Ray Train's ScalingConfig gets them."""
    return {"GPU": 1} if cfg.train.use_gpu else {"CPU": 1}


def run_needs(cfg, evaluates: bool = False) -> RunNeeds:
    return RunNeeds(cfg.train.num_workers, worker_resources(cfg), cfg.data.cpus,
                    cfg.eval.workers + cfg.data.cpus if evaluates else 0)


def data_limits(cfg):
    """Ray Data execution options for the run's datasets: at most ``data.cpus`` CPUs at once, and rows in the
    order of the dataset (the same batches in a rerun; with several workers, which worker reads which block
    still depends on timing)."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    return ExecutionOptions(resource_limits=ExecutionResources(cpu=cfg.data.cpus), preserve_order=True,
                            verbose_progress=options.verbose_progress)


def capacity() -> tuple[dict, str]:
    """(the most CPUs and GPUs the cluster has or can autoscale to, a few words saying which)."""
    now = ray.cluster_resources()
    most = {k: now.get(k, 0.0) for k in ("CPU", "GPU")}
    try:  # an autoscaling cluster publishes its node types' limits (what Ray Train itself checks)
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - private API: without it, what the cluster has now is the limit
        limits = {}
    if any(limits.get(k, 0) > most[k] for k in most):
        return {k: max(most[k], float(limits.get(k, 0))) for k in most}, "with autoscaling"
    return most, "in all"


def plan(needs: RunNeeds, concurrent: int = 1) -> int:
    """How many runs with ``needs`` can run at once (at most ``concurrent``, a sweep's ``--max-concurrent``);
    one ConfigError line when not even one fits. A lowered concurrency is said in one line."""
    most, where = capacity()
    fits = [most["CPU"] // needs.cpus if needs.cpus else concurrent]
    if needs.gpus:
        fits.append(most["GPU"] // needs.gpus)
    n = int(min(concurrent, *fits))
    have = f"{most['CPU']:g} CPUs" + (f" and {most['GPU']:g} GPUs" if needs.gpus or most["GPU"] else "")
    if n < 1:
        raise ConfigError(f"one run needs {needs.describe()}, but the Ray cluster has {have} {where}: "
                          f"lower train.num_workers or data.cpus, or add nodes")
    if n < concurrent:
        print(f"running {n} trials at once, not {concurrent} (--max-concurrent): each needs {needs.describe()} and "
              f"the cluster has {have} {where}", flush=True)
    return n


def job_placement_groups(states: tuple[str, ...] = ("PENDING", "CREATED", "RESCHEDULING")) -> list[dict]:
    """This job's placement groups in ``states``: ``{"id", "state", "bundles": [{"CPU": 1.0}, ...]}``.

    Ray's state API knows each group's job; without a dashboard (the local Ray this process started, which
    no other job uses) every group of the cluster is this job's."""
    try:
        from ray.util.state import list_placement_groups

        job = ray.get_runtime_context().get_job_id()
        groups = [{"id": g.placement_group_id, "state": g.state,
                   "bundles": [b.get("unit_resources", {}) for b in g.bundles or []]}
                  for g in list_placement_groups(filters=[("creator_job_id", "=", job)], detail=True,
                                                 raise_on_missing_output=False)]
    except Exception:  # noqa: BLE001 - no dashboard to ask
        if os.environ.get("RAY_ADDRESS"):
            return []
        groups = [{"id": g["placement_group_id"], "state": g["state"], "bundles": list(g["bundles"].values())}
                  for g in ray.util.placement_group_table().values()]
    return [g for g in groups if g["state"] in states]


def remove_job_placement_groups() -> int:
    """Remove the placement groups this job still holds (after a stop); returns how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    groups = job_placement_groups()
    for g in groups:
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(g["id"])))
        except Exception:  # noqa: BLE001 - already gone
            pass
    return len(groups)


class WaitWatch:
    """Call :meth:`tick` often; once a minute while this job's placement groups are pending, it prints one line."""

    def __init__(self, every_s: float = 60.0):
        self.every_s = every_s
        self.next = time.monotonic() + every_s

    def tick(self) -> None:
        if time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.every_s
        pending = job_placement_groups(("PENDING",))
        if not pending:
            return
        asked: dict = {}
        for g in pending:
            for bundle in g["bundles"]:
                for k, v in bundle.items():
                    asked[k] = asked.get(k, 0) + v
        free, total = ray.available_resources(), ray.cluster_resources()
        shown = ", ".join(f"{v:g} {k}" for k, v in sorted(asked.items()) if k in ("CPU", "GPU"))
        print(f"waiting for resources: {len(pending)} placement group(s) of this job pending ({shown}); the cluster "
              f"has {free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs free"
              + (f", {free.get('GPU', 0):g} of {total.get('GPU', 0):g} GPUs" if total.get("GPU") else ""), flush=True)
