"""A command lists its split once: the LIST requests the real S3 server answers for a `train` are the pages of
one listing, and the listing keeps a few bytes per image (relative paths, sizes, mtimes in Arrow / numpy)."""
from __future__ import annotations

import gc
import math
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest

from raysseg.io import images
from tests.test_local import small_config

EXTRA = 1200  # more images than one listing page (1,000 keys) holds


def _client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                        aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")


def _pages(client, bucket: str, prefix: str) -> tuple[int, int]:
    """(pages, keys) of one plain ListObjectsV2 pagination of ``prefix``: what one listing costs."""
    pages = list(client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"))
    return len(pages), sum(len(p.get("Contents", ())) for p in pages)


@pytest.fixture(scope="module")
def big_split(s3_server, synth_data) -> tuple[str, str, int]:
    """(bucket, split URI, its page count): the synthetic training split (images and labels) plus EXTRA copies
    of one of its images in images/extra/ (with labels), in a bucket of its own; the validation split beside it
    (``val``)."""
    bucket = "listonce-" + uuid.uuid4().hex[:8]
    s3_server.create_bucket(bucket)
    client = _client(s3_server)
    train, val = synth_data / "train", synth_data / "val"
    files = {f"split/{p.relative_to(train).as_posix()}": p.read_bytes() for p in train.rglob("*.png")}
    files.update({f"val/{p.relative_to(val).as_posix()}": p.read_bytes() for p in val.rglob("*.png")})
    image, label = (train / "images" / "train_0000.png").read_bytes(), (train / "labels" / "train_0000.png").read_bytes()
    for i in range(EXTRA):
        files[f"split/images/extra/{i:05d}.png"] = image
        files[f"split/labels/extra/{i:05d}.png"] = label
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), files.items()))
    pages, keys = _pages(client, bucket, "split")
    assert keys == len(files) - 8 and pages == math.ceil(keys / 1000) > 1
    return bucket, f"s3://{bucket}/split", pages


def test_train_local_lists_its_split_once(s3_server, synth_data, big_split, tmp_path):
    from raysseg.engine.local import train_local

    bucket, split, pages = big_split
    # k-means, the quickest run: checks, plan and reader (HP's plan and reads: the slow Ray test below)
    cfg = small_config("kmeans", synth_data, tmp_path, f"data.train={split}", "data.image_size=32")
    before = s3_server.request_count("LIST", bucket)
    result = train_local(cfg)
    assert result.checkpoint and result.metrics
    assert s3_server.request_count("LIST", bucket) - before == pages


def test_evaluate_inputs_list_each_split_once(s3_server, synth_data, big_split, tmp_path):
    from raysseg.engine.inputs import evaluation_inputs

    bucket, split, pages = big_split
    cfg = small_config("hp", synth_data, tmp_path, f"data.train={split}")
    before = s3_server.request_count("LIST", bucket)
    listed = evaluation_inputs(cfg, split, probe=True, retrieval=True)  # split and training split are one here
    assert s3_server.request_count("LIST", bucket) - before == pages
    assert len(listed.split) == 8 + EXTRA and listed.train is listed.split and listed.split.pages == pages
    assert listed.split.labels[0] == f"{split}/labels/extra/00000.png"


def test_a_listing_keeps_under_100_bytes_per_image(tmp_path):
    n = 5000
    for sub in ("images/a", "labels/a"):
        (tmp_path / sub).mkdir(parents=True)
    for i in range(n):
        (tmp_path / "images" / "a" / f"photo_{i:06d}.jpg").write_bytes(b"x")
        (tmp_path / "labels" / "a" / f"photo_{i:06d}.png").write_bytes(b"x")
    images.list_split(str(tmp_path), with_labels=True)  # once before: one-time costs (Arrow kernels, imports)
    gc.collect()
    tracemalloc.start()
    arrow_before = pa.total_allocated_bytes()
    listing = images.list_split(str(tmp_path), with_labels=True)
    gc.collect()
    python_kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    kept = python_kept + pa.total_allocated_bytes() - arrow_before
    assert len(listing) == n and kept / n < 100, f"{kept / n:.0f} bytes per image"
    assert isinstance(listing.rel, pa.Array) and listing.size.dtype == np.int64
    assert listing.images[n - 1] == str(tmp_path / "images" / "a" / f"photo_{n - 1:06d}.jpg")
    assert listing.labels[0] == str(tmp_path / "labels" / "a" / "photo_000000.png")


@pytest.mark.slow
def test_ray_train_and_evaluate_list_each_split_once(ray_local, s3_server, synth_data, big_split, tmp_path):
    from raysseg.runtime.driver import train
    from raysseg.runtime.evaluate import evaluate

    bucket, split, pages = big_split
    cfg = small_config("hp", synth_data, tmp_path, f"data.train={split}", f"data.val=s3://{bucket}/val")
    before = s3_server.request_count("LIST", bucket)
    result = train(cfg)
    assert s3_server.request_count("LIST", bucket) - before == pages
    before = s3_server.request_count("LIST", bucket)
    evaluate(result.checkpoint, crf=False, probe=False, retrieval=False)  # data.val: 4 images, one page
    assert s3_server.request_count("LIST", bucket) - before == 1


def test_block_sizes_bound_the_driver_blocks_and_the_decoded_block():
    from raysseg.runtime.datasets import MAX_BLOCK_BYTES, TARGET_BLOCKS, rows_per_block

    assert rows_per_block(367, 224, cached=False) == 32  # small splits: small blocks, parallel decoding
    assert rows_per_block(367, 224, cached=True) == 96
    rows = rows_per_block(100_000, 224, cached=False)
    assert rows == 196 and -(-100_000 // rows) <= TARGET_BLOCKS
    rows = rows_per_block(10_000_000, 224, cached=False)  # capped by the decoded size, not the block count
    assert rows * 4 * 224 * 224 <= MAX_BLOCK_BYTES and -(-10_000_000 // rows) < 7_500
    assert rows_per_block(10_000_000, 4096, cached=False) == 32  # huge crops: never below the base


def test_the_reads_of_one_split_put_its_paths_into_the_object_store_once(ray_local, synth_data):
    """The cluster read and the training read of a split map the same source blocks (one copy of the paths in
    shared memory, not one per read); each still gives its own rows."""
    from raysseg.runtime import datasets

    split = str(synth_data / "train")
    listing = images.list_split(split)
    datasets._SOURCES.clear()
    cluster = datasets.make_dataset(split, image_size=32, train=False, with_labels=False, listing=listing)
    train = datasets.make_dataset(split, image_size=32, train=True, with_labels=False, listing=listing, seed=3)
    assert len(datasets._SOURCES) == 1
    pool = datasets.make_dataset(split, image_size=32, train=False, with_labels=False, listing=listing,
                                 files=list(listing.images)[:2])
    assert len(datasets._SOURCES) == 2  # other rows: their own blocks
    assert cluster.count() == train.count() == len(listing) and pool.count() == 2
    assert next(iter(cluster.iter_batches(batch_size=2)))["image"].shape[1:] == (32, 32, 3)
