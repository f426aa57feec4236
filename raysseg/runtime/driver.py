"""Training on Ray Train: the driver (``train``).

The driver validates inputs, opens or resumes the MLflow run, builds the Ray datasets
and the concept bank, and starts a ``TorchTrainer`` whose run name and storage path
identify the run: starting the same run again resumes from its latest checkpoint
(Ray Train restores it; the bank's tables are restored from it too).

Every worker runs :func:`raysseg.engine.loop.train_worker` (through :mod:`raysseg.runtime.worker`):
the method's epochs (none for ``kmeans``), then the offline k-means on the training split that
every method ends with. Rank 0 logs to MLflow and writes the checkpoint (``model.pt``) at the end
of every epoch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import ray

from raysseg.config import Config
from raysseg.engine.inputs import check_training, prepared_split, run_plan
from raysseg.engine.loop import RunStopped, checkpoint_position
from raysseg.io.checkpoints import CHECKPOINT_FILE, read_checkpoint
from raysseg.methods.registry import spec


class RunFailed(RuntimeError):
    """Training stopped; the message is one line and says what to do."""


# ---------------------------------------------------------------- driver side


def init_ray(busy_workers: int = 0) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray.

    A local Ray gets ``busy_workers`` logical CPUs on top of the machine's cores: Train
    workers and scoring actors hold a CPU slot each for their whole life, and without
    spare slots Ray Data could never schedule the decoding tasks that feed them (a
    deadlock on 2 cores).
    """
    import ray.data

    from raysseg.runtime import logs

    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines instead
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=logs.verbose())
    else:
        # Ray's processes inherit this environment (credentials included): nothing secret goes into a
        # runtime env, which Ray shows in its dashboard and writes to its logs.
        os.environ.setdefault("FAISS_OPT_LEVEL", "generic")
        ray.init(address="local", num_cpus=(os.cpu_count() or 2) + busy_workers, include_dashboard=False,
                 log_to_driver=logs.verbose())
    logs.quiet_libraries()
    sigterm_stops()  # ray.init replaced it with a handler that aborts the process


def sigterm_stops():
    """Make SIGTERM raise KeyboardInterrupt, as Ctrl-C does (main thread only); returns the handler it replaced."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, signal.default_int_handler)


@dataclass
class TrainResult:
    run_id: str
    run_name: str
    checkpoint: str  # URI of the final model.pt
    tracking_uri: str
    metrics: dict = field(default_factory=dict)
    bank_trace: list = field(default_factory=list)
    already_finished: bool = False


def _storage(cfg: Config):
    """(storage_path, filesystem) for Ray Train's and Tune's RunConfig: the storage layer's filesystem
    (:func:`raysseg.io.storage.ray_filesystem`), so that what Ray writes there (checkpoints, its snapshot and
    marker files) rides out an S3 outage as our own writes do, is written atomically, and fails with one
    line naming the path."""
    from raysseg.io.storage import ray_filesystem

    uri = cfg.train.storage if cfg.train.storage.startswith("s3://") else str(Path(cfg.train.storage).resolve())
    fs, path = ray_filesystem(uri)
    return path, fs


def checkpoint_dir_uri(cfg: Config, checkpoint_path: str) -> str:
    """Ray's checkpoint path (filesystem-relative) as a URI our storage layer reads."""
    return f"s3://{checkpoint_path}" if cfg.train.storage.startswith("s3://") else checkpoint_path


def train(cfg: Config, restart: bool = False, parent_run_id: str | None = None, callbacks: tuple = (),
          datasets: dict | None = None) -> TrainResult:
    """Train (or resume) the run ``cfg.run_name()`` and return where its results are.

    The run's lease (:mod:`raysseg.io.lease`) is held throughout: a second command for the same run
    refuses. Ctrl-C or SIGTERM stops it with one line (:class:`RunStopped`) naming the newest complete
    checkpoint, which the same command resumes from; the MLflow run is marked KILLED.

    A sweep passes its MLflow run as ``parent_run_id`` (the new run is its child) and a
    callback that forwards the workers' reports to Ray Tune. ``datasets`` (name -> Ray Dataset
    of decoded rows) replaces those read from ``data.train``, e.g. to train on rows of your own."""
    from raysseg.io import tracking
    from raysseg.io.lease import RunLease

    n_images, listing = check_training(cfg)  # the training split's one listing, used by everything below
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    tracking.check_reachable(uri)
    with RunLease(cfg.train.storage, cfg.run_name()), stop_signals():
        return _train(cfg, n_images, uri, restart, parent_run_id, callbacks, datasets, listing)


def _train(cfg: Config, n_images: int, uri: str, restart: bool, parent_run_id: str | None, callbacks: tuple,
           datasets: dict | None, listing=None) -> TrainResult:
    import time

    from raysseg.io import tracking
    from raysseg.io.storage import remove_tree
    from raysseg.runtime import logs
    from raysseg.runtime.bank import ConceptBank
    from raysseg.runtime.datasets import make_dataset, run_tasks
    from raysseg.runtime.worker import train_loop

    t0 = time.time()
    run_name = cfg.run_name()
    if restart:
        remove_tree(f"{cfg.train.storage.rstrip('/')}/{run_name}")
        previous = tracking.find_run(uri, cfg.mlflow.experiment, run_name)
        if previous is not None and previous.info.status != "FINISHED":
            tracking.RunLogger(uri, previous.info.run_id).finish("KILLED")
    else:
        previous = tracking.find_run(uri, cfg.mlflow.experiment, run_name)
        if previous is not None and previous.info.status == "FINISHED":
            ckpt = previous.data.tags.get(tracking.CHECKPOINT_TAG, "")
            done = read_checkpoint(ckpt)["progress"]["epoch"] if ckpt else 0
            if not spec(cfg.method).trainer or done >= cfg.train.epochs:
                print(f"run {run_name} already finished (MLflow run {previous.info.run_id}); "
                      f"use --restart to train it again")
                return TrainResult(previous.info.run_id, run_name, ckpt, uri, dict(previous.data.metrics),
                                   already_finished=True)
            print(f"run {run_name} finished {done} epochs; continuing to train.epochs = {cfg.train.epochs}")
            tracking.RunLogger(uri, previous.info.run_id).client.update_run(previous.info.run_id, status="RUNNING")
    run_id, resumed = tracking.start_or_resume_run(
        uri, cfg.mlflow.experiment, run_name, cfg.flat(),
        tags={tracking.PARENT_TAG: parent_run_id} if parent_run_id else None)
    world = cfg.train.num_workers
    epochs = f", {cfg.train.epochs} epochs" if spec(cfg.method).trainer else ""
    print(f"{'resuming' if resumed else 'starting'} run {run_name}: {cfg.method} on {cfg.data.train} "
          f"({n_images} images), {world} workers{epochs}; MLflow run {run_id} at {uri}", flush=True)

    init_ray(world)
    print(logs.where_logs_go(), flush=True)
    if parent_run_id is None:  # a sweep's trials were planned by the sweep
        plan_or_fail(cfg, run_id, uri)
    loop_cfg = {"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": uri, "n_images": n_images}
    prepared = None if datasets else prepared_split(cfg, run=run_tasks, listing=listing)  # data.cache: by Ray tasks
    loop_cfg["plan"], reads = run_plan(cfg, prepared, run=run_tasks, listing=listing)  # tables: Ray tasks too
    bank = None
    if spec(cfg.method).trainer:  # every trained method shares its state through one bank
        bank = ConceptBank.options(name=f"bank-{run_name}-{run_id[:8]}").remote(world)
        loop_cfg["bank"] = bank
    datasets = datasets or {name: make_dataset(cfg.data.train, **options, epoch_clock=bank, train_seed=cfg.train.seed)
                            for name, options in reads.items()}

    def new_trainer():
        loop_cfg["checkpoints"] = complete_checkpoints(cfg, run_name)  # newest first: the worker resumes from one
        return make_trainer(cfg, train_loop, loop_cfg, datasets, run_name, callbacks=callbacks)

    logger = tracking.RunLogger(uri, run_id)
    try:
        with logs.ConsolePrinter() as console:
            loop_cfg["console"] = console.actor
            result = fit(new_trainer, logger, run_name, cfg.train.max_restarts)
        trace = ray.get(bank.get_trace.remote()) if bank is not None else []
    except KeyboardInterrupt:
        raise stopped(cfg, run_name, logger) from None
    finally:
        if bank is not None:  # its state lives on in the checkpoints
            ray.kill(bank)
    ckpt_uri = checkpoint_dir_uri(cfg, result.checkpoint.path) + "/" + CHECKPOINT_FILE
    with result.checkpoint.as_directory() as local:
        logger.log_file(str(Path(local) / CHECKPOINT_FILE), "checkpoint")
    if trace:
        import json

        logger.log_bytes(json.dumps(trace).encode(), "bank_trace.json")
    logger.set_tag(tracking.CHECKPOINT_TAG, ckpt_uri)
    logger.finish("FINISHED")
    prune_checkpoints(cfg, run_name)
    result = TrainResult(run_id, run_name, ckpt_uri, uri, dict(result.metrics or {}), trace)
    print_summary(result, time.time() - t0)
    return result


SUMMARY_METRICS = ("loss_total", "view_nmi", "cluster_mean_cosine", "iterations_per_s", "skipped_files", "epoch",
                   "step")


def print_summary(result: TrainResult, seconds: float) -> None:
    """The run's final lines: a table of its label-free metrics, the checkpoint and the MLflow run."""
    print(f"run {result.run_name} finished in {seconds:.0f} s", flush=True)
    for key in SUMMARY_METRICS:
        value = result.metrics.get(key)
        if isinstance(value, (int, float)) and (value or key not in ("epoch", "step")):  # k-means has no epochs
            print(f"  {key:<22}{value:>12.4g}", flush=True)
    print(f"checkpoint: {result.checkpoint}", flush=True)
    print(f"MLflow run: {result.run_id}; browse with: mlflow ui --backend-store-uri {result.tracking_uri}", flush=True)


def plan_or_fail(cfg: Config, run_id: str, uri: str) -> None:
    """Refuse, with one line and the MLflow run marked FAILED, a run the Ray cluster can never place."""
    from raysseg.io import tracking
    from raysseg.runtime.resources import plan, run_needs
    from raysseg.settings import ConfigError

    try:
        plan(run_needs(cfg))
    except ConfigError:
        _finish_failed(tracking.RunLogger(uri, run_id))
        raise


class stop_signals:
    """SIGTERM stops like Ctrl-C (a KeyboardInterrupt) while in the block; only in the main thread."""

    def __enter__(self):
        self.saved = sigterm_stops()

    def __exit__(self, *exc):
        import signal

        if self.saved is not None:
            signal.signal(signal.SIGTERM, self.saved)


def run_folder(cfg: Config, run_name: str) -> str:
    """The run's checkpoint folder as a URI the storage layer reads (absolute for a local folder)."""
    if cfg.train.storage.startswith("s3://"):
        return f"{cfg.train.storage.rstrip('/')}/{run_name}"
    return str(Path(cfg.train.storage).resolve() / run_name)


def complete_checkpoints(cfg: Config, run_name: str, name: str = CHECKPOINT_FILE) -> list[str]:
    """The run's ``checkpoint_*`` folders holding ``name``, newest first (Ray names them by time).

    Ray Train resumes from the last checkpoint it registered; a stop between a checkpoint's upload and
    its registration leaves a newer one that only this listing finds."""
    from raysseg.io import storage

    root = run_folder(cfg, run_name)
    if not storage.exists(root):
        return []
    folders = {uri.rsplit("/", 2)[-2] for uri in storage.list_files(root, suffixes=(name,), recursive=True)
               if uri.rsplit("/", 1)[-1] == name}
    return [f"{root}/{f}" for f in sorted((f for f in folders if f.startswith("checkpoint_")), reverse=True)]


def newest_loadable(folders: list[str], name: str = CHECKPOINT_FILE) -> tuple[str, dict] | None:
    """(folder, progress) of the newest checkpoint in ``folders`` that loads, or None."""
    import io

    import torch

    from raysseg.io import storage

    for folder in folders:
        try:
            state = torch.load(io.BytesIO(storage.read_bytes(f"{folder}/{name}")), map_location="cpu",
                               weights_only=False)
            return folder, state.get("progress", {})
        except Exception:  # noqa: BLE001 - cut short by the stop: the one before it is the newest complete
            continue
    return None


def prune_checkpoints(cfg: Config, run_name: str, name: str = CHECKPOINT_FILE) -> None:
    """Keep the newest ``train.checkpoints_to_keep`` checkpoint folders; remove older ones and any left
    without a checkpoint file (a stop between their upload and Ray's registration leaves such orphans)."""
    from raysseg.io import storage

    root = run_folder(cfg, run_name)
    if not storage.exists(root):
        return
    keep = set(complete_checkpoints(cfg, run_name, name)[: cfg.train.checkpoints_to_keep])
    import pyarrow.fs as pafs

    fs, path = storage.resolve(root)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        folder = f"{root}/{info.base_name}"
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_") and folder not in keep:
            storage.remove_tree(folder)


def stopped(cfg: Config, run_name: str, logger, name: str = CHECKPOINT_FILE) -> RunStopped:
    """After Ctrl-C / SIGTERM: mark the MLflow run KILLED and say which checkpoint the same command resumes from."""
    try:
        logger.finish("KILLED", seconds=5)
    except Exception as e:  # noqa: BLE001 - the stop line matters more than the MLflow status
        print(f"warning: could not mark MLflow run {logger.run_id} KILLED ({e})", flush=True)
    found = newest_loadable(complete_checkpoints(cfg, run_name, name), name)
    if found is None:
        kept = "no checkpoint was written yet"
    else:
        folder, progress = found
        epochs = cfg.train.epochs if name == CHECKPOINT_FILE else cfg.pretrain.epochs
        kept = f"kept {folder}/{name} ({checkpoint_position(progress, epochs)})"
    return RunStopped(f"run {run_name} stopped: {kept}; MLflow run {logger.run_id} marked KILLED; "
                      f"run the same command again to resume")


def make_trainer(cfg: Config, loop, loop_cfg: dict, datasets: dict, run_name: str, callbacks: tuple = (),
                 **kwargs):
    """A TorchTrainer whose (run name, storage) identify the run: the same pair again resumes it."""
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysseg.runtime.resources import data_limits, worker_resources

    storage_path, storage_fs = _storage(cfg)
    kwargs.setdefault("dataset_config", DataConfig(datasets_to_split="all", execution_options=data_limits(cfg)))
    return TorchTrainer(
        loop, train_loop_config=loop_cfg, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
                             callbacks=list(callbacks)),
        **kwargs,
    )


# A process died (a Train worker, the bank, a node): training again from the latest checkpoint helps.
# Anything else (bad data, a NaN loss, a storage outage past its retries) would fail the same way again.
LOST_PROCESS = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "WorkerCrashedError",
                "NodeDiedError", "OwnerDiedError", "BankLost", "worker process has died")
DETERMINISTIC = ("NonFiniteLoss", "ConfigError", "StorageError", "BackboneWeightsError", "DataError", "DatasetError",
                 "TrackingError")


def restartable(e: BaseException) -> bool:
    """True when a failed ``trainer.fit()`` lost a process rather than hit an error in the run itself.

    Looks at each failed worker's error (Ray Train's ``worker_failures``), else at ``e``."""
    failures = list(getattr(e, "worker_failures", {}).values()) or [e]
    texts = [f"{type(f).__name__}: {f}" for f in failures]
    if any(k + ":" in text for text in texts for k in DETERMINISTIC):
        return False
    return any(isinstance(f, ray.exceptions.RayActorError) or any(k in text for k in LOST_PROCESS)
               for f, text in zip(failures, texts))


def fit(new_trainer, logger, run_name: str, max_restarts: int = 0):
    """Run ``new_trainer()``; after a lost process, run a new one, which resumes from the latest
    checkpoint (at most ``max_restarts`` times; each is logged as the ``restarts`` metric). Any other
    failure marks the MLflow run FAILED and becomes one line (RunFailed)."""
    restarts = 0
    while True:
        trainer = None
        try:
            trainer = new_trainer()
            result = fit_off_main_thread(trainer)
            break
        except Exception as e:  # noqa: BLE001 - Ray wraps the worker's error; show its one line
            if restartable(e) and restarts < max_restarts:
                restarts += 1
                print(f"run {run_name}: a process died ({_root_message(e)[:200]}); restarting from the latest "
                      f"checkpoint ({restarts} of train.max_restarts = {max_restarts})", flush=True)
                logger.log_metrics({"restarts": restarts}, step=restarts)
                continue
            _finish_failed(logger)
            raise RunFailed(_with_kept_folder(_root_message(e), trainer)) from None
    if result.checkpoint is None:
        _finish_failed(logger)
        raise RunFailed(f"run {run_name} reported no checkpoint")
    return result


def fit_off_main_thread(trainer):
    """``trainer.fit()`` (a Ray Train trainer or a Tune Tuner) on a thread, so that Ctrl-C and SIGTERM reach
    this (main) thread as a KeyboardInterrupt; meanwhile a line a minute says when the job waits for resources.

    On the main thread Ray Train and Tune install their own SIGINT handlers, which abort the run and return (or
    exit) without a word; here the driver stops the run itself (see :func:`stopped`,
    :func:`raysseg.runtime.sweep.sweep_stopped`): when it exits, Ray ends the run's workers."""
    import threading

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = e

    from raysseg.runtime.resources import WaitWatch

    thread = threading.Thread(target=run, name="trainer-fit", daemon=True)
    thread.start()
    watch = WaitWatch()
    while thread.is_alive():
        thread.join(0.5)
        watch.tick()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _finish_failed(logger) -> None:
    """Mark the run FAILED without hiding the failure's own line behind an MLflow outage."""
    try:
        logger.finish("FAILED", seconds=5)
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not mark MLflow run {logger.run_id} FAILED ({e})", flush=True)


def _with_kept_folder(message: str, trainer) -> str:
    """A storage failure that does not say which checkpoint is kept (Ray's own files: its snapshot, its marker;
    the images) names the run's folder instead, whose newest complete checkpoint the same command resumes from.
    (A failed checkpoint write names the kept checkpoint itself: raysseg.runtime.worker._report.)"""
    from raysseg.io.storage import RESUME_HINT, guarded

    run_config = getattr(trainer, "run_config", None)
    if RESUME_HINT not in message or run_config is None:
        return message
    folder = f"{str(run_config.storage_path).rstrip('/')}/{run_config.name}"
    files = guarded(run_config.storage_filesystem)
    return message.replace(RESUME_HINT, f"the newest complete checkpoint in {files.uri(folder) if files else folder} "
                                        f"is kept: run the same command again to resume from it")


def _root_message(e: BaseException) -> str:
    """The innermost useful line of a (Ray-wrapped) worker error, without secrets."""
    from raysseg.io.tracking import redact

    text = redact(str(e))
    failures = [redact(str(f)) for f in getattr(e, "worker_failures", {}).values()]  # each worker's full error
    for candidate in failures + [text]:
        for cls in DETERMINISTIC:
            if cls + ":" in candidate:
                return candidate.split(cls + ":", 1)[1].strip().splitlines()[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
