"""Evaluation shared by every method (``raysseg evaluate``).

1. One pass over the labelled *training* split (Ray Data actor pool) serves both:
   - the linear probe: codes at sampled labelled pixels, then a 1x1 linear layer fitted on
     the driver;
   - the retrieval index (SegSort / visual concepts): each image is cut into k-means segments
     (pixel sorting of its codes), each segment's prototype (normalised mean code) is kept with
     the majority label of its pixels.
2. Scoring: the evaluation split streams through a pool of scoring actors; each batch
   returns confusion matrices for clusters, probe and retrieval (each with and without CRF).
   Retrieval: the segments of each image vote with the labels of their k nearest training
   prototypes; the class fractions become a per-location probability map.
3. The driver sums them into one matrix per variant over the whole split, matches
   clusters to classes (Hungarian; probe and retrieval are scored directly), and writes a
   JSON report, a table, pictures and MLflow metrics into the training run.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F

from raysseg.core.segments import image_segments

VARIANTS = ("clusters", "clusters_crf", "probe", "probe_crf", "retrieval", "retrieval_crf")


def _segmenter(ref):
    from raysseg.io.checkpoints import segmenter_from

    seg = segmenter_from(ray.get(ref[0]))
    torch.set_num_threads(1)
    return seg, seg.cfg


def codes_at(codes: torch.Tensor, ys: np.ndarray, xs: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Codes (D, h, w) bilinearly upsampled to ``size`` and read at pixels (ys, xs) -> (n, D).

    Equal to ``F.interpolate(codes, size, mode="bilinear")[:, ys, xs]`` without building the
    full-resolution map.
    """
    h, w = size
    grid = torch.stack([torch.from_numpy((xs + 0.5) / w * 2 - 1), torch.from_numpy((ys + 0.5) / h * 2 - 1)], -1)
    sampled = F.grid_sample(codes[None], grid[None, None].to(codes.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)
    return sampled[0, :, 0].T


def _rows(code_dim: int, parts: list[tuple[np.ndarray, np.ndarray, bool, np.ndarray]],
          skipped: list[tuple[str, str]] | None = None) -> dict:
    """TrainSampler output: one row per probe pixel or prototype (vectors of one width, so that
    Ray Data can re-batch them). parts: (vectors (n, D), labels (n,), is_prototype, image_start (n,)).
    ``skipped`` (the batch's invalid files) adds one marker row: label -1, its JSON in ``skipped``
    (empty on every other row)."""
    parts = list(parts)
    if skipped:
        parts.append((np.zeros((1, code_dim), np.float32), np.full(1, -1), False, np.zeros(1, bool)))
    if not parts:
        return {"vector": np.zeros((0, code_dim), np.float32), "label": np.zeros(0, np.int64),
                "prototype": np.zeros(0, bool), "image_start": np.zeros(0, bool), "skipped": np.zeros(0, str)}
    n = sum(len(p[1]) for p in parts)
    marks = [""] * n
    if skipped:
        marks[-1] = json.dumps(skipped)
    return {"vector": np.concatenate([p[0] for p in parts]).astype(np.float32),
            "label": np.concatenate([p[1] for p in parts]).astype(np.int64),
            "prototype": np.concatenate([np.full(len(p[1]), p[2]) for p in parts]),
            "image_start": np.concatenate([p[3] for p in parts]),
            "skipped": np.array(marks, dtype=str)}


def check_scored(split: str, n_files: int, n_images: int, skipped: list[tuple[str, str]]) -> None:
    """Raise a one-line DatasetError when no image of ``split`` could be scored (every row skipped):
    scores over nothing would be meaningless."""
    from raysseg.io.images import DatasetError

    if n_images > 0:
        return
    first = f"; first: {skipped[0][1]}" if skipped else ""
    raise DatasetError(
        f"{split}: none of its {n_files} images could be scored ({len(skipped)} skipped{first}): "
        "fix or replace the files (see the reasons), then evaluate again"
    )


class TrainSampler:
    """Actor over the training split, serving the linear probe and the retrieval index.

    Probe (``per_image`` > 0): codes (upsampled to pixels) and labels at random labelled pixels of
    each image. Retrieval: the prototype and majority label of each k-means segment with at least
    one labelled pixel; ``image_start`` marks the first prototype of each image."""

    def __init__(self, ckpt_ref, per_image: int, retrieval: bool, seed: int):
        self.seg, self.cfg = _segmenter(ckpt_ref)
        self.per_image, self.retrieval = per_image, retrieval
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict) -> dict:
        from raysseg.core.batches import valid_rows
        from raysseg.core.metrics import segment_majority_labels

        cfg = self.cfg
        batch, bad = valid_rows(batch)
        if len(batch["image"]) == 0:
            return _rows(self.seg.code_dim, [], bad)
        images = torch.from_numpy(batch["image"])
        codes = self.seg.codes(images)
        parts = []
        if self.per_image > 0:
            for b, label in enumerate(batch["label"]):
                ys, xs = np.nonzero((label != cfg.data.ignore_index) & (label < cfg.data.n_classes))
                if len(ys) == 0:
                    continue
                pick = self.rng.choice(len(ys), min(self.per_image, len(ys)), replace=False)
                parts.append((codes_at(codes[b], ys[pick], xs[pick], label.shape).numpy(), label[ys[pick], xs[pick]],
                              False, np.zeros(len(pick), bool)))
        if self.retrieval:
            ids, image, protos = image_segments(codes, cfg.segments.grid, cfg.segments.iterations)
            majority = segment_majority_labels(ids.numpy(), np.asarray(batch["label"]), len(protos),
                                               cfg.data.n_classes, cfg.data.ignore_index)
            keep = majority >= 0
            start = np.zeros(int(keep.sum()), bool)
            start[np.unique(image.numpy()[keep], return_index=True)[1]] = True  # first prototype of each image
            parts.append((protos.numpy()[keep], majority[keep], True, start))
        return _rows(self.seg.code_dim, parts, bad)


class Scorer:
    """Actor: per-batch confusion matrices of every variant, plus pictures of chosen images."""

    def __init__(self, ckpt_ref, probe_state: dict | None, crf: bool, picture_paths: list[str],
                 index_ref: list | None = None):
        """index_ref: None (no retrieval) or ``[ObjectRef]`` of ``{"keys": (P, D) float32 unit,
        "labels": (P,) int64}``, nested in a list so that Ray hands the actor the reference."""
        import warnings

        from raysseg.core.metrics import LinearProbe

        self.seg, self.cfg = _segmenter(ckpt_ref)
        self.probe = None
        if probe_state is not None:
            self.probe = LinearProbe(self.seg.code_dim, self.cfg.data.n_classes)
            self.probe.load_state_dict(probe_state)
            self.probe.eval()
        self.crf, self.picture_paths = crf, set(picture_paths)
        self.index = None
        if index_ref is not None:
            index = ray.get(index_ref[0])
            with warnings.catch_warnings():  # zero-copy views of the object store are read-only; never written
                warnings.simplefilter("ignore", UserWarning)
                self.index = (torch.from_numpy(index["keys"]), torch.from_numpy(index["labels"]))

    def __call__(self, batch: dict) -> dict:
        from raysseg.core.crf import dense_crf
        from raysseg.core.batches import valid_rows
        from raysseg.core.metrics import cluster_probs, confusion_matrix, knn_vote

        cfg = self.cfg
        k, n = cfg.n_clusters, cfg.data.n_classes
        batch, bad = valid_rows(batch)
        confs = {v: np.zeros((k if v.startswith("clusters") else n, n), np.int64) for v in VARIANTS}
        pictures = []
        if len(batch["image"]):
            images = torch.from_numpy(batch["image"])
            size = images.shape[1:3]
            with torch.no_grad():  # probabilities at feature resolution, then upsampled: K channels, not D
                codes = self.seg.codes(images)
                low = {"clusters": cluster_probs(codes, self.seg.centroids)}
                if self.probe is not None:
                    low["probe"] = torch.softmax(self.probe.predict_logits(codes), 1)
                if self.index is not None:  # class fractions of each segment's k nearest training prototypes
                    ids, _, protos = image_segments(codes, cfg.segments.grid, cfg.segments.iterations)
                    votes = knn_vote(protos, *self.index, k=cfg.eval.retrieval_k, n_classes=n)  # (S, n)
                    low["retrieval"] = votes[ids].permute(0, 3, 1, 2)  # (B, n, h, w)
                probs = {name: F.interpolate(p, size=size, mode="bilinear", align_corners=False).numpy()
                         for name, p in low.items()}
            for b in range(len(images)):
                label = batch["label"][b]
                maps = {}
                for name, p in probs.items():
                    maps[name] = p[b].argmax(0)
                    if self.crf:
                        maps[name + "_crf"] = dense_crf(batch["image"][b], p[b]).argmax(0)
                for name, pred in maps.items():
                    confs[name] += confusion_matrix(pred, label, confs[name].shape[0], n, cfg.data.ignore_index)
                if str(batch["path"][b]) in self.picture_paths:
                    pictures.append((str(batch["path"][b]), batch["image"][b], label, maps))
        return {
            **{f"conf_{v}": c[None] for v, c in confs.items()},
            "n_images": np.array([len(batch["image"])]),
            "skipped": np.array([json.dumps(bad)]),
            "pictures": np.array([pictures], dtype=object),
        }


def _table(report: dict) -> str:
    names = report["class_names"]
    rows = [v for v in VARIANTS if v in report["scores"]]
    head = f"{'':14s}" + "".join(f"{r:>14s}" for r in rows)
    lines = [head, "-" * len(head)]
    for metric in ("accuracy", "miou"):
        lines.append(f"{metric:14s}" + "".join(f"{100 * report['scores'][r][metric]:14.1f}" for r in rows))
    lines.append("per-class IoU")
    for c, name in enumerate(names):
        vals = [report["scores"][r]["per_class_iou"][c] for r in rows]
        lines.append(f"  {name[:12]:12s}" + "".join(f"{'-' if v is None else f'{100 * v:.1f}':>14s}" for v in vals))
    return "\n".join(lines)


def report_metrics(report: dict) -> dict[str, float]:
    """The report's scores as MLflow metrics: ``eval/<split folder>/<variant>_<accuracy|miou>``."""
    tag = Path(report["split"].rstrip("/")).name
    metrics = {f"eval/{tag}/{v}_{m}": s[m] for v, s in report["scores"].items() for m in ("accuracy", "miou")}
    metrics[f"eval/{tag}/skipped_files"] = report["skipped_files"]
    return metrics


def evaluate(checkpoint: str, split: str | None = None, crf: bool | None = None, probe: bool | None = None,
             out: str | None = None, log_to_mlflow: bool = True, retrieval: bool | None = None,
             probe_train: str | None = None, data_settings: tuple[str, ...] = ()) -> dict:
    """Score a checkpoint on ``split`` (default: the config's ``data.val``). Returns the report.
    ``data_settings``: ``data.KEY=VALUE`` over the checkpoint's (``evaluate --set``, e.g. ``data.n_classes=12``).

    ``crf``, ``probe`` and ``retrieval`` (k-means segments + kNN vote of training prototypes):
    None = the checkpoint config's ``eval.*``. Probe and retrieval read the labels of
    ``probe_train`` (default: the training split the checkpoint recorded, ``data.train``, which may
    exist only where it was trained); when retrieval is on only by default (``retrieval=None``,
    no probe) and that split lacks labels, retrieval is left out with a warning."""
    from raysseg.io import tracking
    from raysseg.config import config_from_dict
    from raysseg.runtime.datasets import make_dataset
    from raysseg.io.decode_large import decode_bounded
    from raysseg.io.images import DatasetError
    from raysseg.core.metrics import (EvalInputError, direct_scores, fit_linear_probe, hungarian_scores,
                                 matched_confusion)
    from raysseg.engine.inputs import evaluation_inputs
    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.runtime.driver import init_ray
    from raysseg.core.pictures import confusion_figure, matched_legend, overlay_grid

    ckpt = read_checkpoint(checkpoint)
    if data_settings:  # the scoring actors read the config from the checkpoint too
        from raysseg.config import with_data_settings

        ckpt = {**ckpt, "config": with_data_settings(ckpt["config"], data_settings)}
    cfg = config_from_dict(ckpt["config"])
    split = split or cfg.data.val
    crf = cfg.eval.crf if crf is None else crf
    probe = cfg.eval.probe if probe is None else probe
    asked_retrieval = retrieval  # True: the caller asked for it, so a training split without labels is an error
    retrieval = cfg.eval.retrieval if retrieval is None else retrieval
    # pairing, sampled label values and the training split's labels: one clear line before Ray starts
    train_split = probe_train or cfg.data.train
    listed = evaluation_inputs(cfg, split, probe, retrieval, retrieval_asked=asked_retrieval is not None,
                               probe_train=train_split)  # each split listed once, passed on to its reader
    retrieval = listed.retrieval
    if cfg.eval.image_size:  # the papers' evaluation input (STEGO, HP, PiCIE: 320), not the training crops'
        cfg.data.image_size = cfg.eval.image_size
    print(f"[evaluate] protocol: {cfg.eval.protocol(cfg, crf, probe, retrieval)}", flush=True)
    init_ray(cfg.eval.workers)
    t0 = time.time()
    ref = [ray.put(ckpt)]
    workers = cfg.eval.workers

    probe_state, index_ref, index_info, train_skipped = None, None, None, []
    decoder = functools.partial(decode_bounded, max_pixels=cfg.data.max_pixels)  # larger images: skipped, named
    if probe or retrieval:  # one pass over the training split serves both
        uses = " and ".join(u for u, on in (("linear probe", probe), ("retrieval index", retrieval)) if on)
        print(f"[evaluate] {uses}: reading the labelled training split {train_split}", flush=True)
        train_ds = make_dataset(train_split, image_size=cfg.data.image_size, train=False, with_labels=True,
                                limit=cfg.data.limit or None, n_classes=cfg.data.n_classes,
                                ignore_index=cfg.data.ignore_index, listing=listed.train, image_decoder=decoder)
        per_image = cfg.eval.probe_pixels_per_image if probe else 0
        sampled = train_ds.map_batches(TrainSampler, fn_constructor_kwargs={"ckpt_ref": ref, "per_image": per_image,
                                       "retrieval": retrieval, "seed": cfg.train.seed},
                                       batch_size=cfg.eval.batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                                       batch_format="numpy")
        parts = {True: ([], []), False: ([], [])}  # prototype? -> (vectors, labels)
        n_train_images, train_skipped = 0, []
        for b in sampled.iter_batches(batch_size=None, batch_format="numpy"):
            if len(b["label"]) == 0:
                continue
            marks = np.array([bool(m) for m in b["skipped"]], bool)
            for m in b["skipped"][marks]:
                train_skipped += [tuple(x) for x in json.loads(str(m))]
            for is_proto in (True, False):
                rows = (b["prototype"] == is_proto) & ~marks
                parts[is_proto][0].append(b["vector"][rows])
                parts[is_proto][1].append(b["label"][rows])
            n_train_images += int(b["image_start"].sum())

        def stacked(is_proto: bool) -> tuple[np.ndarray, np.ndarray]:
            vecs, labels = parts[is_proto]
            if not vecs:
                return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
            return np.concatenate(vecs).astype(np.float32), np.concatenate(labels).astype(np.int64)

        if train_skipped:
            print(f"warning: skipped {len(train_skipped)} unreadable files of the training split:", flush=True)
            for path, error in train_skipped:
                print(f"  {path}: {error}", flush=True)
        if probe:
            x, y = stacked(False)
            if len(y) == 0:
                first = f"; first: {train_skipped[0][1]}" if train_skipped else ""
                raise DatasetError(
                    f"{train_split}: no labelled training pixel for the linear probe ({len(train_skipped)} files "
                    f"skipped{first}): fix the training split's labels or evaluate without them: --no-probe --no-retrieval"
                )
            print(f"[evaluate] fitting the probe on {len(y)} pixels", flush=True)
            model = fit_linear_probe(torch.from_numpy(x), torch.from_numpy(y).long(), cfg.data.n_classes,
                                     cfg.data.ignore_index, epochs=cfg.eval.probe_epochs, seed=cfg.train.seed)
            probe_state = model.state_dict()
        if retrieval:
            keys, key_labels = stacked(True)
            print(f"[evaluate] retrieval index: {len(key_labels):,} labelled prototypes from {n_train_images:,} "
                  f"images (k = {cfg.eval.retrieval_k})", flush=True)
            if len(key_labels) == 0:
                print("warning: no labelled training prototype; retrieval is left out", flush=True)
                retrieval = False
            else:
                index_ref = [ray.put({"keys": keys, "labels": key_labels})]
                index_info = {"prototypes": len(key_labels), "images": n_train_images, "k": cfg.eval.retrieval_k}
            del keys, key_labels  # the object store holds the index now
        del parts

    files = listed.split.images
    picture_paths = list(files[: cfg.eval.overlays])
    ds = make_dataset(split, image_size=cfg.data.image_size, train=False, with_labels=True,
                      n_classes=cfg.data.n_classes, ignore_index=cfg.data.ignore_index, listing=listed.split,
                      image_decoder=decoder)
    scored = ds.map_batches(Scorer, fn_constructor_kwargs={"ckpt_ref": ref, "probe_state": probe_state, "crf": crf,
                                                          "picture_paths": picture_paths, "index_ref": index_ref},
                            batch_size=cfg.eval.batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                                       batch_format="numpy")
    totals: dict[str, np.ndarray] = {}
    n_images, skipped, pictures = 0, [], []
    done = 0
    for b in scored.iter_batches(batch_size=1, batch_format="numpy"):
        for v in VARIANTS:
            totals[v] = totals.get(v, 0) + b[f"conf_{v}"][0]
        n_images += int(b["n_images"][0])
        skipped += json.loads(str(b["skipped"][0]))
        pictures += list(b["pictures"][0])
        done += 1
        print(f"[evaluate] scored {n_images} images of {len(files)}", flush=True)

    if skipped:
        print(f"skipped {len(skipped)} unreadable files:")
        for path, error in skipped:
            print(f"  {path}: {error}")
    check_scored(split, len(files), n_images, skipped)
    scores = {}
    for v in VARIANTS:
        if (v.startswith("probe") and not probe or v.startswith("retrieval") and not retrieval
                or v.endswith("_crf") and not crf):
            continue
        try:
            s = hungarian_scores(totals[v]) if v.startswith("clusters") else direct_scores(totals[v])
        except EvalInputError as e:  # e.g. every label pixel is ignore_index
            raise DatasetError(f"{split}: {e}") from None
        scores[v] = s.to_dict()
    names = cfg.data.class_names or [f"class {i}" for i in range(cfg.data.n_classes)]
    report = {
        "checkpoint": checkpoint, "split": split, "method": cfg.method, "n_images": n_images,
        "skipped_files": len(skipped), "skipped": skipped, "class_names": names, "scores": scores,
        "confusion": {v: totals[v].tolist() for v in scores},  # rows: predicted id, columns: class
        "probe_train": train_split if probe or retrieval else None,  # the labelled split they trained on
        "retrieval_index": index_info,  # {"prototypes", "images", "k"}, or None without retrieval
        "train_skipped": train_skipped,  # unreadable files of the training split (probe / retrieval)
        "seconds": round(time.time() - t0, 1),
    }
    print(_table(report))
    if skipped:
        print(f"skipped {len(skipped)} unreadable files (listed above)")
    out_dir = Path(out or "outputs/eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    mapping = scores["clusters"]["mapping"]
    confusion_png = confusion_figure(matched_confusion(totals["clusters"], mapping), names, "clusters (matched)")
    (out_dir / "confusion_clusters.png").write_bytes(confusion_png)
    grid = None
    if pictures:
        pictures.sort(key=lambda p: p[0])
        from raysseg.core.metrics import apply_mapping

        preds = [apply_mapping(p[3]["clusters"], mapping, cfg.data.ignore_index) for p in pictures]
        grid = overlay_grid([p[1] for p in pictures], preds, [p[2] for p in pictures], cfg.data.ignore_index,
                            titles=["image", "clusters, matched to classes", "ground truth"],
                            legend=matched_legend(names, mapping))
        from raysseg.core.pictures import save_png

        save_png(grid, out_dir / "overlays_clusters.png")
    print(f"report: {out_dir / 'report.json'}")

    run_id = ckpt.get("run_id")
    if log_to_mlflow and run_id:
        uri = ckpt.get("tracking_uri") or tracking.tracking_uri(cfg.mlflow.tracking_uri)
        try:
            logger = tracking.RunLogger(uri, run_id)
            tag = Path(split.rstrip("/")).name
            logger.log_metrics(report_metrics(report), step=int(ckpt.get("progress", {}).get("step", 0)))
            logger.log_bytes(json.dumps(report, indent=2).encode(), f"eval/{tag}/report.json")
            logger.log_bytes(confusion_png, f"eval/{tag}/confusion_clusters.png")
            if grid is not None:
                logger.log_image(grid, f"eval/{tag}/overlays_clusters.png")
            logger.close(seconds=10)  # sent, or an error line below
            print(f"logged to MLflow run {run_id} at {uri}")
        except Exception as e:  # noqa: BLE001 - the report is written; a tracking problem must not lose it
            print(f"warning: could not log to MLflow run {run_id} at {uri}: {e}")
    return report
