"""Named weights (raysseg.io.weights): downloads from a local HTTP server on 127.0.0.1 serving checkpoints the
tests write, the checked cache (published checksums, trust on first use), one download per machine, the
s3:// copy, the one-line errors, and config validation. The real URLs: one slow test, skipped offline."""
from __future__ import annotations

import collections
import hashlib
import io
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from raysseg.io.weights import (
    LAYOUTS, MANIFEST, WEIGHTS, Weights, WeightsError, cache_dir, ensure, fetch, read_manifest, read_weights,
)


class Served:
    """What the server holds ({file: bytes}), the GETs it answered per file, and a pause per 4 KiB sent."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.gets: collections.Counter = collections.Counter()
        self.pause = 0.0
        self.url = ""


@pytest.fixture
def server():
    served = Served()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._answer(body=True)

        def do_HEAD(self):
            self._answer(body=False)

        def _answer(self, body: bool):
            name = self.path.lstrip("/")
            if body:
                served.gets[name] += 1
            data = served.files.get(name)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(0, len(data), 4096) if body else ():
                self.wfile.write(data[i:i + 4096])
                time.sleep(served.pause)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    served.url = f"http://127.0.0.1:{httpd.server_port}"
    yield served
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch, server) -> Path:
    """A fresh RAYSSEG_CACHE, and every name of the table fetched from the local server."""
    monkeypatch.setenv("RAYSSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAYSSEG_WEIGHTS_URL", server.url)
    return tmp_path / "cache" / "checkpoints"


def checkpoint(seed: int = 0) -> bytes:
    """A small torch checkpoint (bytes)."""
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"w": torch.randn(64, 64)}, buf)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``raysseg ARGV`` in this process: (exit code, stdout, stderr)."""
    from raysseg.apps.cli import main

    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_table_names_the_papers_starting_points_with_published_values_only():
    from raysseg.core.geometry import BACKBONES

    wanted = {"dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16", "dinov2_vits14", "dinov2_vitb14",
              "dinov2_vits14_reg", "dinov2_vitb14_reg", "mocov2_r50_800ep", "mocov2_r50_200ep", "swav_r50_800ep",
              "torchvision_r18_imagenet", "torchvision_r50_imagenet"}
    assert wanted <= set(WEIGHTS)
    for name, w in WEIGHTS.items():
        assert w.name == name and w.backbone in BACKBONES and w.layout in LAYOUTS and w.source
        assert w.url.startswith("https://dl.fbaipublicfiles.com/") or w.url.startswith("https://download.pytorch.org/")
        assert all(c in "0123456789abcdef" for c in w.sha256 + w.md5)
        if w.layout == "torchvision":  # torchvision's file names carry the sha256 prefix: the table's is that
            assert w.sha256 and w.file.rsplit("-", 1)[1].split(".")[0] == w.sha256
        else:  # DINO, DINOv2 and SwAV publish no checksum; MoCo's README an md5 prefix
            assert not w.sha256 and bool(w.md5) == (w.layout == "moco")


def test_download_is_checked_and_a_cache_hit_sends_no_second_get(server, cache):
    data = checkpoint()
    server.files["tiny.pth"] = data
    for trust, published in (("sha256", sha256(data)), ("prefix", sha256(data)[:8])):
        entry = Weights(f"tiny_{trust}", f"{server.url}/tiny.pth", "resnet18_fpn", "torchvision", "test",
                        sha256=published)
        folder = cache.parent / trust
        path = fetch(entry, folder)
        assert path == folder / "tiny.pth" and path.read_bytes() == data
        assert read_manifest(folder)["tiny.pth"]["trust"] == trust
        assert read_manifest(folder)["tiny.pth"]["sha256"] == sha256(data)
        gets = server.gets["tiny.pth"]
        assert fetch(entry, folder) == path and server.gets["tiny.pth"] == gets  # the cache answers
        assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, f"{MANIFEST}.lock", "tiny.pth",
                                                           "tiny.pth.lock"]  # no partial download left
    assert server.gets["tiny.pth"] == 2  # one per cache


def test_a_named_checkpoint_reaches_its_backbone_through_the_cache(server, cache):
    import torchvision

    from raysseg.core.backbones import build_backbone

    torch.manual_seed(0)
    trunk = torchvision.models.resnet18(weights=None)
    buf = io.BytesIO()
    torch.save(trunk.state_dict(), buf)  # torchvision's layout, fc.* included
    server.files["r18.pth"] = buf.getvalue()
    table = {"r18": Weights("r18", "https://example.invalid/r18.pth", "resnet18_fpn", "torchvision", "test",
                            sha256=sha256(buf.getvalue()))}
    model = build_backbone("resnet18_fpn", weights="r18", read_bytes=partial(read_weights, table=table))
    torch.testing.assert_close(model.trunk.conv1.weight, trunk.conv1.weight)
    assert server.gets["r18.pth"] == 1 and (cache / "r18.pth").is_file()


def test_trust_on_first_use_is_recorded_listed_and_enforced(server, cache, capsys):
    first = checkpoint(0)
    server.files["dino_deitsmall16_pretrain.pth"] = first
    ensure("dino_vits16")  # DINO publishes no checksum: the first download's sha256 is recorded
    recorded = read_manifest(cache)["dino_deitsmall16_pretrain.pth"]
    assert recorded["trust"] == "tofu" and recorded["sha256"] == sha256(first) and recorded["name"] == "dino_vits16"
    assert read_weights("dino_vits16") == first and server.gets["dino_deitsmall16_pretrain.pth"] == 1

    code, out, _ = cli(capsys, "weights", "list")
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert f"sha256 {sha256(first)[:16]}... (TOFU" in lines["dino_vits16"]
    assert "not cached" in lines["dino_vits8"] and "sha256 f37072fd (prefix)" in lines["torchvision_r18_imagenet"]
    assert f"{server.url}/dino_deitsmall16_pretrain.pth" in lines["dino_vits16"]

    (cache / "dino_deitsmall16_pretrain.pth").write_bytes(checkpoint(1))  # the cached copy changed
    with pytest.raises(WeightsError) as info:
        read_weights("dino_vits16")
    message = str(info.value)
    assert "\n" not in message and sha256(first) in message and "recorded in" in message and "refused" in message
    code, _, err = cli(capsys, "weights", "fetch", "dino_vits16")
    assert code == 2 and err.count("\n") == 1 and "refused" in err

    (cache / "dino_deitsmall16_pretrain.pth").unlink()  # and the server now serves another file
    server.files["dino_deitsmall16_pretrain.pth"] = checkpoint(2)
    with pytest.raises(WeightsError, match="the download from .* refused: nothing was cached"):
        ensure("dino_vits16")
    assert not (cache / "dino_deitsmall16_pretrain.pth").exists()


def test_a_download_that_differs_from_the_published_checksum_is_refused(server, cache, capsys):
    server.files["resnet18-f37072fd.pth"] = checkpoint()  # not torchvision's file: its sha256 differs
    code, _, err = cli(capsys, "weights", "fetch", "torchvision_r18_imagenet")
    assert code == 2 and err.count("\n") == 1, err
    assert f"has sha256 {sha256(checkpoint())}, expected f37072fd (published); refused" in err
    assert not (cache / "resnet18-f37072fd.pth").exists() and not list(cache.glob("*.part"))


def test_offline_is_one_line_naming_the_url_the_checksum_and_where_to_put_the_file(cache, monkeypatch, capsys):
    from raysseg.config import load_config
    from raysseg.runtime.driver import train

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("RAYSSEG_WEIGHTS_URL", closed)
    code, _, err = cli(capsys, "weights", "fetch", "torchvision_r18_imagenet")
    assert code == 2 and err.count("\n") == 1, err
    for part in (f"cannot download {closed}/resnet18-f37072fd.pth", "sha256 f37072fd (prefix)",
                 f"at {cache / 'resnet18-f37072fd.pth'}"):
        assert part in err

    # a paper config names its weights; without them its run stops before Ray starts, with that line
    import ray

    ray.shutdown()  # an earlier test's local Ray would hide whether this run started one
    cfg = load_config("hp_cocostuff_released")
    assert cfg.model.weights == "dino_vits8"
    with pytest.raises(WeightsError) as info:
        train(cfg)
    assert f"cannot download {closed}/dino_deitsmall8_pretrain.pth" in str(info.value)
    assert "sha256 not published (trusted on first use)" in str(info.value)
    assert f"at {cache / 'dino_deitsmall8_pretrain.pth'}" in str(info.value) and not ray.is_initialized()


FETCH = """
import sys, time
from pathlib import Path
from raysseg.io.weights import Weights, fetch
url, digest, cache, expected, ready, n = sys.argv[1:]
Path(ready, str(time.time_ns())).touch()
while len(list(Path(ready).iterdir())) < int(n):  # start together
    time.sleep(0.01)
entry = Weights("tiny", url, "resnet18_fpn", "torchvision", "test", sha256=digest)
print(fetch(entry, Path(cache)).read_bytes() == Path(expected).read_bytes())
"""


def test_processes_of_one_machine_download_once(server, tmp_path):
    """Four processes start fetching at once; the download takes ~0.3 s: without the lock, several GET."""
    data = checkpoint() * 8
    server.files["tiny.pth"], server.pause = data, 0.01
    (tmp_path / "expected").write_bytes(data)
    (tmp_path / "ready").mkdir()
    args = [f"{server.url}/tiny.pth", sha256(data), str(tmp_path / "cache"), str(tmp_path / "expected"),
            str(tmp_path / "ready"), "4"]
    procs = [subprocess.Popen([sys.executable, "-c", FETCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o[0].strip() for o in outs] == ["True"] * 4, outs
    assert server.gets["tiny.pth"] == 1


def test_fetch_to_s3_and_read_back_checked(server, cache, s3_server, monkeypatch, capsys):
    data = checkpoint()
    server.files["dino_deitsmall8_pretrain.pth"] = data
    s3_server.create_bucket("weights-mirror")
    code, out, err = cli(capsys, "weights", "fetch", "dino_vits8", "--to", "s3://weights-mirror/dino")
    assert code == 0, err
    uri = "s3://weights-mirror/dino/dino_deitsmall8_pretrain.pth"
    assert f"--set model.weights={uri}" in out and read_weights(uri) == data

    # a node with an empty cache fills it from the bucket, without the HTTP server
    monkeypatch.setenv("RAYSSEG_CACHE", str(cache.parent.parent / "node2"))
    monkeypatch.setenv("RAYSSEG_WEIGHTS_URL", "s3://weights-mirror/dino")
    assert read_weights("dino_vits8") == data and server.gets["dino_deitsmall8_pretrain.pth"] == 1
    assert read_manifest(cache_dir())["dino_deitsmall8_pretrain.pth"]["trust"] == "tofu"

    from raysseg.io.storage import write_bytes_atomic

    write_bytes_atomic("s3://weights-mirror/tv/resnet18-f37072fd.pth", data)  # a file under a published name
    with pytest.raises(WeightsError, match="expected f37072fd .published for torchvision_r18_imagenet.; refused"):
        read_weights("s3://weights-mirror/tv/resnet18-f37072fd.pth")


def test_config_takes_names_and_refuses_unknown_or_misfitting_ones_with_one_line(capsys):
    from raysseg.config import ConfigError, load_config, local_paths

    cfg = load_config("hp_camvid", ["model.weights=dino_vits16"])
    assert cfg.model.weights == "dino_vits16" and "model.weights" not in local_paths(cfg)  # not a local path
    with pytest.raises(ConfigError, match=r"dino_vit16 does not exist; did you mean dino_vits16, dino_vitb16"):
        load_config("hp_camvid", ["model.weights=dino_vit16"])
    with pytest.raises(ConfigError, match="dino_vits8 fits backbone vit_small_patch8, not vit_small_patch16; "
                                          "set model.backbone=vit_small_patch8"):
        load_config("hp_camvid", ["model.weights=dino_vits8"])
    code, _, err = cli(capsys, "weights", "fetch", "dino_vit8")
    assert code == 2 and "did you mean dino_vits8, dino_vitb8" in err


@pytest.mark.slow
def test_the_real_urls_answer():
    """HEAD on every URL of the table (needs network; skipped without it)."""
    hosts = {w.url.split("/")[2] for w in WEIGHTS.values()}
    try:
        for host in hosts:
            socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        pytest.skip(f"no network ({exc})")
    for w in WEIGHTS.values():
        request = urllib.request.Request(w.url, method="HEAD")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200, w.url
            assert int(response.headers["Content-Length"]) > 10_000_000, w.url  # a backbone, not an error page
