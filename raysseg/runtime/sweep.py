"""``raysseg sweep``: Ray Tune over any config key; each trial is a Ray Train run.

A sweep file (a built-in name from ``raysseg/sweeps/`` or a YAML path)::

    metric: view_nmi        # what trials are ranked by (see METRICS); eval/... needs labels
    mode: max
    search: grid            # grid | random | optuna
    samples: 1              # random/optuna: number of trials; grid: repeats of the grid
    scheduler: asha         # asha (stop weak trials on the per-epoch metric) | none
    grace_epochs: 1         # ASHA: epochs every trial gets before it can be stopped
    max_concurrent: 1       # trials at once (each takes train.num_workers workers)
    space:
      hp.tau: {grid: [0.4, 0.6, 0.8]}          # also choice, uniform, loguniform, randint
      points:                                   # or: explicit trials, each a set of overrides
        - {pgg.guidance: none, pgg.cae: false}

Every candidate value is checked against the base config before Ray starts. MLflow gets
one parent run per sweep (its settings, ``trials.csv``, ``sweep.png`` and the best trial)
and one child run per trial, created by the trial's driver, never by its workers. The
sweep lives in ``<train.storage>/sweeps/<name>``: the same command again resumes it
(finished trials are kept, unfinished ones continue from their last checkpoint).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from raysseg.config import Config, ConfigError, available, read_named_yaml, with_overrides

# label-free metrics every trial reports: name -> (direction, reported every epoch as well as at the end)
METRICS = {
    "view_nmi": ("max", True),  # agreement of two augmented views' cluster maps (raysseg.core.selection)
    "cluster_mean_cosine": ("max", False),  # the final k-means objective (rewards collapse: use with care)
    "loss_total": ("min", True),  # the training loss (not comparable when the sweep changes loss weights)
}
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class SweepSpec:
    name: str
    space: dict[str, Any]
    metric: str = "view_nmi"
    mode: str = "max"
    search: str = "grid"
    samples: int = 1
    scheduler: str = "none"
    grace_epochs: int = 1
    max_concurrent: int = 1
    seed: int = 0

    @property
    def needs_labels(self) -> bool:
        return self.metric.startswith("eval/")


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    rows: list[dict] = field(default_factory=list)  # one per trial: id, status, overrides, metric, run, checkpoint
    best: dict | None = None
    already_finished: bool = False


def available_sweeps() -> list[str]:
    return available("raysseg.sweeps")


def load_sweep(name_or_path: str) -> SweepSpec:
    """Read and check a sweep file (everything except its config keys: see ``check_space``)."""
    name, raw = read_named_yaml(name_or_path, "raysseg.sweeps", "sweep")
    where = f"sweep {name_or_path}"
    if not isinstance(raw.get("space"), dict) or not raw["space"]:
        raise ConfigError(f"{where}: needs a non-empty 'space' mapping of config keys to distributions")
    fields = {f.name for f in dataclasses.fields(SweepSpec)} - {"name"}
    unknown = set(raw) - fields
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(fields))})")
    spec = SweepSpec(name=name, **raw)
    _check_spec(spec, where)
    return spec


def _check_spec(spec: SweepSpec, where: str) -> None:
    if spec.search not in ("grid", "random", "optuna"):
        raise ConfigError(f"{where}: search: {spec.search!r} is not one of grid, random, optuna")
    if spec.scheduler not in ("none", "asha"):
        raise ConfigError(f"{where}: scheduler: {spec.scheduler!r} is not one of none, asha")
    if spec.mode not in ("min", "max"):
        raise ConfigError(f"{where}: mode: {spec.mode!r} is not min or max")
    for key in ("samples", "grace_epochs", "max_concurrent"):
        if not isinstance(getattr(spec, key), int) or getattr(spec, key) < 1:
            raise ConfigError(f"{where}: {key}: expected a positive integer, got {getattr(spec, key)!r}")
    if spec.metric not in METRICS and not spec.needs_labels:
        raise ConfigError(f"{where}: metric: {spec.metric!r} is not one of {', '.join(METRICS)} "
                          f"or a labelled evaluation metric eval/<split>/<variant>_<accuracy|miou>")
    if spec.scheduler == "asha" and not (spec.metric in METRICS and METRICS[spec.metric][1]):
        per_epoch = [m for m, (_, every) in METRICS.items() if every]
        raise ConfigError(f"{where}: scheduler asha needs a metric reported every epoch "
                          f"({', '.join(per_epoch)}), not {spec.metric}; use scheduler: none")
    for key, dist in spec.space.items():
        if key == "points":
            if not (isinstance(dist, list) and dist and all(isinstance(p, dict) and p for p in dist)):
                raise ConfigError(f"{where}: space.points: expected a list of mappings of config keys to values")
            if spec.search != "grid":
                raise ConfigError(f"{where}: space.points needs search: grid")
            continue
        if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS):
            raise ConfigError(f"{where}: space.{key}: expected one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, "
                              f"got {dist!r}")
        kind, values = next(iter(dist.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: space.{key}.{kind}: expected a list")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                raise ConfigError(f"{where}: space.{key}.{kind}: expected [low, high] with low < high")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: space.{key}.loguniform: bounds must be positive")
        if kind == "grid" and spec.search == "optuna":
            raise ConfigError(f"{where}: space.{key}: optuna cannot search a grid; use choice")
        if kind != "grid" and spec.search == "grid":
            raise ConfigError(f"{where}: space.{key}: search grid takes grid values only; "
                              f"use search: random or optuna for {kind}")


def candidate_overrides(spec: SweepSpec) -> list[dict[str, Any]]:
    """Override sets that together touch every value (and both bounds) of the space: checked before Ray starts."""
    out: list[dict[str, Any]] = []
    for key, dist in spec.space.items():
        if key == "points":
            out += [dict(p) for p in dist]
            continue
        kind, values = next(iter(dist.items()))
        if kind == "randint":
            values = [int(values[0]), int(values[1])]
        out += [{key: v} for v in values]
    return out


def check_space(spec: SweepSpec, cfg: Config) -> None:
    """Every candidate value must make a valid config with data enough to train on."""
    from raysseg.engine.inputs import check_inputs
    from raysseg.methods.registry import spec as method_spec

    trains = method_spec(cfg.method).trainer is not None
    if not trains and spec.metric == "loss_total":
        raise ConfigError(f"sweep {spec.name}: metric loss_total: method {cfg.method} does not train; use view_nmi")
    if not trains and spec.scheduler == "asha":
        raise ConfigError(f"sweep {spec.name}: scheduler asha: method {cfg.method} has no epochs to stop between")
    for overrides in candidate_overrides(spec):
        for key in overrides:
            if key.split(".")[0] in ("train", "mlflow") and key.split(".")[-1] in ("run_name", "storage", "experiment",
                                                                                 "tracking_uri"):
                raise ConfigError(f"sweep {spec.name}: space.{key}: sweeps set this themselves; remove it")
        try:
            trial_cfg = with_overrides(cfg, overrides)
            check_inputs(trial_cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep {spec.name}: {overrides}: {e}") from None


def param_space(spec: SweepSpec) -> dict:
    """Tune's search space: ``{"hp.tau": tune.grid_search([...]), "points": tune.grid_search([...])}``."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    space = {}
    for key, dist in spec.space.items():
        if key == "points":
            space["points"] = tune.grid_search([dict(p) for p in dist])
        else:
            kind, values = next(iter(dist.items()))
            space[key] = make[kind](values)
    return space


def trial_overrides(params: dict) -> dict[str, Any]:
    """A trial's Tune config -> dotted config overrides (``points`` merged in)."""
    out = {k: v for k, v in params.items() if k != "points"}
    out.update(params.get("points") or {})
    return out


def sweep_name(cfg: Config, spec: SweepSpec) -> str:
    settings = {k: v for k, v in cfg.flat().items()
                if not k.startswith(("eval.", "mlflow.", "train.log_every", "data.cpus"))}  # data.cpus: where, not what
    digest = hashlib.sha1(json.dumps([settings, dataclasses.asdict(spec)], sort_keys=True, default=str).encode())
    return f"sweep-{cfg.name}-{spec.name}-{digest.hexdigest()[:8]}"


# ---------------------------------------------------------------- the trial (runs in a Tune trial actor)


def _trial(params: dict, *, config: dict, spec: dict, sweep: str, parent_run_id: str) -> None:
    """One trial: train the base config with this trial's overrides, then report the final metrics."""
    import tempfile

    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysseg.config import config_from_dict
    from raysseg.engine.loop import FINAL_FLAG
    from raysseg.runtime.driver import train

    metric = spec["metric"]

    class EpochReports(TuneReportCallback):
        """Forwards the workers' per-epoch reports that carry the metric (ASHA decides on them)."""

        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0] and FINAL_FLAG not in metrics[0]:  # the trial reports the final one itself
                super().after_report(run_context, metrics, checkpoint)

    overrides = trial_overrides(params)
    cfg = with_overrides(config_from_dict(config), overrides)
    cfg.train.run_name = trial_run_name(sweep, ray.tune.get_context().get_trial_id(), overrides, cfg)
    result = train(cfg, parent_run_id=parent_run_id, callbacks=(EpochReports(),))
    final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    if spec["metric"].startswith("eval/"):  # named by the user: the only case a trial reads labels
        from raysseg.runtime.evaluate import evaluate, report_metrics

        with tempfile.TemporaryDirectory() as out:
            final.update(report_metrics(evaluate(result.checkpoint, out=out)))
    if metric not in final:
        raise ConfigError(f"trial {cfg.train.run_name} reported no {metric!r} (it reported {sorted(final)})")
    ray.tune.report({**final, FINAL_FLAG: 1, "run_id": result.run_id, "checkpoint": result.checkpoint},
                    checkpoint=tune_checkpoint(result.checkpoint))


def tune_checkpoint(model_uri: str):
    """The final checkpoint's folder as a Tune checkpoint: Tune copies it into the trial's folder, where
    ``ResultGrid.get_best_result().checkpoint`` and ``ExperimentAnalysis.best_checkpoint`` find it."""
    import ray.tune

    from raysseg.io.storage import resolve

    fs, path = resolve(model_uri.rsplit("/", 1)[0])
    return ray.tune.Checkpoint(path=path, filesystem=fs)


def trial_run_name(sweep: str, trial_id: str, overrides: dict, cfg: Config) -> str:
    """A trial's run name: the sweep's, the trial's place in the search order and a hash of its overrides.

    A sweep whose Tune state was lost (stopped before Tune saved it) draws the same trials in the same order
    (the search is seeded), so a new Tuner finds each trial's run again: finished ones report at once, the
    others resume from their checkpoints. Trials of sweeps started before this rule keep their names."""
    from raysseg.io import tracking

    legacy = f"{sweep}-{trial_id}"
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    if tracking.find_run(uri, cfg.mlflow.experiment, legacy) is not None:
        return legacy
    index = trial_id.rsplit("_", 1)[-1] if "_" in trial_id else trial_id  # BasicVariantGenerator: <prefix>_<n>
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{sweep}-{index}-{digest}"


# ---------------------------------------------------------------- the driver


def sweep(config: str, space: str, overrides: tuple = (), restart: bool = False, name: str = "",
          max_concurrent: int = 0) -> SweepResult:
    """Run (or resume) the sweep of ``space`` over ``config``; returns its trials and the best one."""
    from raysseg.io import tracking
    from raysseg.io.lease import RunLease
    from raysseg.config import load_config

    cfg = load_config(config, list(overrides))
    spec = load_sweep(space)
    if max_concurrent:
        spec.max_concurrent = max_concurrent
    check_space(spec, cfg)  # before Ray starts
    name = name or sweep_name(cfg, spec)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    tracking.check_reachable(uri)
    with RunLease(cfg.train.storage, name):  # each trial holds its own run's lease too
        return _sweep(cfg, spec, name, uri, restart)


def _sweep(cfg: Config, spec: SweepSpec, name: str, uri: str, restart: bool) -> SweepResult:
    from ray import tune

    from raysseg.io import tracking
    from raysseg.io.storage import remove_tree
    from raysseg.runtime import logs
    from raysseg.runtime.driver import _storage, fit_off_main_thread, init_ray
    from raysseg.runtime.resources import plan, run_needs

    cfg.mlflow.tracking_uri = uri  # the trials run in other folders: the local store's path is fixed here
    storage_path, fs = _storage(cfg)
    storage_path = f"{storage_path.rstrip('/')}/sweeps"
    path = f"{storage_path}/{name}"
    previous = tracking.find_run(uri, cfg.mlflow.experiment, name)
    if restart:
        remove_tree(f"{cfg.train.storage.rstrip('/')}/sweeps/{name}")
        if previous is not None and previous.info.status != "FINISHED":
            tracking.RunLogger(uri, previous.info.run_id).finish("KILLED")
        previous = None
    elif previous is not None and previous.info.status == "FINISHED":
        best = _best_from_tags(previous)
        print(f"sweep {name} already finished (MLflow run {previous.info.run_id}, its trials in trials.csv); "
              f"best: {best}; use --restart to run it again")
        return SweepResult(name, previous.info.run_id, uri, [], best, already_finished=True)
    params = {**cfg.flat(), "sweep.file": spec.name, "sweep.space": json.dumps(spec.space),
              **{f"sweep.{k}": v for k, v in dataclasses.asdict(spec).items() if k not in ("name", "space")}}
    parent_id, resumed = tracking.start_or_resume_run(uri, cfg.mlflow.experiment, name, params,
                                                      tags={"raysseg.runtime.sweep": spec.name})
    print(f"{'resuming' if resumed else 'starting'} sweep {name} (MLflow run {parent_id} at {uri})")

    init_ray((cfg.train.num_workers + cfg.data.cpus) * spec.max_concurrent)  # a local Ray: room for every trial
    print(logs.where_logs_go(), flush=True)
    logger = tracking.RunLogger(uri, parent_id)
    try:
        spec.max_concurrent = plan(run_needs(cfg, spec.needs_labels), spec.max_concurrent)
    except ConfigError:
        logger.finish("FAILED")
        raise
    trainable = tune.with_resources(
        tune.with_parameters(_trial, config=cfg.to_dict(), spec=dataclasses.asdict(spec), sweep=name,
                             parent_run_id=parent_id),
        # A trial's driver only waits; its Train workers and data tasks hold the resources. No CPU at all: a
        # 0.01-CPU trial would leave 0.99 of a node's CPU that no 1-CPU decoding task can use (Tune needs a
        # non-zero bundle, hence one byte of memory).
        {"cpu": 0, "memory": 1},
    )
    try:
        if tune.Tuner.can_restore(path, storage_filesystem=fs):
            print(f"resuming the trials saved in {path}")
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=fs)
        else:
            tuner = _new_tuner(spec, cfg, trainable, name, storage_path, fs)
        grid = fit_off_main_thread(tuner)
    except KeyboardInterrupt:
        raise sweep_stopped(uri, cfg.mlflow.experiment, parent_id, name) from None
    except Exception:
        logger.finish("FAILED")
        raise
    rows = _rows(grid, spec)
    _mark_stopped_trials(uri, cfg.mlflow.experiment, parent_id)
    best = _pick_best(rows, spec)
    _log_summary(logger, spec, rows, best, grid)
    logger.finish("FINISHED" if best is not None else "FAILED")
    result = SweepResult(name, parent_id, uri, rows, best)
    print(summary_table(result, spec))
    return result


def sweep_stopped(uri: str, experiment: str, parent_id: str, name: str):
    """After Ctrl-C / SIGTERM (``ray job stop``): the trials still running and the sweep's MLflow run become
    KILLED, this job's placement groups are removed, and one line says how to resume. ``ray job stop`` kills
    the driver RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM (Ray's default 3 s; jobs/runtime_env.py sets 30)."""
    from raysseg.engine.loop import RunStopped
    from raysseg.io import tracking
    from raysseg.runtime.resources import remove_job_placement_groups

    killed = 0
    try:
        killed = len(_mark_running_children(uri, experiment, parent_id, stopped_early=False))
        tracking.RunLogger(uri, parent_id).finish("KILLED", seconds=5)
    except Exception as e:  # noqa: BLE001 - the stop line matters more than the MLflow status
        print(f"warning: could not mark the sweep's MLflow runs KILLED ({e})", flush=True)
    removed = remove_job_placement_groups()
    return RunStopped(f"sweep {name} stopped: {killed} running trial(s) and the sweep's MLflow run {parent_id} "
                      f"marked KILLED, {removed} placement group(s) removed; finished trials and every trial's "
                      f"checkpoints are kept: run the same command again to resume")


def _new_tuner(spec: SweepSpec, cfg: Config, trainable, name: str, storage_path: str, fs):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=spec.max_concurrent)
    else:
        search = BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent)
    if spec.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs + 1,
                                  grace_period=min(spec.grace_epochs, cfg.train.epochs), reduction_factor=2)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=search, scheduler=scheduler,
                                    num_samples=spec.samples),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=1), verbose=0,
                                  callbacks=[trial_lines(spec.metric)]),
    )


def trial_lines(metric: str):
    """A Tune callback (on the sweep's driver) printing one line per trial report and per trial end,
    instead of Tune's status tables."""
    from ray.tune import Callback

    from raysseg.engine.loop import FINAL_FLAG

    class TrialLines(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            what = "final" if result.get(FINAL_FLAG) else f"epoch {result.get('epoch', '?')}"
            print(f"trial {trial.trial_id} {what}: {metric} {shown}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"trial {trial.trial_id} finished ({trial_overrides(trial.config)})", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"trial {trial.trial_id} failed: {str(trial.error_msg or '').splitlines()[-1:]}", flush=True)

    return TrialLines()


def _rows(grid, spec: SweepSpec) -> list[dict]:
    from raysseg.engine.loop import FINAL_FLAG

    rows = []
    for r in grid:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or Path(r.path).name
        rows.append({
            "trial": trial_id,
            "status": "finished" if m.get(FINAL_FLAG) else ("error" if r.error else "stopped early"),
            "overrides": trial_overrides(m.get("config") or r.config or {}),
            spec.metric: m.get(spec.metric),
            "epochs": m.get("epoch"),
            "run_id": m.get("run_id", ""),
            "checkpoint": m.get("checkpoint", ""),
            "error": str(r.error).splitlines()[0][:300] if r.error else "",
        })
    return sorted(rows, key=lambda row: row["trial"])


def _pick_best(rows: list[dict], spec: SweepSpec) -> dict | None:
    """The best finished trial (trials stopped early report a per-epoch value, not a final one), by
    :func:`raysseg.io.tracking.pick_best`: at an exact tie, the smallest MLflow run id, as ``pull-best``."""
    import math

    from raysseg.io.tracking import pick_best

    done = [r for r in rows if r["status"] == "finished" and r[spec.metric] is not None
            and math.isfinite(r[spec.metric])]
    return pick_best(done, lambda r: r[spec.metric], lambda r: r["run_id"], spec.mode)


def _mark_stopped_trials(uri: str, experiment: str, parent_id: str) -> None:
    """Child runs still RUNNING after the sweep were stopped by the scheduler: mark them KILLED."""
    _mark_running_children(uri, experiment, parent_id, stopped_early=True)


def _mark_running_children(uri: str, experiment: str, parent_id: str, stopped_early: bool) -> list[str]:
    """Mark the sweep's child runs that are still RUNNING as KILLED; returns their ids."""
    from raysseg.io import tracking

    client = tracking.RunLogger(uri, parent_id).client
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'")
    for run in runs:
        if stopped_early:
            client.set_tag(run.info.run_id, "raysseg.stopped_early", "true")
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in runs]


def _log_summary(logger, spec: SweepSpec, rows: list[dict], best: dict | None, grid) -> None:
    from raysseg.core.pictures import sweep_figure

    logger.log_bytes(_csv(rows, spec).encode(), "trials.csv")
    curves = {}
    for r in grid:
        df = r.metrics_dataframe
        if df is not None and spec.metric in df and "training_iteration" in df:
            trial = (r.metrics or {}).get("trial_id") or Path(r.path).name
            curves[trial] = (df["training_iteration"].tolist(), df[spec.metric].tolist())
    logger.log_bytes(sweep_figure(rows, spec.metric, spec.mode, curves), "sweep.png")
    logger.log_metrics({"trials_finished": sum(r["status"] == "finished" for r in rows),
                        "trials_stopped_early": sum(r["status"] == "stopped early" for r in rows),
                        "trials_failed": sum(r["status"] == "error" for r in rows)}, step=0)
    if best is not None:
        logger.log_metrics({f"best/{spec.metric}": best[spec.metric]}, step=0)
        logger.set_tag("raysseg.best_run_id", best["run_id"])
        logger.set_tag("raysseg.best_checkpoint", best["checkpoint"])
        logger.set_tag("raysseg.best_overrides", json.dumps(best["overrides"], default=str))


def _csv(rows: list[dict], spec: SweepSpec) -> str:
    keys = sorted({k for r in rows for k in r["overrides"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "status", *keys, spec.metric, "epochs", "run_id", "checkpoint", "error"])
    for r in rows:
        w.writerow([r["trial"], r["status"], *(r["overrides"].get(k, "") for k in keys), r[spec.metric],
                    r["epochs"], r["run_id"], r["checkpoint"], r["error"]])
    return buf.getvalue()


def _best_from_tags(run) -> dict | None:
    tags = run.data.tags
    if "raysseg.best_run_id" not in tags:
        return None
    return {"run_id": tags["raysseg.best_run_id"], "checkpoint": tags.get("raysseg.best_checkpoint", ""),
            "overrides": json.loads(tags.get("raysseg.best_overrides", "{}")),
            **{k[len("best/"):]: v for k, v in run.data.metrics.items() if k.startswith("best/")}}


def summary_table(result: SweepResult, spec: SweepSpec) -> str:
    lines = [f"sweep {result.name}: {len(result.rows)} trials, ranked by {spec.metric} ({spec.mode})",
             f"{'trial':<14} {'status':<14} {spec.metric:>12}  overrides"]
    for r in result.rows:
        value = r[spec.metric]
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        mark = " *" if result.best is not None and r["run_id"] == result.best["run_id"] else ""
        lines.append(f"{r['trial']:<14} {r['status']:<14} {shown:>12}  {r['overrides']}{mark}")
    if result.best is not None:
        lines.append(f"best: MLflow run {result.best['run_id']}, checkpoint {result.best['checkpoint']}")
    return "\n".join(lines)
