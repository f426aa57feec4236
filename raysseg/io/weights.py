"""Named pretrained weights: the authors' public files, fetched once per machine into a checked cache.

``model.weights: dino_vits8`` names a row of :data:`WEIGHTS`: the authors' download URL, the
checksum they publish (if any), the backbone the file fits and its checkpoint layout (how
:func:`raysseg.core.backbones.load_backbone_weights` maps its keys, :data:`LAYOUTS`).

- Cache: ``$RAYSSEG_CACHE/checkpoints/`` (default ``torch.hub.get_dir()/checkpoints``, where
  torch.hub keeps the same files under the same names). The first use downloads into it: a
  file lock makes the processes of one machine download once; the file appears atomically.
- Source: the URL of the table, or ``$RAYSSEG_WEIGHTS_URL/<file name>`` when that is set (an
  HTTP(S) or s3:// mirror of the files, e.g. filled by ``raysseg weights fetch NAME --to``).
- Checks: a published sha256 (full, or the prefix that torchvision's file names carry) or md5
  prefix (MoCo's README) is checked on download and on every read. A file without one is
  trusted on first use: its sha256 goes into the cache's manifest (``raysseg-weights.json``)
  and every later read must match it. Any mismatch is refused with one line.
"""
from __future__ import annotations

import contextlib
import datetime
import difflib
import fcntl
import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MANIFEST = "raysseg-weights.json"
TIMEOUT_S = 30.0  # per network read
CHUNK = 1 << 20


class WeightsError(RuntimeError):
    """A named weights file that cannot be had or does not match its checksum (one line)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# How each layout's keys reach our backbone's (raysseg.core.backbones._checkpoint_state_dict).
LAYOUTS = {
    "dino": "plain backbone state dict in timm's ViT names (cls_token, pos_embed, patch_embed.*, blocks.*, "
            "norm.*) -> vit.*",
    "dinov2": "DINOv2 names -> vit.* (timm's names): mask_token dropped; with registers register_tokens -> "
              "reg_token and pos_embed[:, 0] added into cls_token (timm keeps positions for patches only)",
    "moco": "{'state_dict': module.encoder_q.*}: encoder_q kept, prefix stripped, fc.* (projection MLP) dropped "
            "-> trunk.*; the FPN stays as initialised",
    "swav": "module.* stripped, projection_head.* and prototypes.* dropped -> trunk.*; the FPN stays as initialised",
    "torchvision": "torchvision ResNet state dict, fc.* dropped -> trunk.*; the FPN stays as initialised",
}


@dataclass(frozen=True)
class Weights:
    """One named file. ``sha256``: the full digest, or a prefix (fewer than 64 hex digits); ``md5``: a
    published prefix; both empty when the authors publish none (trust on first use)."""

    name: str
    url: str
    backbone: str  # a raysseg.core.geometry.BACKBONES name
    layout: str  # a key of LAYOUTS
    source: str  # where the URL and checksum were read
    sha256: str = ""
    md5: str = ""

    @property
    def file(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def published(self) -> str:
        """The published checksum in words ('' if none)."""
        if self.sha256:
            return f"sha256 {self.sha256}" + (" (prefix)" if len(self.sha256) < 64 else "")
        return f"md5 {self.md5} (prefix)" if self.md5 else ""


_DINO = "facebookresearch/dino hubconf.py and README (backbone only); no checksum published"
_DINOV2 = "facebookresearch/dinov2 dinov2/hub/backbones.py and README (backbone only); no checksum published"
_MOCO = "facebookresearch/moco README (ImageNet-1k, md5 column)"
_TV = "torchvision 0.29 (installed) {}.IMAGENET1K_V1; the file name carries the sha256 prefix"


def _dino(name: str, folder: str, backbone: str) -> Weights:
    return Weights(name, f"https://dl.fbaipublicfiles.com/dino/{folder}/{folder}.pth", backbone, "dino", _DINO)


def _dinov2(name: str, arch: str, file: str, backbone: str) -> Weights:
    return Weights(name, f"https://dl.fbaipublicfiles.com/dinov2/{arch}/{file}", backbone, "dinov2", _DINOV2)


WEIGHTS: dict[str, Weights] = {w.name: w for w in (
    _dino("dino_vits16", "dino_deitsmall16_pretrain", "vit_small_patch16"),
    _dino("dino_vits8", "dino_deitsmall8_pretrain", "vit_small_patch8"),
    _dino("dino_vitb16", "dino_vitbase16_pretrain", "vit_base_patch16"),
    _dino("dino_vitb8", "dino_vitbase8_pretrain", "vit_base_patch8"),
    _dinov2("dinov2_vits14", "dinov2_vits14", "dinov2_vits14_pretrain.pth", "vit_small_patch14_dinov2"),
    _dinov2("dinov2_vitb14", "dinov2_vitb14", "dinov2_vitb14_pretrain.pth", "vit_base_patch14_dinov2"),
    _dinov2("dinov2_vits14_reg", "dinov2_vits14", "dinov2_vits14_reg4_pretrain.pth", "vit_small_patch14_reg4_dinov2"),
    _dinov2("dinov2_vitb14_reg", "dinov2_vitb14", "dinov2_vitb14_reg4_pretrain.pth", "vit_base_patch14_reg4_dinov2"),
    Weights("mocov2_r50_200ep", "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_200ep/"
            "moco_v2_200ep_pretrain.pth.tar", "resnet50_fpn", "moco", _MOCO, md5="59fd9945"),
    Weights("mocov2_r50_800ep", "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/"
            "moco_v2_800ep_pretrain.pth.tar", "resnet50_fpn", "moco", _MOCO, md5="a04e12f8"),
    Weights("swav_r50_800ep", "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
            "resnet50_fpn", "swav", "facebookresearch/swav hubconf.py and README (ImageNet-1k); no checksum published"),
    Weights("torchvision_r18_imagenet", "https://download.pytorch.org/models/resnet18-f37072fd.pth", "resnet18_fpn",
            "torchvision", _TV.format("ResNet18_Weights"), sha256="f37072fd"),
    Weights("torchvision_r50_imagenet", "https://download.pytorch.org/models/resnet50-0676ba61.pth", "resnet50_fpn",
            "torchvision", _TV.format("ResNet50_Weights"), sha256="0676ba61"),
)}


def lookup(value: str, table: dict[str, Weights] | None = None) -> Weights | None:
    """The row named ``value`` of ``table`` (default :data:`WEIGHTS`), or None (a path or URI)."""
    return (WEIGHTS if table is None else table).get(value)


def close_names(value: str) -> list[str]:
    """Names of the table that look like ``value`` (for a one-line hint)."""
    return difflib.get_close_matches(value, list(WEIGHTS), n=3, cutoff=0.6)


def cache_dir() -> Path:
    """``$RAYSSEG_CACHE/checkpoints`` (default: torch.hub's ``<hub dir>/checkpoints``)."""
    root = os.environ.get("RAYSSEG_CACHE")
    if not root:
        import torch.hub

        root = torch.hub.get_dir()
    return Path(root).expanduser() / "checkpoints"


def source_url(entry: Weights) -> str:
    """Where ``entry`` is downloaded from: ``$RAYSSEG_WEIGHTS_URL/<file>`` if set, else the authors' URL."""
    mirror = os.environ.get("RAYSSEG_WEIGHTS_URL", "").rstrip("/")
    return f"{mirror}/{entry.file}" if mirror else entry.url


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of this machine on ``path`` (its ``.lock`` file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_manifest(cache: Path | None = None) -> dict[str, dict]:
    """The cache's record of each file it holds: {file: {name, url, sha256, trust, recorded}}."""
    path = (cache or cache_dir()) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise WeightsError(f"weights cache manifest {path} is unreadable ({exc}); delete it (the files are "
                           "checked again and recorded on their next use)") from None


def _record(cache: Path, entry: Weights, sha256: str, trust: str) -> None:
    path = cache / MANIFEST
    with _locked(path):
        manifest = read_manifest(cache)
        manifest[entry.file] = {"name": entry.name, "url": entry.url, "sha256": sha256, "trust": trust,
                                "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)


class _Digests:
    def __init__(self):
        self._sha, self._md5 = hashlib.sha256(), hashlib.md5()

    def update(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        self._md5.update(chunk)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def md5(self) -> str:
        return self._md5.hexdigest()


def _digests_of(data: bytes) -> _Digests:
    d = _Digests()
    d.update(data)
    return d


def _file_digests(path: Path) -> _Digests:
    d = _Digests()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            d.update(chunk)
    return d


def _expected(entry: Weights, cache: Path) -> str:
    """The sha256 a file must have, in words, for the one-line messages."""
    if entry.sha256:
        return entry.published
    recorded = read_manifest(cache).get(entry.file)
    if recorded:
        return f"sha256 {recorded['sha256']} (recorded on first use)"
    return entry.published + " (sha256 not published)" if entry.md5 else "sha256 not published (trusted on first use)"


def _verify(entry: Weights, d: _Digests, where: str, cache: Path, fix: str) -> None:
    """Refuse ``where`` unless its digests match the table and the manifest; record it on first use."""
    checks = [("sha256", entry.sha256, "published")] if entry.sha256 else []
    checks += [("md5", entry.md5, "published")] if entry.md5 else []
    recorded = read_manifest(cache).get(entry.file)
    if recorded:
        checks.append(("sha256", recorded["sha256"], f"recorded in {cache / MANIFEST} on {recorded['recorded']}"))
    for algo, want, origin in checks:
        got = d.sha256 if algo == "sha256" else d.md5
        if not got.startswith(want):
            raise WeightsError(f"weights {entry.name}: {where} has {algo} {got}, expected {want} ({origin}); "
                               f"refused: {fix}")
    if not recorded:
        trust = "sha256" if len(entry.sha256) == 64 else "prefix" if entry.sha256 or entry.md5 else "tofu"
        _record(cache, entry, d.sha256, trust)


def _download(entry: Weights, path: Path, cache: Path) -> None:
    """``source_url(entry)`` into ``path`` (atomically), checked; one line on any failure."""
    url = source_url(entry)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    d = _Digests()
    try:
        with open(tmp, "wb") as out:
            if url.startswith("s3://"):
                from raysseg.io.storage import StorageError, read_bytes

                try:
                    data = read_bytes(url)
                except StorageError as exc:
                    raise OSError(str(exc)) from None
                out.write(data)
                d.update(data)
            else:
                with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        d.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        _verify(entry, d, f"the download from {url}", cache, "nothing was cached; check the URL or the mirror "
                "(RAYSSEG_WEIGHTS_URL)")
        os.replace(tmp, path)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(f"weights {entry.name}: cannot download {url} ({reason}); put the file "
                           f"({_expected(entry, cache)}) at {path}, or fetch it where there is network "
                           f"(raysseg weights fetch {entry.name}) and copy it there") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _cached(entry: Weights, cache: Path) -> tuple[Path, bool]:
    """(the path of ``entry`` in ``cache``, whether it was downloaded (and so checked) just now). One download
    per machine: other processes wait for the lock, then find the file."""
    path = cache / entry.file
    with _locked(path):
        if path.is_file():
            return path, False
        _download(entry, path, cache)
        return path, True


def _refuse_fix(entry: Weights) -> str:
    return f"delete it and run `raysseg weights fetch {entry.name}`"


def fetch(entry: Weights, cache: Path | None = None) -> Path:
    """The checked path of ``entry`` in the cache (``cache_dir()`` by default), downloaded first if needed."""
    cache = cache or cache_dir()
    path, downloaded = _cached(entry, cache)
    if not downloaded:
        _verify(entry, _file_digests(path), str(path), cache, _refuse_fix(entry))
    return path


def read_weights(uri: str, table: dict[str, Weights] | None = None) -> bytes:
    """The bytes of ``model.weights``: a name of ``table`` (default :data:`WEIGHTS`; from the cache, fetched
    first if needed, checked on every read), or a path or s3:// URI (read by :mod:`raysseg.io.storage`; checked
    too when its file name is one of the table's). The ``read_bytes`` of
    :func:`raysseg.core.backbones.build_backbone`."""
    entry = lookup(uri, table)
    if entry is not None:
        cache = cache_dir()
        path, _ = _cached(entry, cache)
        data = path.read_bytes()
        _verify(entry, _digests_of(data), str(path), cache, _refuse_fix(entry))
        return data
    from raysseg.io.storage import read_bytes

    data = read_bytes(uri)
    for entry in (WEIGHTS if table is None else table).values():
        if uri.rstrip("/").rsplit("/", 1)[-1] == entry.file and (entry.sha256 or entry.md5):
            d = _digests_of(data)
            for algo, want, got in (("sha256", entry.sha256, d.sha256), ("md5", entry.md5, d.md5)):
                if want and not got.startswith(want):
                    raise WeightsError(f"weights {uri}: {algo} {got}, expected {want} (published for "
                                       f"{entry.name}); refused: replace it (raysseg weights fetch {entry.name} "
                                       f"--to <its folder>)")
    return data


def ensure(value: str) -> None:
    """Before a run starts: a weights name is fetched into this machine's cache now (one line if it cannot
    be); paths and URIs are left to their readers."""
    entry = lookup(value)
    if entry is not None:
        fetch(entry)


def upload(entry: Weights, to: str) -> str:
    """Fetch ``entry`` into the cache and copy it to ``<to>/<file>`` (s3:// or a folder); returns that URI."""
    from raysseg.io.storage import join, write_file_atomic

    path = fetch(entry)
    uri = join(to, entry.file)
    write_file_atomic(uri, str(path))
    return uri


def cached_state(entry: Weights, cache: Path | None = None) -> str:
    """What the cache holds for ``entry``, in words (from the manifest; nothing is hashed)."""
    cache = cache or cache_dir()
    if not (cache / entry.file).is_file():
        return "not cached"
    recorded = read_manifest(cache).get(entry.file)
    if recorded is None:
        return "cached, not yet checked"
    trust = {"sha256": "checked against the published sha256", "prefix": "checked against the published prefix",
             "tofu": "TOFU: no published checksum, sha256 recorded on first use"}.get(recorded["trust"], "?")
    return f"cached, sha256 {recorded['sha256'][:16]}... ({trust})"
