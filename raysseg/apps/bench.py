"""Benchmarks that print a table (``raysseg bench data|eval|step|cluster``); all but ``cluster`` run on the
CamVid copy in ../shared.

Each runs the real code path (Ray Data, Ray Train, the S3 server, MLflow) in a
temporary directory and prints a markdown table; ``--out`` also writes it to a file.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from raysseg.core.machine import count_flops, describe as machine

CAMVID = Path(os.environ.get("RAYSSEG_CAMVID", "../shared/data/camvid"))


def _table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", f"Machine: {machine()}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _camvid() -> Path:
    if not (CAMVID / "train" / "images").is_dir():
        raise SystemExit(f"benchmarks read CamVid from {CAMVID}; set RAYSSEG_CAMVID to its folder")
    return CAMVID.resolve()


def bench_data(passes: int = 3) -> str:
    """Images/s over CamVid train at 224x224, side by side in one run: the PIL decode limit in 1 and 2
    processes, and the Ray Data pipeline from a folder and from the local S3 server, decoding the files
    (uncached) and from the prepared-data cache. Each pipeline: a warm-up pass, then the median of
    ``passes`` timed passes."""
    import secrets

    from raysseg.io.images import upload
    from raysseg.io.prepared import prepare
    from raysseg.io.storage import SeaweedServer
    from raysseg.runtime.datasets import make_dataset, run_tasks
    from raysseg.runtime.driver import init_ray

    camvid = _camvid()
    split = str(camvid / "train")
    files = sorted(str(p) for p in (camvid / "train" / "images").iterdir())
    pil = {procs: _pil_rate(files, procs, passes) for procs in (1, 2)}
    rows = [[f"PIL in {procs} process{'es' if procs > 1 else ''} (limit)", "resize + centre crop", len(files),
             f"{len(files) / pil[procs]:.2f}", f"{pil[procs]:.0f}"] for procs in (1, 2)]
    rates: dict[tuple[str, bool, bool], float] = {}
    builds = []
    transforms = {False: "resize + centre crop", True: "random crop + flip"}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", secrets.token_hex(12))
        with SeaweedServer(tmp) as server:
            os.environ["AWS_ENDPOINT_URL"] = server.endpoint  # before Ray starts: its workers inherit it
            init_ray()
            server.create_bucket("bench")
            s3_split = "s3://bench/camvid/train"
            upload(split, s3_split)
            sources = (("folder", split, f"{tmp}/cache", True), ("S3 (local SeaweedFS)", s3_split, "auto", True),
                       ("S3, cache in a local folder", s3_split, f"{tmp}/cache", False))
            for source, uri, cache, uncached_too in sources:
                t0 = time.perf_counter()
                prepared = prepare(uri, 224, cache, run=run_tasks)
                builds.append(f"{source} {time.perf_counter() - t0:.1f} s")
                for cached in (False, True) if uncached_too else (True,):
                    for train in (False, True):
                        ds = make_dataset(uri, image_size=224, train=train, with_labels=False,
                                          prepared=prepared if cached else None)
                        n, rate = _pipeline_rate(ds, passes)
                        rates[source, cached, train] = rate
                        rows.append([source, ("cached: " if cached else "") + transforms[train], n,
                                     f"{n / rate:.2f}", f"{rate:.0f}"])
    folder, s3 = "folder", "S3 (local SeaweedFS)"
    ratios = [
        ("cached / uncached, folder", "cached ≥ 5 x the folder rate before this change (202-214/s)",
         [rates[folder, True, t] / rates[folder, False, t] for t in (False, True)]),
        ("S3 cached / folder cached", "≥ 0.9", [rates[s3, True, t] / rates[folder, True, t] for t in (False, True)]),
        ("uncached folder / PIL in 2 processes", "≥ 0.5", [rates[folder, False, t] / pil[2] for t in (False, True)]),
    ]
    text = _table(f"Input pipeline, CamVid train ({len(files)} images) at 224x224: images/s, median of {passes} passes",
                  ["source", "transform", "images", "seconds", "images/s"], rows)
    lines = ["", "| ratio | resize + centre crop | random crop + flip | target |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.2f} | {b:.2f} | {target} |" for name, target, (a, b) in ratios]
    lines += ["", f"Cache build (once, Ray tasks): {', '.join(builds)}."]
    return text + "\n".join(lines) + "\n"


def _pipeline_rate(ds, passes: int) -> tuple[int, float]:
    """(images per pass, median images/s) of a Ray Dataset read in batches of 32, after one warm-up pass."""
    import statistics

    for _ in ds.iter_batches(batch_size=32):
        pass
    rates, n = [], 0
    for _ in range(passes):
        t0 = time.perf_counter()
        n = sum(len(b["image"]) for b in ds.iter_batches(batch_size=32, batch_format="numpy"))
        rates.append(n / (time.perf_counter() - t0))
    return n, statistics.median(rates)


def _pil_decode(paths: list[str]) -> int:
    """Plain PIL: open, RGB, resize the centred square to 224x224, to numpy; returns how many."""
    import numpy as np
    from PIL import Image

    for path in paths:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        side = min(rgb.size)
        x0, y0 = (rgb.width - side) / 2, (rgb.height - side) / 2
        np.asarray(rgb.resize((224, 224), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side)))
    return len(paths)


def _pil_rate(files: list[str], procs: int, passes: int) -> float:
    """Median images/s of :func:`_pil_decode` over ``files`` split across ``procs`` processes (started first)."""
    import multiprocessing
    import statistics
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_pil_decode, [files[:2]] * procs))  # start and warm the processes
        rates = []
        for _ in range(passes):
            t0 = time.perf_counter()
            n = sum(pool.map(_pil_decode, [files[i::procs] for i in range(procs)]))
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def _run_config(name: str, tmp: str, overrides: list[str]):
    from raysseg.config import load_config

    camvid = _camvid()
    return load_config(name, [f"data.train={camvid / 'train'}", f"data.val={camvid / 'val'}",
                              f"train.storage={tmp}/runs", f"mlflow.tracking_uri=sqlite:///{tmp}/mlruns.db",
                              *overrides])


def bench_eval() -> str:
    """Time to evaluate CamVid val (k-means baseline checkpoint), with and without CRF."""
    from raysseg.runtime.evaluate import evaluate
    from raysseg.runtime.driver import train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        result = train(_run_config("kmeans_camvid", tmp, []))
        for crf in (False, True):
            t0 = time.perf_counter()
            report = evaluate(result.checkpoint, crf=crf, out=f"{tmp}/eval", log_to_mlflow=False)
            dt = time.perf_counter() - t0
            s = report["scores"]
            suffix = "_crf" if crf else ""
            rows.append(["with CRF" if crf else "no CRF", report["n_images"], f"{dt:.1f}",
                         f"{100 * s['clusters' + suffix]['miou']:.1f}", f"{100 * s['probe' + suffix]['miou']:.1f}"])
    return _table("Evaluation of CamVid val (101 images, 176x176, incl. linear probe)",
                  ["variant", "images", "seconds", "clusters mIoU", "probe mIoU"], rows)


def bench_step(method: str) -> str:
    """Iterations/s, peak memory and where the time goes, batch 8 at 224, 1 and 2 workers."""
    from raysseg.methods.registry import spec
    from raysseg.runtime.driver import train

    steps, batch = 6, 8
    parts = spec(method)
    rows = []
    for workers in (1, 2):
        limit = steps * batch * workers
        with tempfile.TemporaryDirectory() as tmp:
            cfg = _run_config(f"{method}_camvid", tmp, [
                "data.image_size=224", f"train.batch_size={batch}", f"train.num_workers={workers}", "train.epochs=1",
                f"data.limit={limit}", f"hp.pool_size={min(256, limit)}", "hp.warmup=0", "hp.renew_every=2",
                "hp.sigma=14.0", "kmeans.pixels_per_image=10", "kmeans.init_sample=5000",
                f"pgg.global_clusters={min(50, limit)}",
            ])
            m = train(cfg).metrics
        step = m["time_step_s"]
        rows.append([workers, f"{m['iterations_per_s']:.3f}", f"{m['iterations_per_s'] * batch * workers:.1f}",
                     f"{m['peak_rss_mb'] / 1024:.2f}"]
                    + [f"{m.get(f'time_{p}_s', 0):.3f} ({100 * m.get(f'time_{p}_s', 0) / step:.0f}%)"
                       for p, _ in parts.step_timers]
                    + [f"{m['time_data_wait_s']:.3f}"] + [f"{m.get(f'time_{p}_s', 0):.1f}" for p, _ in parts.once_timers])
    header = (["workers", "it/s", "images/s", "peak RSS GiB (rank 0)"] + [f"{t} s/it" for _, t in parts.step_timers]
              + ["waiting for data s/it"] + [t for _, t in parts.once_timers])
    return _table(f"{method.upper()} training step, batch {batch}/worker at 224x224, {parts.bench_backbone}, {steps} steps",
                  header, rows)


class _PeakMemory:
    """Samples, in a thread, the RSS of this process and the private (anonymous) RSS summed over its
    descendants (the local Ray's raylet and workers; the object store's shared pages are not counted)."""

    def __init__(self, every_s: float = 0.2):
        import threading

        self.every_s, self.driver, self.workers = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _kib(pid: int | str, field: str) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return 0

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [os.getpid()]
        while todo:
            kids = children.get(todo.pop(), [])
            out += kids
            todo += kids
        return out

    def _sample(self) -> None:
        self.driver = max(self.driver, self._kib("self", "VmRSS") * 1024)
        self.workers = max(self.workers, 1024 * sum(self._kib(p, "RssAnon") for p in self._descendants()))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> _PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _mixture_block(centres, weights, spreads, n: int, seed: tuple[int, int]):
    """n points of a Gaussian mixture projected on the unit sphere (float32, L2-normalised rows)."""
    import numpy as np

    rng = np.random.default_rng(list(seed))
    comp = rng.choice(len(centres), n, p=weights)
    x = rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    x *= spreads[comp, None]
    x += centres[comp]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _feature_throughput(names: list[str], batch: int = 8, size: int = 224, warmup: int = 2,
                        min_batches: int = 5, min_s: float = 8.0) -> tuple[list[list], dict[str, float]]:
    """Images/s and features/s of frozen backbones on synthetic uint8 images (torch, no_grad)
    -> (table rows, {backbone: features/s})."""
    import torch

    from raysseg.core.backbones import build_backbone, normalize

    rows = []
    for name in names:
        torch.manual_seed(0)
        model = build_backbone(name)
        images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
        with torch.no_grad():
            for _ in range(warmup):
                feats = model(normalize(images)).features
            n, t0 = 0, time.perf_counter()
            while n < min_batches or time.perf_counter() - t0 < min_s:
                feats = model(normalize(images)).features
                n += 1
            dt = time.perf_counter() - t0
        _, c, h, w = feats.shape
        ips = n * batch / dt
        rows.append([name, f"{c} x {h}x{w}", n * batch, f"{dt:.1f}", f"{ips:.1f}", f"{ips * h * w:,.0f}"])
    return rows, {r[0]: float(r[5].replace(",", "")) for r in rows}


def bench_cluster(sizes=(1_000_000, 5_000_000), dim: int = 128, k: int = 27, iterations: int = 20,
                  init_sample: int = 100_000, assign_passes: int = 1, block_rows: int = 250_000,
                  sklearn_batch: int = 4096, sklearn_max_iter: int = 20,
                  backbones=("resnet18_fpn", "vit_small_patch16"), seed: int = 0) -> str:
    """Between-epoch re-clustering of N x dim features: ``kmeans_ray`` over blocks in the object
    store against scikit-learn MiniBatchKMeans on the same data in one array; plus the feature
    extraction rate of the backbones, for scale."""
    import gc

    import numpy as np
    from sklearn.cluster import MiniBatchKMeans

    from raysseg.core.kmeans import assign_pass
    from raysseg.runtime.driver import init_ray
    from raysseg.runtime.kmeans import RayExecutor, kmeans_ray

    feature_rows, features_per_s = _feature_throughput(list(backbones)) if backbones else ([], {})

    init_ray()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(k, 2.0))
    spreads = rng.uniform(0.06, 0.12, k).astype(np.float32)  # per-coordinate std: cosine to centre ~0.6-0.8
    ray_tasks = RayExecutor()
    cref, wref, sref = ray_tasks.put(centres), ray_tasks.put(weights), ray_tasks.put(spreads)
    rows = []
    for n in sizes:
        counts = [min(block_rows, n - s) for s in range(0, n, block_rows)]
        with _PeakMemory() as mem:
            t0 = time.perf_counter()
            blocks = [ray_tasks.submit(_mixture_block, cref, wref, sref, m, (seed, i)) for i, m in enumerate(counts)]
            ray_tasks.wait(blocks)
            t_gen = time.perf_counter() - t0
        rows.append([f"{n:,}", "data generation (Ray tasks, object store)", f"{len(blocks)} blocks",
                     f"{t_gen:.1f}", "", "", f"{mem.driver / 2**30:.2f}", f"{mem.workers / 2**30:.2f}"])
        _, _, cos = assign_pass(blocks, centres, ray_tasks)
        rows.append([f"{n:,}", "generating centres (reference, 1 pass)", "", "", "", f"{cos / n:.4f}", "", ""])

        for init in ("k-means++", "random"):
            with _PeakMemory() as mem:
                r = kmeans_ray(blocks, k, init_sample=init_sample, assign_passes=assign_passes,
                               iterations=iterations, seed=seed, init=init)
            rows.append([f"{n:,}", f"kmeans_ray, {init} start, sample {init_sample:,} x {iterations} it, "
                                   f"{assign_passes} update pass(es) + final pass",
                         f"init {r.time_init_s:.1f} + assign {r.time_assign_s:.1f}", "",
                         f"{r.time_init_s + r.time_assign_s:.1f}", f"{r.mean_cosine:.4f}",
                         f"{mem.driver / 2**30:.2f}", f"{mem.workers / 2**30:.2f}"])
            del r
            gc.collect()

        with _PeakMemory() as mem:
            t0 = time.perf_counter()
            x = np.concatenate(ray_tasks.gather(blocks))
            t_fetch = time.perf_counter() - t0
            km = MiniBatchKMeans(n_clusters=k, batch_size=sklearn_batch, n_init=1, max_iter=sklearn_max_iter,
                                 random_state=seed)
            t0 = time.perf_counter()
            km.fit(x)
            t_fit = time.perf_counter() - t0
        del x
        gc.collect()
        skl = km.cluster_centers_.astype(np.float32)
        skl /= np.linalg.norm(skl, axis=1, keepdims=True)
        _, _, cos = assign_pass(blocks, skl, ray_tasks)
        steps = km.n_steps_
        rows.append([f"{n:,}", f"MiniBatchKMeans: batch {sklearn_batch}, n_init 1, max_iter {sklearn_max_iter} "
                               f"({steps} steps = {steps * sklearn_batch / n:.2f} epochs)",
                     f"fetch {t_fetch:.1f} + fit {t_fit:.1f}", "", f"{t_fetch + t_fit:.1f}", f"{cos / n:.4f}",
                     f"{mem.driver / 2**30:.2f}", f"{mem.workers / 2**30:.2f}"])
        del blocks, km
        gc.collect()

    header = ["N", "what", "parts (s)", "data gen s", "clustering s", "mean cosine", "peak RSS driver GiB",
              "peak private RSS Ray workers GiB"]
    text = _table(f"Between-epoch clustering of N x {dim} L2-normalised features into k={k} "
                  f"(Gaussian mixture of {k} components on the sphere, blocks of {block_rows:,} rows)", header, rows)
    notes = ["", "Mean cosine: every point to its nearest (normalised) centroid, computed by the same assignment pass "
             "for every row. MiniBatchKMeans is Euclidean k-means on the normalised rows (its centroids normalised "
             "for scoring); its time includes its own final labelling pass, as ours includes the final pass."]
    for name, fps in features_per_s.items():
        notes.append(f"For scale, extracting {', '.join(f'{n:,}' for n in sizes)} features with {name} at the rate "
                     f"below takes {', '.join(f'{n / fps:,.0f}' for n in sizes)} s.")
    text += "\n".join(notes) + "\n"
    if feature_rows:
        text += "\n" + _table("Feature extraction, frozen backbone, synthetic uint8 images 224x224, batch 8, "
                              "torch no_grad", ["backbone", "features (C x h x w)", "images", "seconds", "images/s",
                                                "features/s"], feature_rows)
    return text


def bench_select(reports: str, n_images: int = 32) -> str:
    """Label-free ``view_nmi`` of each evaluated checkpoint (``raysseg evaluate`` reports matching
    the glob ``reports``) on ``n_images`` of its own training split, against its labelled scores."""
    import glob
    import json

    import numpy as np
    from PIL import Image
    from scipy.stats import spearmanr

    from raysseg.io.images import center_square_box, decode_image, list_split
    from raysseg.io.checkpoints import load_segmenter
    from raysseg.core.selection import view_nmi
    from raysseg.io.storage import read_bytes

    rows, seen = [], set()
    for path in sorted(glob.glob(reports)):
        report = json.loads(Path(path).read_text())
        key = report["checkpoint"] if "://" in report["checkpoint"] else os.path.realpath(report["checkpoint"])
        if key in seen:  # the same checkpoint evaluated twice
            continue
        seen.add(key)
        seg, _ = load_segmenter(report["checkpoint"])
        cfg = seg.cfg
        files = list_split(cfg.data.train, with_labels=False).images
        picked = np.random.default_rng(0).choice(len(files), min(n_images, len(files)), replace=False)
        images = []
        for i in sorted(picked):
            image = decode_image(read_bytes(files[i]))
            box = tuple(round(v) for v in center_square_box(*image.size))
            images.append(np.asarray(image.crop(box).resize((cfg.data.image_size,) * 2, Image.BILINEAR)))
        score = view_nmi(seg, np.stack(images), seed=0)
        clusters = report["scores"]["clusters"]
        rows.append([Path(path).parent.name, cfg.method, cfg.model.backbone, f"{score:.3f}",
                     f"{100 * clusters['miou']:.1f}", f"{100 * clusters['accuracy']:.1f}"])
        print(rows[-1], flush=True)
    if len(rows) < 3:
        raise SystemExit(f"bench select: {len(rows)} distinct checkpoints in {reports!r}; need at least 3")
    rows.sort(key=lambda r: -float(r[3]))
    nmi, miou, acc = (np.array([float(r[i]) for r in rows]) for i in (3, 4, 5))
    title = (f"Label-free selection: view_nmi on {n_images} training images vs labelled val scores "
             f"(Spearman {spearmanr(nmi, miou).statistic:.2f} with mIoU, {spearmanr(nmi, acc).statistic:.2f} "
             f"with accuracy, {len(rows)} checkpoints)")
    return _table(title, ["evaluation", "method", "backbone", "view_nmi", "val clusters mIoU", "val clusters acc"],
                  rows)


def bench_predict(limit: int = 0, configs: tuple[str, ...] = ("hp_camvid", "picie_camvid"), gpu_tflops: float = 989.4,
                  utilisation: float = 0.4) -> str:
    """``raysseg predict`` on the CamVid training images (labels and overlays, as the old loop writes): for each
    config, the single-process loop against the Ray Data job with 1 and 2 workers, side by side in one run
    (``limit``: the first N images only). The job's rate is given whole (each job starts its own local Ray and
    loads its replicas, as ``raysseg predict`` does) and marginal: the extra images over the extra seconds
    against a run on the first half of the images (the same start-up), the rate a large collection runs at.
    Then what a GPU node would need: the FLOPs of one forward pass per image and the decode rate of one core."""
    import numpy as np
    import torch

    from raysseg.apps.predict import predict
    from raysseg.config import load_config
    from raysseg.io.checkpoints import save_checkpoint
    from raysseg.io.images import decode_image
    from raysseg.methods.registry import build_segmenter
    from raysseg.runtime.predict import model_input, predict_job

    files = sorted((_camvid() / "train" / "images").iterdir())[:limit or None]
    t0 = time.perf_counter()
    decoded = [np.asarray(decode_image(p.read_bytes())) for p in files]
    decode_rate = len(files) / (time.perf_counter() - t0)
    rows, flops = [], []
    for config in configs:
        cfg = load_config(config, [])
        seg = build_segmenter(cfg, load_backbone_weights=False).eval()  # random weights: the cost of trained ones
        seg.centroids.copy_(torch.nn.functional.normalize(torch.randn_like(seg.centroids), dim=1))
        sample = model_input(decoded[0], cfg.data.image_size, seg.input_multiple)
        gflop = count_flops(lambda: seg.codes(torch.from_numpy(sample.copy())[None])) / 1e9
        model = f"{config} ({cfg.model.backbone} at {'x'.join(str(s) for s in sample.shape[:2])})"
        flops.append(f"{model}: {gflop:.1f} GFLOP")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, images = f"{tmp}/model.pt", Path(tmp) / "images"
            save_checkpoint(ckpt, seg)
            images.mkdir()
            half = images.parent / "first_half"
            half.mkdir()
            for i, p in enumerate(files):
                (images / p.name).symlink_to(p)
                if i < len(files) // 2:
                    (half / p.name).symlink_to(p)
            t0 = time.perf_counter()
            predict(ckpt, str(images), f"{tmp}/loop")
            old = len(files) / (time.perf_counter() - t0)
            rows.append([model, "single-process loop (before)", len(files), f"{len(files) / old:.1f}", "-",
                         f"{old:.2f}", "1.0x", "-", "-"])
            for workers in (1, 2):
                # each job starts (and stops) its own local Ray and loads its replicas, as `raysseg predict` does
                t0 = time.perf_counter()
                done = predict_job(ckpt, str(images), f"{tmp}/job{workers}", workers=workers, overlays=True)
                wall = time.perf_counter() - t0
                t0 = time.perf_counter()
                half_done = predict_job(ckpt, str(half), f"{tmp}/half{workers}", workers=workers, overlays=True)
                half_wall = time.perf_counter() - t0
                rate = done.predicted / wall
                # too few images (or too much noise) for the difference to mean anything: no marginal rate
                marginal = (done.predicted - half_done.predicted) / (wall - half_wall) if wall > half_wall + 1 else None
                rows.append([model, f"Ray Data job, {workers} worker{'s' if workers > 1 else ''}", done.predicted,
                             f"{wall:.1f}", f"{half_wall:.1f}", f"{rate:.2f}", f"{rate / old:.1f}x",
                             f"{marginal:.2f}" if marginal else "-", f"{marginal / old:.1f}x" if marginal else "-"])
    h, w = decoded[0].shape[:2]
    table = _table(f"raysseg predict: {len(files)} CamVid training images, labels + overlays at {w}x{h}",
                   ["model", "run", "images", "seconds", "seconds for half", "images/s", "vs loop",
                    "marginal images/s", "marginal vs loop"], rows)
    gpu_rate = utilisation * gpu_tflops * 1e3 / gflop
    return table + (f"\nOne forward pass per image (torch.utils.flop_counter): {'; '.join(flops)}. Decode: "
                    f"{decode_rate:.0f} images/s per core (PIL, {w}x{h}). A GPU at {100 * utilisation:.0f}% of "
                    f"{gpu_tflops:.0f} TFLOP/s runs ~{gpu_rate:,.0f} images/s of the last model: about "
                    f"{gpu_rate / decode_rate:.0f} decoding cores per GPU.\n")


def main(args) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.what == "cluster":
        text = bench_cluster(sizes=[int(n) for n in args.sizes.split(",")], dim=args.dim, k=args.k,
                             iterations=args.iterations, init_sample=args.init_sample,
                             assign_passes=args.assign_passes, sklearn_max_iter=args.sklearn_max_iter,
                             backbones=[b for b in args.backbones.split(",") if b])
    else:
        table = {"data": bench_data, "eval": bench_eval, "select": lambda: bench_select(args.reports),
                 "predict": lambda: bench_predict(args.limit)}.get(args.what)
        text = table() if table else bench_step(args.method)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
