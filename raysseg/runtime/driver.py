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
from raysseg.engine.inputs import check_inputs, prepared_split, run_plan
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

    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines instead
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray's processes inherit this environment (credentials included): nothing secret goes into a
        # runtime env, which Ray shows in its dashboard and writes to its logs.
        os.environ.setdefault("FAISS_OPT_LEVEL", "generic")
        ray.init(address="local", num_cpus=(os.cpu_count() or 2) + busy_workers, include_dashboard=False,
                 log_to_driver=True)


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
    """(storage_path, filesystem or None) for Ray Train's RunConfig."""
    from raysseg.io.storage import resolve

    if cfg.train.storage.startswith("s3://"):
        fs, path = resolve(cfg.train.storage)
        return path, fs
    return str(Path(cfg.train.storage).resolve()), None


def checkpoint_dir_uri(cfg: Config, checkpoint_path: str) -> str:
    """Ray's checkpoint path (filesystem-relative) as a URI our storage layer reads."""
    return f"s3://{checkpoint_path}" if cfg.train.storage.startswith("s3://") else checkpoint_path


def train(cfg: Config, restart: bool = False, parent_run_id: str | None = None, callbacks: tuple = (),
          datasets: dict | None = None) -> TrainResult:
    """Train (or resume) the run ``cfg.run_name()`` and return where its results are.

    A sweep passes its MLflow run as ``parent_run_id`` (the new run is its child) and a
    callback that forwards the workers' reports to Ray Tune. ``datasets`` (name -> Ray Dataset
    of decoded rows) replaces those read from ``data.train``, e.g. to train on rows of your own."""
    from ray.train import DataConfig

    from raysseg.io import tracking
    from raysseg.io.storage import remove_tree
    from raysseg.runtime.bank import ConceptBank
    from raysseg.runtime.datasets import make_dataset, run_tasks
    from raysseg.runtime.worker import train_loop

    n_images = check_inputs(cfg)
    run_name = cfg.run_name()
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
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
    print(f"{'resuming' if resumed else 'starting'} run {run_name} (MLflow run {run_id} at {uri})")

    world = cfg.train.num_workers
    init_ray(world)
    loop_cfg = {"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": uri, "n_images": n_images}
    prepared = None if datasets else prepared_split(cfg, run=run_tasks)  # data.cache: built once, by Ray tasks
    loop_cfg["plan"], reads = run_plan(cfg, prepared)
    datasets = datasets or {name: make_dataset(cfg.data.train, **options) for name, options in reads.items()}
    bank = None
    if spec(cfg.method).trainer:  # every trained method shares its state through one bank
        bank = ConceptBank.options(name=f"bank-{run_name}-{run_id[:8]}").remote(world)
        loop_cfg["bank"] = bank

    def new_trainer():
        return make_trainer(cfg, train_loop, loop_cfg, datasets, run_name, callbacks=callbacks,
                            dataset_config=DataConfig(datasets_to_split="all"))

    logger = tracking.RunLogger(uri, run_id)
    try:
        result = fit(new_trainer, logger, run_name, cfg.train.max_restarts)
        trace = ray.get(bank.get_trace.remote()) if bank is not None else []
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
    return TrainResult(run_id, run_name, ckpt_uri, uri, dict(result.metrics or {}), trace)


def make_trainer(cfg: Config, loop, loop_cfg: dict, datasets: dict, run_name: str, callbacks: tuple = (),
                 **kwargs):
    """A TorchTrainer whose (run name, storage) identify the run: the same pair again resumes it."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = _storage(cfg)
    return TorchTrainer(
        loop, train_loop_config=loop_cfg, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
                             callbacks=list(callbacks)),
        **kwargs,
    )


# A process died (a Train worker, the bank, a node): training again from the latest checkpoint helps.
# Anything else (bad data, a NaN loss, a storage outage past its retries) would fail the same way again.
LOST_PROCESS = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "WorkerCrashedError",
                "NodeDiedError", "OwnerDiedError", "BankLost", "worker process has died")
DETERMINISTIC = ("NonFiniteLoss", "ConfigError", "StorageError", "BackboneWeightsError", "DataError", "DatasetError")


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
        try:
            result = new_trainer().fit()
            break
        except Exception as e:  # noqa: BLE001 - Ray wraps the worker's error; show its one line
            if restartable(e) and restarts < max_restarts:
                restarts += 1
                print(f"run {run_name}: a process died ({_root_message(e)[:200]}); restarting from the latest "
                      f"checkpoint ({restarts} of train.max_restarts = {max_restarts})", flush=True)
                logger.log_metrics({"restarts": restarts}, step=restarts)
                continue
            logger.finish("FAILED")
            raise RunFailed(_root_message(e)) from None
    if result.checkpoint is None:
        logger.finish("FAILED")
        raise RunFailed(f"run {run_name} reported no checkpoint")
    return result


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
