"""The ``raysseg`` command line. Every user-facing error is one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from raysseg.settings import ConfigError


def _config(args):
    from raysseg.config import load_config

    return load_config(args.config, args.set or [])


def cmd_train(args) -> None:
    cfg = _config(args)  # validated before Ray starts
    if args.local:
        from raysseg.engine.local import train_local
        from raysseg.io.tracking import tracking_uri

        if args.restart:
            from raysseg.io.storage import remove_tree

            remove_tree(f"{cfg.train.storage.rstrip('/')}/{cfg.run_name()}")
        result = train_local(cfg, tracking_uri=tracking_uri(cfg.mlflow.tracking_uri) if args.mlflow else "")
        print(f"checkpoint: {result.checkpoint}")
        return
    from raysseg.runtime.driver import train

    result = train(cfg, restart=args.restart)  # ends with its summary
    if result.already_finished:
        print(f"checkpoint: {result.checkpoint}")


def cmd_sweep(args) -> None:
    from raysseg.runtime.sweep import sweep
    from raysseg.runtime.driver import RunFailed

    result = sweep(args.config, args.space, tuple(args.set or ()), restart=args.restart, name=args.name,
                   max_concurrent=args.max_concurrent)
    if result.best is None and not result.already_finished:
        raise RunFailed(f"sweep {result.name}: no trial finished; see the trials above and MLflow run "
                        f"{result.parent_run_id}")


def cmd_pull_best(args) -> None:
    from raysseg.io.tracking import pull_best

    info = pull_best(args.experiment, args.metric, args.out, mode=args.mode, filter_string=args.filter or "",
                     register_as=args.register_as or "", alias=args.alias)
    print(f"best run {info['run_id']} ({info['run_name']}): {args.metric} = {info['value']:.6g}")
    print(f"checkpoint: {info['checkpoint']}")
    if "registered" in info:
        print(f"registered: {info['registered']} (an MLflow Model: mlflow.pyfunc.load_model(URI).predict(image) "
              f"gives label maps)")


def cmd_pretrain(args) -> None:
    from raysseg.runtime.pretrain import pretrain

    cfg = _config(args)  # validated before Ray starts
    result = pretrain(cfg, restart=args.restart)
    print(f"backbone: {result.backbone}")
    print(f"MLflow run: {result.run_id} ({result.tracking_uri})")


def cmd_evaluate(args) -> None:
    from raysseg.runtime.evaluate import evaluate

    evaluate(args.checkpoint, split=args.split, crf=False if args.no_crf else None,
             probe=False if args.no_probe else None, retrieval=False if args.no_retrieval else None,
             out=args.out, probe_train=args.probe_train, data_settings=tuple(args.set or ()))


def cmd_run(args) -> None:
    """Train, then evaluate the final checkpoint: the quick start."""
    from raysseg.engine.inputs import check_evaluation
    from raysseg.runtime.evaluate import evaluate
    from raysseg.runtime.driver import train

    cfg = _config(args)
    check_evaluation(cfg, cfg.data.val, cfg.eval.probe, cfg.eval.retrieval, retrieval_asked=False)  # before training
    result = train(cfg, restart=args.restart)
    evaluate(result.checkpoint, out=args.out)
    print(f"MLflow run {result.run_id} in {result.tracking_uri}; "
          f"browse with: mlflow ui --backend-store-uri {result.tracking_uri}")


def cmd_predict(args) -> None:
    from raysseg.runtime.predict import predict_job

    predict_job(args.checkpoint, args.images, args.out, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                batch_size=args.batch_size, overlays=args.overlays, overwrite=args.overwrite,
                max_pixels=args.max_pixels)


def cmd_concepts(args) -> None:
    from raysseg.apps.browse import browse

    browse(args.checkpoint, split=args.split, limit=args.limit, out=args.out, queries=args.query or (),
           n_concepts=args.n_concepts, rebuild=args.rebuild)


def cmd_data_synth(args) -> None:
    from raysseg.apps.synth import synth_dataset

    if os.path.isdir(os.path.join(args.out, "train", "images")) and not args.force:
        print(f"{args.out} already holds a dataset (use --force to regenerate)")
        return
    synth_dataset(args.out, n_train=args.train, n_val=args.val, seed=args.seed)
    print(f"wrote a synthetic dataset to {args.out}")


def cmd_data_upload(args) -> None:
    from raysseg.io.images import upload

    upload(args.src, args.dst)


def cmd_data_prepare(args) -> None:
    from raysseg.io.datasets.layout import PrepareOptions
    from raysseg.runtime.prepare import prepare

    lists = {}
    for item in args.image_list or ():
        split, sep, uri = item.partition("=")
        if not sep or not uri:
            raise ConfigError(f"--image-list {item!r}: expected SPLIT=FILE, e.g. train=Coco164kFull_Stuff_Coarse_7.txt")
        lists[split] = uri
    if args.tile < 1:
        raise ConfigError(f"--tile {args.tile}: the crop side must be a positive number of pixels (papers: 200)")
    if not 0 <= args.five_crop < 1:
        raise ConfigError(f"--five-crop {args.five_crop}: the crop's side as a fraction of the image's, "
                          "0 < RATIO < 1 (STEGO and HP: 0.5), or 0 for none")
    val_tiles = tuple(t.strip() for t in (args.val_tiles or "").split(",") if t.strip())
    prepare(args.dataset, args.src, args.dst, PrepareOptions(image_lists=lists, tile=args.tile, val_tiles=val_tiles,
                                                             protocol=args.protocol, five_crop=args.five_crop),
            local=args.local)


def cmd_storage_serve(args) -> None:
    import secrets
    import signal
    import time

    from raysseg.io.storage import SeaweedServer

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the server on SIGTERM too

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "raysseg")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", secrets.token_hex(16))
    with SeaweedServer(args.dir, s3_port=args.port) as server:
        if args.bucket:
            server.create_bucket(args.bucket)
        bucket = f" with the bucket {args.bucket} (use s3://{args.bucket}/<prefix>)" if args.bucket else ""
        print(f"S3 server running at {server.endpoint}{bucket}; in another shell:")
        print(f"  export AWS_ENDPOINT_URL={server.endpoint}")
        print(f"  export AWS_ACCESS_KEY_ID={os.environ['AWS_ACCESS_KEY_ID']}")
        print(f"  export AWS_SECRET_ACCESS_KEY={os.environ['AWS_SECRET_ACCESS_KEY']}")
        print("Ctrl-C stops it; data stays in", args.dir, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def cmd_bench(args) -> None:
    if args.what == "quality":
        from raysseg.apps.quality import DEFAULT_CONFIGS, bench_quality

        configs = [c for c in (args.configs or ",".join(DEFAULT_CONFIGS)).split(",") if c]
        seeds = list(range(args.seeds))
        text = bench_quality(configs, seeds, args.protocol, args.dir or f"outputs/quality-{args.protocol}",
                             tuple(args.set or ()), dev=args.dev)
        print(text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")
        return
    if args.what in ("gpu", "demand") or (args.what == "step" and args.local):  # torch only: no Ray, MLflow or faiss
        from raysseg.apps import bench_steps

        bench_steps.main(args)
        return
    if args.method == "moco":
        raise ConfigError("bench step --method moco runs in process only: add --local")
    args.method = args.method or "hp"
    from raysseg.apps import bench

    bench.main(args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raysseg")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def parser() -> argparse.ArgumentParser:
    from raysseg.core.precision import PRECISIONS
    from raysseg.methods.registry import METHODS, trained_methods

    p = argparse.ArgumentParser(prog="raysseg", description=__doc__)
    p.add_argument("--version", action="version", version=f"raysseg {_version()}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's, Tune's and MLflow's own logs on the terminal too (default: in outputs/logs/)")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--config", required=True, help="built-in config name (e.g. hp_camvid) or a YAML path")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set train.epochs=2")
        sp.add_argument("--restart", action="store_true", help="discard this run's checkpoints and start over")
        return sp

    methods = "\n".join(f"  {name:9} {s.summary}" for name, s in METHODS.items())
    sp = with_config(sub.add_parser("train", help="train (or resume) a run",
                                    epilog=f"methods (config key `method`):\n{methods}",
                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    sp.add_argument("--local", action="store_true",
                    help="in this process, without Ray: one worker, for debugging and machines without Ray")
    sp.add_argument("--mlflow", action="store_true", help="with --local: log to MLflow too (mlflow.tracking_uri)")
    sp.set_defaults(fn=cmd_train)
    with_config(sub.add_parser("pretrain", help="MoCo v2 backbone pretraining (or resume); writes backbone.pt "
                                                "for model.weights")).set_defaults(fn=cmd_pretrain)
    sp = with_config(sub.add_parser("sweep", help="Ray Tune over config keys; resumes when run again"))
    sp.add_argument("--space", required=True, help="built-in sweep name (e.g. hp_pool_tau) or a YAML path")
    sp.add_argument("--name", default="", help="sweep name (default: from the config, the sweep file and their hash)")
    sp.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: the sweep file's)")
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser("pull-best", help="download the checkpoint of the best MLflow run (at a tie: the smallest run id)")
    sp.add_argument("--experiment", default="raysseg", help="MLflow experiment to search (default: raysseg)")
    sp.add_argument("--metric", required=True, help="e.g. view_nmi (label-free) or eval/val/clusters_miou")
    sp.add_argument("--mode", choices=["max", "min"], default="max", help="max: higher --metric is better (default); min: lower")
    sp.add_argument("--out", required=True, help="folder for model.pt and run.json")
    sp.add_argument("--filter", help="extra MLflow filter, e.g. \"tags.mlflow.parentRunId = '<sweep run id>'\"")
    sp.add_argument("--register-as", metavar="NAME", help="also register its MLflow Model (pyfunc: image -> label map) "
                    "in the model registry; a run registered before keeps its version")
    sp.add_argument("--alias", default="best", help="registry alias for --register-as")
    sp.set_defaults(fn=cmd_pull_best)

    sp = with_config(sub.add_parser("run", help="train then evaluate (the quick start)"))
    sp.add_argument("--out", default="outputs/eval",
                    help="folder for the evaluation's report.json and pictures (default: outputs/eval)")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("evaluate", help="score a checkpoint on a labelled split")
    sp.add_argument("--checkpoint", required=True, help="model.pt, its folder, s3://..., runs:/<id>/checkpoint or models:/<name>@<alias>")
    sp.add_argument("--split", help="folder or s3:// prefix with images/ and labels/ (default: the config's val)")
    sp.add_argument("--no-crf", action="store_true", help="skip the dense-CRF refinement of the cluster maps")
    sp.add_argument("--no-probe", action="store_true",
                    help="skip the linear probe (it is trained on the training split's labels)")
    sp.add_argument("--no-retrieval", action="store_true",
                    help="skip k-means segments labelled by the k nearest training prototypes")
    sp.add_argument("--probe-train", metavar="SPLIT",
                    help="labelled split (folder or s3:// prefix with images/ and labels/) that the linear probe "
                         "and retrieval train on (default: the checkpoint's data.train, which may exist only on "
                         "the machine that trained it)")
    sp.add_argument("--out", default="outputs/eval",
                    help="folder for report.json, the confusion matrices and overlays (default: outputs/eval)")
    sp.add_argument("--set", action="append", metavar="data.KEY=VALUE",
                    help="a data setting over the checkpoint's, e.g. --set data.n_classes=12 (the model's settings "
                         "are the checkpoint's)")
    sp.set_defaults(fn=cmd_evaluate)

    sp = sub.add_parser("predict", help="segment a folder or s3:// prefix of images (sub-folders too) into "
                                         "label PNGs, predictions.parquet and a manifest; resumes when run again")
    sp.add_argument("--checkpoint", required=True, help="as for evaluate")
    sp.add_argument("--images", required=True, help="folder or s3:// prefix (SRC)")
    sp.add_argument("--out", required=True, help="folder or s3:// prefix (DST)")
    sp.add_argument("--workers", type=int, default=2, help="model replicas (Ray actors)")
    sp.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each replica holds (0: CPU)")
    sp.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    sp.add_argument("--overlays", action="store_true", help="also write colour overlays under DST/overlays/")
    sp.add_argument("--overwrite", action="store_true", help="run the model again on images already done")
    sp.add_argument("--max-pixels", type=int, help="skip images of more pixels, with one line each (default: the "
                                                  "checkpoint's data.max_pixels, 250,000,000)")
    sp.set_defaults(fn=cmd_predict)

    sp = sub.add_parser("concepts", help="browse a split by concepts: gallery, t-SNE, relation queries")
    sp.add_argument("--checkpoint", required=True, help="model.pt, its folder, s3://... or runs:/<id>/checkpoint")
    sp.add_argument("--split", help="folder or s3:// prefix with images/ (default: the config's train)")
    sp.add_argument("--limit", type=int, help="index only the first N images")
    sp.add_argument("--out", default="outputs/concepts", help="index, pictures and JSON (an index there is reused)")
    sp.add_argument("--n-concepts", type=int, default=64,
                    help="k-means concepts for checkpoints without a learned dictionary")
    sp.add_argument("--query", action="append", metavar='"A REL B"',
                    help='e.g. "3 left-of 7"; relations: left-of, right-of, above, below, next-to, with (repeatable)')
    sp.add_argument("--rebuild", action="store_true", help="index again even if --out holds one for this checkpoint")
    sp.set_defaults(fn=cmd_concepts)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    sp = data.add_parser("synth", help="generate the labelled procedural dataset")
    sp.add_argument("out", help="folder to write train/ and val/ (images/, labels/) and classes.txt into")
    sp.add_argument("--train", type=int, default=48, help="training images (default: 48)")
    sp.add_argument("--val", type=int, default=16, help="validation images (default: 16)")
    sp.add_argument("--seed", type=int, default=0, help="random seed of the scenes (default: 0)")
    sp.add_argument("--force", action="store_true", help="write it again even if OUT already holds a dataset")
    sp.set_defaults(fn=cmd_data_synth)
    sp = data.add_parser("upload", help="copy a dataset folder into s3://bucket/prefix")
    sp.add_argument("src", help="local dataset folder (e.g. data/synth)")
    sp.add_argument("dst", help="s3://bucket/prefix to copy it to (the bucket must exist)")
    sp.set_defaults(fn=cmd_data_upload)
    sp = data.add_parser("prepare", help="a raw distribution (cocostuff27, cityscapes27, potsdam3, voc2012) into "
                                         "<DST>/<split>/images|labels + dataset_card.json; resumable")
    sp.add_argument("dataset", choices=["cocostuff27", "cityscapes27", "potsdam3", "voc2012"],
                    help="the distribution and its mapping (README: Reproducing the papers)")
    sp.add_argument("src", help="the distribution as unpacked: folder or s3://bucket/prefix")
    sp.add_argument("dst", help="output root: folder or s3://bucket/prefix")
    sp.add_argument("--image-list", action="append", metavar="SPLIT=FILE",
                    help="cocostuff27: keep only the images listed (curated subsets); repeatable")
    sp.add_argument("--tile", type=int, default=200, help="potsdam3: crop side in pixels (IIC/STEGO: 200)")
    sp.add_argument("--val-tiles", default="", help="potsdam3: comma-separated tile ids for val "
                                                    "(default: the 14 ISPRS benchmark test tiles)")
    sp.add_argument("--protocol", default="", help="the image lists and splits a paper used (default: the first): "
                    "cocostuff27 all|stego|picie, cityscapes27 fine, potsdam3 tiles|iic, voc2012 aug|segsort "
                    "(README: Reproducing the papers)")
    sp.add_argument("--five-crop", type=float, default=0.0, metavar="RATIO",
                    help="write every split but val as five crops (4 corners, centre) of RATIO x each side, as "
                         "STEGO's and HP's training sets (0.5); default 0: whole images")
    sp.add_argument("--local", action="store_true", help="threads in this process instead of a Ray Data job")
    sp.set_defaults(fn=cmd_data_prepare)

    storage = sub.add_parser("storage", help="the embedded S3 server").add_subparsers(dest="storage_command",
                                                                                     required=True)
    sp = storage.add_parser("serve", help="run SeaweedFS S3 on 127.0.0.1 and print the variables to set")
    sp.add_argument("--dir", default="data/s3", help="folder for the server's data and weed.log (default: data/s3)")
    sp.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1 (default: 8333)")
    sp.add_argument("--bucket", default="raysseg", help="bucket to create at start ('' for none; default: raysseg)")
    sp.set_defaults(fn=cmd_storage_serve)

    from raysseg.apps.weights import add_commands as add_weights_commands

    add_weights_commands(sub)

    sp = sub.add_parser("bench", help="benchmarks that print a table")
    sp.add_argument("what", choices=["data", "eval", "step", "gpu", "demand", "cluster", "select", "quality",
                                     "predict"],
                    help="gpu: every method's step at the papers' settings, fp32 and bf16 (torch only); "
                         "demand: images/s a GPU would consume, from FLOPs counted on the CPU")
    sp.add_argument("--reports", default="outputs/*/*/report.json",
                    help="select: glob of `raysseg evaluate` reports whose checkpoints get a view_nmi")
    sp.add_argument("--method", default=None, choices=[*trained_methods(), "moco"],
                    help="data, eval, step: the method to benchmark (default: hp); demand: only this method's rows")
    sp.add_argument("--scenes", default="", metavar="FOLDER",
                    help="step --local, demand: run the steps on this local folder's images instead of synthetic "
                         "scenes (e.g. ../shared/data/camvid/train)")
    sp.add_argument("--local", action="store_true", help="step: in this process on synthetic scenes (no Ray)")
    sp.add_argument("--device", default="cpu", help="step --local, gpu: cpu or cuda")
    sp.add_argument("--precision", default="fp32", choices=PRECISIONS, help="step --local: train.precision")
    sp.add_argument("--paper", action="store_true", help="step --local: the papers' settings (batch, size, backbone)")
    sp.add_argument("--steps", type=int, default=8, help="step --local, gpu: timed steps (after 2 warm-up steps)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="step --local: a setting on top of the preset; quality: a setting for every run")
    sp.add_argument("--sizes", default="1000000,5000000", help="cluster: comma-separated feature counts N")
    sp.add_argument("--dim", type=int, default=128, help="cluster: feature dimension")
    sp.add_argument("--k", type=int, default=27, help="cluster: number of clusters")
    sp.add_argument("--iterations", type=int, default=20, help="cluster: k-means iterations on the init sample")
    sp.add_argument("--init-sample", type=int, default=100_000, help="cluster: points in the init sample")
    sp.add_argument("--assign-passes", type=int, default=1, help="cluster: distributed assignment passes")
    sp.add_argument("--sklearn-max-iter", type=int, default=20, help="cluster: MiniBatchKMeans epochs at most")
    sp.add_argument("--backbones", default="resnet18_fpn,vit_small_patch16",
                    help="cluster: backbones for the feature-extraction rate ('' to skip)")
    sp.add_argument("--configs", help="quality: comma-separated configs (default: the five CamVid methods), each "
                                      "run beside k-means on its backbone; a variant adds settings: "
                                      "segsort_camvid+segsort.min_cells=8")
    sp.add_argument("--seeds", type=int, default=3, help="quality: seeds 0..N-1 per config")
    sp.add_argument("--protocol", default="dev", choices=["dev", "val"],
                    help="quality: dev = train on CamVid train less a dev part, score on the dev part (tune here); "
                         "val = train on all of train, score on val (report once)")
    sp.add_argument("--dev", type=int, default=67, help="quality: images held out of CamVid train as the dev part")
    sp.add_argument("--dir", help="quality: runs, logs and results.json (default outputs/quality-<protocol>); "
                                  "the same command resumes")
    sp.add_argument("--limit", type=int, default=0, help="predict: the first N CamVid training images (0: all 367)")
    sp.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    sp.set_defaults(fn=cmd_bench)
    return p


# Errors that end a command with one line: (module, class). A module whose dependencies are not installed
# (a GPU machine with torch only) cannot raise its errors, so it is skipped.
USER_ERRORS = (("raysseg.core.backbones", "BackboneError"), ("raysseg.apps.browse", "BrowseError"),
               ("raysseg.io.images", "DatasetError"), ("raysseg.io.storage", "StorageError"),
               ("raysseg.io.tracking", "TrackingError"), ("raysseg.runtime.driver", "RunFailed"),
               ("raysseg.io.checkpoints", "CheckpointError"), ("raysseg.io.lease", "RunBusy"),
               ("raysseg.io.weights", "WeightsError"))


def _user_errors() -> tuple[type, ...]:
    import importlib

    found = []
    for module, name in USER_ERRORS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except ImportError:
            continue
    return tuple(found)


def main(argv: list[str] | None = None) -> None:
    user_errors = _user_errors()
    args = parser().parse_args(argv)
    _route_logs(args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C: checkpoints kept
    try:
        args.fn(args)
    except ConfigError as e:
        sys.exit(_fail(f"config error: {e}"))
    except user_errors as e:
        sys.exit(_fail(f"error: {_what_is_kept(args, str(e))}"))
    except KeyboardInterrupt as e:  # a run says which checkpoint it kept (RunStopped)
        _fail(str(e) or "interrupted; run the same command again to resume")
        sys.exit(130)


# Commands that start Ray or MLflow (bench: most of its tables; data: prepare).
LOGGED_COMMANDS = ("train", "run", "pretrain", "sweep", "evaluate", "concepts", "predict", "bench", "pull-best",
                   "data prepare")


def _route_logs(args) -> None:
    """Library logs of commands that start Ray or MLflow go to outputs/logs/ (raysseg.runtime.logs); -v keeps
    them here."""
    if args.verbose:
        os.environ["RAYSSEG_VERBOSE"] = "1"
    if not {args.command, f"{args.command} {getattr(args, 'data_command', '')}"} & set(LOGGED_COMMANDS):
        return
    try:
        from raysseg.runtime import logs
    except ImportError:  # a machine with torch only runs no Ray command
        return
    import time

    logs.setup(f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}")


# What a command without checkpoints keeps when storage fails for good, in place of the storage layer's
# "checkpoints written so far are kept, run the same command again to resume" (train, run, pretrain, sweep).
KEPT_AFTER_A_FAILURE = {
    "evaluate": "evaluate keeps nothing (its report is written at the end): run the same command again",
    "predict": "the label maps written so far are kept: run the same command again to predict the other images",
    "data prepare": "the files prepared so far are kept: run the same command again to prepare the rest",
}


def _what_is_kept(args, message: str) -> str:
    if args.command in ("train", "run", "pretrain", "sweep"):
        return message
    try:
        from raysseg.io.storage import RESUME_HINT
    except ImportError:  # no storage layer, no such message
        return message
    command = f"{args.command} {getattr(args, 'data_command', '')}".strip()
    return message.replace(RESUME_HINT, KEPT_AFTER_A_FAILURE.get(command, "nothing is kept: run the same command "
                                                                          "again"))


def _fail(message: str) -> int:
    try:
        from raysseg.io.tracking import redact
    except ImportError:  # without MLflow's dependencies there are no tracking URIs to redact
        def redact(text):
            return text
    print(redact(message.splitlines()[0]) if message else "error", file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
