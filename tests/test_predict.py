"""``raysseg predict``: the Ray Data job from s3:// to s3:// (sub-folders, a corrupt file, a text file, an image
over the pixel bound), its resumption after a kill (the killed run's temporary file removed), its label maps against
the single-image code, and (slow) a 100,000-object listing with bounded memory."""
import io
import json
import lzma
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"


def checkpoint(tmp_path: Path, method: str = "picie") -> str:
    """A fixture checkpoint (picie: ResNet-18 FPN, whose best cluster wins by a clear margin nearly everywhere)."""
    path = tmp_path / f"{method}.pt"
    path.write_bytes(lzma.decompress((FIXTURES / f"{method}.pt.xz").read_bytes()))
    return str(path)


def collection(root: Path, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` images of varied sizes in root/, root/street/ and root/street/night/ (PNG and JPEG); returns
    {relative path: the decoded image}."""
    from raysseg.io.images import decode_image

    rng = np.random.default_rng(seed)
    images = {}
    for i in range(n):
        folder = ["", "street/", "street/night/"][i % 3]
        rel = f"{folder}img{i:03d}.{'jpg' if i % 4 == 1 else 'png'}"
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 120))
        pixels = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        picture = Image.fromarray(pixels).resize((w, h), Image.BILINEAR)
        (root / folder).mkdir(parents=True, exist_ok=True)
        picture.save(root / rel)
        images[rel] = np.asarray(decode_image((root / rel).read_bytes()))
    return images


def the_single_image_code(seg, image: np.ndarray) -> np.ndarray:
    """The label map as the single-process loop computed it before the job existed (apps/predict.py)."""
    h, w = image.shape[:2]
    short_side, stride = seg.cfg.data.image_size, seg.input_multiple
    scale = short_side / min(h, w)
    size = (max(stride, round(h * scale / stride) * stride), max(stride, round(w * scale / stride) * stride))
    resized = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
    return seg.cluster_map(torch.from_numpy(resized.copy())[None], size=(h, w))[0].numpy().astype(np.uint8)


def assert_same_map(labels: np.ndarray, seg, image: np.ndarray, what: str = "") -> None:
    """``labels`` equals the single-image code's map for ``image`` wherever its best cluster wins by more than
    1e-5 in cosine similarity: a batched forward pass rounds differently from a single one (another conv
    algorithm; logits differ by < 1e-6), so a near-tie may go either way. At most 1% of the pixels are near-ties."""
    import torch.nn.functional as F

    expected = the_single_image_code(seg, image)
    assert labels.shape == expected.shape, what
    h, w = image.shape[:2]
    short_side, stride = seg.cfg.data.image_size, seg.input_multiple
    scale = short_side / min(h, w)
    size = (max(stride, round(h * scale / stride) * stride), max(stride, round(w * scale / stride) * stride))
    resized = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR)).copy()
    logits = F.interpolate(seg.cluster_logits(seg.codes(torch.from_numpy(resized)[None])), size=(h, w),
                           mode="bilinear", align_corners=False)[0]
    top2 = logits.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-5).numpy()
    assert clear.mean() > 0.99, what
    np.testing.assert_array_equal(labels[clear], expected[clear], err_msg=what)


def test_label_map_and_batched_label_maps_equal_the_single_image_code(tmp_path):
    from raysseg.io.checkpoints import load_segmenter
    from raysseg.runtime.predict import label_map, label_maps, model_input

    seg, _ = load_segmenter(checkpoint(tmp_path))
    images = list(collection(tmp_path / "src", 6).values())
    for image in images:
        np.testing.assert_array_equal(label_map(seg, image), the_single_image_code(seg, image))
    # two images of different full sizes but the same model input size, in one batch
    a, b = images[0], np.asarray(Image.fromarray(images[0]).resize((images[0].shape[1] + 3, images[0].shape[0] + 2)))
    inputs = [model_input(x, seg.cfg.data.image_size, seg.input_multiple) for x in (a, b)]
    assert inputs[0].shape == inputs[1].shape
    maps = label_maps(seg, np.stack(inputs), [a.shape[:2], b.shape[:2]])
    for image, labels in zip((a, b), maps):
        assert_same_map(labels, seg, image)


def test_s3_to_s3_with_sub_folders_and_a_corrupt_file(s3_server, ray_local, tmp_path, capsys):
    import hashlib
    import tempfile

    import pyarrow.parquet as pq

    from raysseg.io.checkpoints import load_segmenter
    from raysseg.io.storage import StorageError, copy_tree, read_bytes
    from raysseg.runtime.predict import predict_job

    s3_server.create_bucket("predict")
    images = collection(tmp_path / "src", 9)  # at most 90 x 120 pixels each
    (tmp_path / "src" / "street" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "src" / "street" / "notes.txt").write_text("not an image: not listed")
    Image.new("RGB", (200, 150)).save(tmp_path / "src" / "wide.png")  # 30,000 pixels: over the bound below
    copy_tree(str(tmp_path / "src"), "s3://predict/photos")
    ckpt = checkpoint(tmp_path)
    # what a killed run into this DST left in the local temporary folder, and a file of another DST there
    digest = hashlib.sha256(b"s3://predict/out/predictions.parquet").hexdigest()[:12]
    stale = Path(tempfile.gettempdir()) / f".predictions.{digest}.k1ll3d.parquet.tmp"
    other = Path(tempfile.gettempdir()) / ".predictions.0123456789ab.other.parquet.tmp"
    stale.touch()
    other.touch()

    summary = predict_job(ckpt, "s3://predict/photos", "s3://predict/out", workers=2, batch_size=3, overlays=True,
                          max_pixels=20_000)

    assert not stale.exists() and other.exists()
    other.unlink()
    assert (summary.listed, summary.predicted, summary.reused) == (11, 9, 0)
    skipped = dict(summary.skipped)
    assert sorted(skipped) == ["street/broken.png", "wide.png"]
    assert "200x150 = 30,000 pixels, more than data.max_pixels (20,000)" in skipped["wide.png"]
    printed = capsys.readouterr().out  # the text file is named as train and evaluate name it
    assert ("warning: s3://predict/photos: 1 file(s) left out (.txt is not an image format raysseg reads): "
            "street/notes.txt: convert them to PNG, JPEG, WebP, TIFF or BMP") in printed
    assert "skipped wide.png: 200x150 = 30,000 pixels" in printed
    seg, _ = load_segmenter(ckpt)
    for rel, image in images.items():
        name = rel.rsplit(".", 1)[0] + ".png"
        labels = np.asarray(Image.open(io.BytesIO(read_bytes(f"s3://predict/out/labels/{name}"))))
        assert_same_map(labels, seg, image, rel)
        picture = Image.open(io.BytesIO(read_bytes(f"s3://predict/out/overlays/{name}")))
        assert picture.size == (image.shape[1], image.shape[0]) and picture.mode == "RGB"
    table = pq.read_table(io.BytesIO(read_bytes("s3://predict/out/predictions.parquet"))).to_pandas()
    assert sorted(table["path"]) == sorted(images)
    clusters = [f"cluster_{k}" for k in range(seg.cfg.n_clusters)]
    assert table.columns.tolist() == ["path", "height", "width", *clusters]
    for row in table.itertuples():
        name = row.path.rsplit(".", 1)[0] + ".png"
        labels = np.asarray(Image.open(io.BytesIO(read_bytes(f"s3://predict/out/labels/{name}"))))
        assert (row.height, row.width) == images[row.path].shape[:2]
        counts = np.bincount(labels.ravel(), minlength=seg.cfg.n_clusters)
        assert [getattr(row, c) for c in clusters] == counts.tolist()
    manifest = json.loads(read_bytes("s3://predict/out/manifest.json"))
    assert manifest["checkpoint"] == ckpt and manifest["status"] == "finished" and manifest["overlays"]
    assert len(manifest["config_hash"]) == 12 and manifest["started"] <= manifest["finished"]
    assert manifest["counts"] == {"listed": 11, "predicted": 9, "already_done": 0, "skipped": 2, "left_out": 1}
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert "corrupt" in reasons["street/broken.png"] and "data.max_pixels" in reasons["wide.png"]
    assert manifest["left_out"] == [{"path": "street/notes.txt", "reason": ".txt is not an image format raysseg reads"}]

    # another checkpoint into the same DST: refused with one line, before Ray work
    with pytest.raises(StorageError, match="another checkpoint") as refused:
        predict_job(checkpoint(tmp_path, "kmeans"), "s3://predict/photos", "s3://predict/out")
    assert "\n" not in str(refused.value)


def test_a_killed_job_resumes_and_runs_the_model_only_on_the_unfinished_images(ray_local, tmp_path):
    import pyarrow.parquet as pq

    from raysseg.runtime.predict import predict_job

    n = 90
    images = collection(tmp_path / "src", n, seed=1)
    ckpt, out = checkpoint(tmp_path), tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    job = subprocess.Popen([sys.executable, "-m", "raysseg.apps.cli", "predict", "--checkpoint", ckpt, "--images",
                            str(tmp_path / "src"), "--out", str(out), "--workers", "1", "--batch-size", "2"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None and len(list(out.glob("labels/**/*.png"))) < 3:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    seen, stable_since = -1, time.time()  # Ray stops the dead driver's actor in a moment: until then it may write
    while time.time() - stable_since < 5:
        count = len(list(out.glob("labels/**/*.png")))
        seen, stable_since = count, stable_since if count == seen else time.time()
        time.sleep(0.2)
    finished = {p.relative_to(out / "labels"): p.stat().st_mtime_ns for p in out.glob("labels/**/*.png")}
    assert 0 < len(finished) < n, f"{len(finished)} of {n} images finished when killed: not midway"
    assert not (out / "predictions.parquet").exists()  # only a finished run writes it
    [left] = out.glob(".predictions.*.parquet.tmp")  # the killed run's temporary predictions.parquet
    (out / "mine.parquet.tmp").touch()  # not of that pattern: kept
    source = {Path(rel).with_suffix(".png"): rel for rel in images}
    for path in finished:  # every label PNG there is whole (written atomically)
        assert np.asarray(Image.open(out / "labels" / path)).shape == images[source[path]].shape[:2]

    summary = predict_job(ckpt, str(tmp_path / "src"), str(out), workers=1, batch_size=4)

    assert summary.predicted == n - len(finished) and summary.reused == len(finished) and not summary.skipped
    assert not left.exists() and not list(out.glob(".predictions.*")) and (out / "mine.parquet.tmp").exists()
    assert all((out / "labels" / p).stat().st_mtime_ns == t for p, t in finished.items())  # not written again
    assert len(list(out.glob("labels/**/*.png"))) == n
    assert sorted(pq.read_table(out / "predictions.parquet")["path"].to_pylist()) == sorted(images)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["predicted"] == n - len(finished)
    assert [r["status"] for r in manifest["earlier_runs"]] == ["running"]  # the killed run, never finished

    again = predict_job(ckpt, str(tmp_path / "src"), str(out), workers=1, batch_size=8, overwrite=True)
    assert (again.predicted, again.reused) == (n, 0)


@pytest.mark.slow
def test_listing_and_planning_100000_objects_keeps_the_driver_memory_bounded(s3_server, ray_local):
    """100,000 small objects on the local S3 server are listed (streaming) and planned (one Ray Data dataset per
    chunk of 10,000) while the driver's Python allocations peak under 16 MiB, less than the list of their
    relative paths and the plan's rows would take if the driver held them all at once."""
    import tracemalloc
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    from raysseg.io.storage import iter_files
    from raysseg.runtime.predict import CHUNK, JobPaths, chunk_dataset, chunks

    n, bound = 100_000, 16 * 2**20
    s3_server.create_bucket("many")
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                          aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")
    keys = [f"collection/camera{i % 10}/day{i // 1000 % 10}/frame_{i:07d}.png" for i in range(n)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda k: client.put_object(Bucket="many", Key=k, Body=b"\x89PNG small"), keys))
    del keys
    next(iter_files("s3://many/collection"))  # botocore loads its service models once per process: not counted

    tracemalloc.start()
    held = [{"path": rel} for rel in iter_files("s3://many/collection")]  # what holding the whole listing takes
    whole = tracemalloc.get_traced_memory()[0]
    del held
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    paths = JobPaths("s3://many/collection", "s3://many/out", False, 27)
    listed = planned = 0
    for rels in chunks(iter_files("s3://many/collection"), CHUNK):
        listed += len(rels)
        chunk_dataset(rels, paths, [None], short_side=64, multiple=32, overwrite=False, workers=2, threads=1,
                      gpus_per_worker=0, batch_size=8)  # planned, not run
        planned += 1
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    print(f"listed {listed:,} objects in {planned} plans; driver peak {peak / 2**20:.1f} MiB "
          f"(the whole listing held: {whole / 2**20:.1f} MiB)")
    assert listed == n and planned == n // CHUNK
    assert peak < bound < whole
