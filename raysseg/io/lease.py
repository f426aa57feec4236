"""One holder per run: a lease file next to the run's checkpoints, kept alive by a heartbeat.

The lease of run ``<name>`` is ``<train.storage>/.leases/<name>.json`` (a folder or ``s3://``):
host, pid, since when, and the time of its last heartbeat, rewritten every ``HEARTBEAT_S``.

- A second command for the same run refuses with one line (:class:`RunBusy`) naming the holder.
- A holder whose heartbeat is older than ``RAYSSEG_LEASE_TIMEOUT_S`` (default 60 s) crashed or
  hung: its lease is taken over, with one line. A holder on this machine whose process is gone is
  taken over at once.
- Taking a lease writes it, waits ``SETTLE_S`` and reads it back: of two commands that wrote at
  the same moment, only the one whose write came last finds its own lease and goes on (S3 has
  no create-if-absent; the same protocol serves folders and buckets).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass

from raysseg.io import storage

TIMEOUT_S = 60.0  # a heartbeat older than this is a crashed holder (RAYSSEG_LEASE_TIMEOUT_S)
HEARTBEAT_S = 10.0
SETTLE_S = 1.0


class RunBusy(RuntimeError):
    """Another command holds the run's lease; the message is one line naming it."""


@dataclass
class Holder:
    host: str
    pid: int
    token: str
    since: float  # when it took the lease (epoch seconds)
    heartbeat: float  # its last heartbeat (epoch seconds)

    def gone(self, timeout: float) -> str:
        """Why this holder no longer holds its lease, or "" while it does."""
        silent = time.time() - self.heartbeat
        if silent > timeout:
            return f"no heartbeat for {silent:.0f} s"
        if self.host == socket.gethostname() and not _alive(self.pid):
            return f"process {self.pid} is gone"
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def lease_uri(storage_root: str, run_name: str) -> str:
    return f"{storage_root.rstrip('/')}/.leases/{run_name}.json"


class RunLease:
    """``with RunLease(cfg.train.storage, run_name):`` holds the run for the block (heartbeat on a thread)."""

    def __init__(self, storage_root: str, run_name: str, timeout: float | None = None):
        self.run_name, self.uri = run_name, lease_uri(storage_root, run_name)
        self.timeout = float(os.environ.get("RAYSSEG_LEASE_TIMEOUT_S", TIMEOUT_S)) if timeout is None else timeout
        now = time.time()
        self.me = Holder(socket.gethostname(), os.getpid(), secrets.token_hex(8), now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> Holder | None:
        if not storage.exists(self.uri):
            return None
        try:
            return Holder(**json.loads(storage.read_bytes(self.uri)))
        except storage.StorageError:
            if storage.exists(self.uri):
                raise
            return None  # released between the two calls
        except (ValueError, TypeError):  # not a lease (written by hand, or cut short): nobody holds it
            return None

    def _write(self) -> None:
        self.me.heartbeat = time.time()
        storage.write_bytes_atomic(self.uri, json.dumps(asdict(self.me)).encode())

    def _busy(self, holder: Holder) -> RunBusy:
        return RunBusy(
            f"run {self.run_name} is in use by host {holder.host}, pid {holder.pid}, since {_when(holder.since)} "
            f"(last heartbeat {time.time() - holder.heartbeat:.0f} s ago; lease {self.uri}): wait for it or stop it; "
            f"a holder silent for {self.timeout:.0f} s is taken over")

    def acquire(self) -> None:
        holder = self.read()
        if holder is not None and holder.token != self.me.token:
            why = holder.gone(self.timeout)
            if not why:
                raise self._busy(holder)
            print(f"run {self.run_name}: taking over the lease of host {holder.host}, pid {holder.pid} ({why})",
                  flush=True)
        self._write()
        time.sleep(SETTLE_S)
        winner = self.read()
        if winner is None or winner.token != self.me.token:
            raise self._busy(winner or holder or self.me)
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                holder = self.read()
                if holder is not None and holder.token != self.me.token:
                    print(f"warning: run {self.run_name}: host {holder.host}, pid {holder.pid} took over this "
                          f"run's lease (this command was silent for over {self.timeout:.0f} s)", flush=True)
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried; the storage layer warns
                print(f"warning: run {self.run_name}: lease heartbeat failed ({e})", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):  # best effort: a lease left behind expires
            holder = self.read()
            if holder is not None and holder.token == self.me.token:
                fs, path = storage.resolve(self.uri)
                fs.delete_file(path)

    def __enter__(self) -> "RunLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
