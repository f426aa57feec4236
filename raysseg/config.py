"""Typed run configuration: dataclasses loaded from YAML plus ``--set a.b=v`` overrides.

Everything is validated here, before Ray starts: an unknown key, a wrong type or an
out-of-range value raises :class:`ConfigError` with one line naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import yaml


from raysseg.core.geometry import BACKBONES, input_multiple
from raysseg.core.precision import PRECISIONS
from raysseg.io.weights import close_names as weights_close_names, lookup as weights_lookup
from raysseg.methods.registry import METHODS, config_sections, spec
from raysseg.settings import ConfigError, setting as _f

__all__ = ["Config", "ConfigError", "load_config", "with_overrides", "with_data_settings", "config_from_dict"]


@dataclass
class DataConfig:
    train: str = _f("data/synth/train", help="training split: folder or s3://bucket/prefix with images/")
    val: str = _f("data/synth/val", help="evaluation split with images/ and labels/")
    image_size: int = _f(224, lo=32, hi=4096)
    crop_scale_min: float = _f(0.5, lo=0.05, hi=1.0, help="smallest crop area fraction in training")
    n_classes: int = _f(5, lo=2, hi=1000, help="classes in the evaluation labels")
    ignore_index: int = _f(255, lo=0, hi=65535)
    class_names: list = _f([], help="optional names, one per class")
    limit: int = _f(0, lo=0, help="use only the first N images of each split (0 = all)")
    cache: str = _f("", help="prepared-data cache of the training split: its images decoded once and resized "
                             "to a short side of 1.25 x image_size (never enlarged), then read every epoch and run "
                             "instead of the files. '' = off, 'auto' = <data.train>/.raysseg-cache, or a folder or "
                             "s3://bucket/prefix; built again when the split's files or data.image_size change")
    cpus: int = _f(1, lo=1, hi=4096, help="CPUs a run keeps beside its Train workers for Ray Data's decoding and the "
                                          "k-means tasks; Ray Data is capped to them (runtime/resources.py)")
    max_pixels: int = _f(250_000_000, lo=1, help="predict and evaluate skip images of more pixels (read from their "
                                                 "header, nothing decoded), with one line each")


@dataclass
class ModelConfig:
    backbone: str = _f("vit_small_patch16", choices=BACKBONES)
    weights: str = _f("", help="backbone checkpoint: a name of `raysseg weights list` (e.g. dino_vits8: fetched "
                               "into a checked cache), a path or an s3:// URI; empty = random init")
    frozen: bool = _f(True)
    freeze_bn: bool = _f(False, help="a trainable backbone's BatchNorm layers keep their (pretrained) statistics "
                                     "and affine parameters")
    code_dim: int = _f(256, lo=2, hi=4096, help="HP: segmentation code size")
    fpn_dim: int = _f(128, lo=2, hi=4096, help="ResNet-FPN output channels (PiCIE 128, PGG 256)")


@dataclass
class TrainConfig:
    epochs: int = _f(1, lo=1, hi=10000)
    batch_size: int = _f(8, lo=1, hi=4096, help="images per worker per step")
    lr: float = _f(5e-4, lo=0.0)
    weight_decay: float = _f(0.1, lo=0.0, hi=10.0)
    grad_clip: float = _f(10.0, lo=0.0)
    optimizer: str = _f("adam", choices=("adam", "sgd"),
                        help="PiCIE, PGG, SegSort, concepts: Adam, or SGD with momentum 0.9 (SegSort's released training)")
    lr_schedule: str = _f("constant", choices=("constant", "poly"),
                          help="PiCIE, PGG, SegSort, concepts: poly = lr x (1 - step/steps)^0.9 (SegSort's)")
    trunk_lr_scale: float = _f(1.0, lo=0.0, hi=100.0,
                               help="a trainable backbone's trunk (ResNet stages, ViT blocks) learns at train.lr x "
                                    "this; 0 = trunk fixed (the FPN and head still train)")
    num_workers: int = _f(2, lo=1, hi=4096, help="Ray Train workers")
    use_gpu: bool = _f(False)
    precision: str = _f("fp32", choices=PRECISIONS,
                        help="bf16/fp16: autocast for the network and losses (fp16 with a GradScaler); "
                             "selection, assignments and k-means stay in exact fp32")
    compile: bool = _f(False, help="torch.compile the backbone (first steps are slower while it compiles)")
    seed: int = _f(0, lo=0)
    storage: str = _f("runs", help="checkpoint root: folder or s3://bucket/prefix")
    run_name: str = _f("", help="empty = <config>-<hash of the settings>")
    log_every: int = _f(10, lo=1)
    checkpoints_to_keep: int = _f(2, lo=1)
    checkpoint_every: int = _f(0, lo=0, help="steps between mid-epoch checkpoints; 0 = at the end of each epoch only")
    max_restarts: int = _f(3, lo=0, hi=100, help="restarts from the latest checkpoint after a worker or the bank dies")


@dataclass
class KMeansConfig:
    n_clusters: int = _f(0, lo=0, help="0 = data.n_classes")
    pixels_per_image: int = _f(100, lo=1, help="features sampled per image for fitting")
    iterations: int = _f(20, lo=1, hi=1000)
    redo: int = _f(1, lo=1, hi=100, help="k-means restarts; the best objective wins")
    init_sample: int = _f(100000, lo=1, help="PiCIE/PGG: features faiss initialises the centroids on")
    assign_passes: int = _f(1, lo=0, hi=100, help="PiCIE/PGG: passes assigning every stored feature, in parallel Ray tasks")


@dataclass
class SegmentsConfig:
    """Pseudo segments (oversegmentation) and per-image pixel sorting, shared by SegSort,
    visual concepts, retrieval evaluation and concept browsing."""
    method: str = _f("felzenszwalb", choices=("felzenszwalb", "slic"),
                     help="oversegmentation of each training image (scikit-image), computed in the Ray Data read")
    scale: float = _f(100.0, lo=1.0, help="felzenszwalb: larger = larger segments")
    sigma: float = _f(0.8, lo=0.0, help="felzenszwalb: Gaussian pre-smoothing")
    min_size: int = _f(50, lo=1, help="felzenszwalb: smallest segment in pixels")
    n_segments: int = _f(64, lo=2, help="slic: about this many segments")
    compactness: float = _f(10.0, lo=0.01, help="slic: colour vs. space weight")
    grid: int = _f(5, lo=1, hi=64, help="pixel sorting: k-means per image from a grid x grid initialisation")
    iterations: int = _f(10, lo=1, hi=1000, help="pixel sorting: spherical k-means iterations")


@dataclass
class EvalConfig:
    crf: bool = _f(True)
    probe: bool = _f(True, help="linear probe trained on training-split labels")
    probe_epochs: int = _f(50, lo=1)
    probe_pixels_per_image: int = _f(400, lo=1)
    batch_size: int = _f(8, lo=1)
    overlays: int = _f(6, lo=0, hi=64)
    workers: int = _f(2, lo=1, help="scoring actors")
    retrieval: bool = _f(True, help="k-means segments per image, labelled by the k nearest training prototypes")
    retrieval_k: int = _f(15, lo=1, help="nearest labelled training prototypes that vote")
    image_size: int = _f(0, lo=0, hi=4096, help="evaluation input: each image's short side resized to this, the "
                                                "centred square kept (STEGO's, HP's and PiCIE's released evaluation: "
                                                "320); 0 = data.image_size")

    def protocol(self, cfg, crf: bool, probe: bool, retrieval: bool) -> str:
        """The evaluation protocol of ``cfg`` in one line (``raysseg evaluate`` prints it)."""
        size = self.image_size or cfg.data.image_size
        parts = [f"config {cfg.name}", f"{size} px (short side resized, centred square)",
                 f"{cfg.n_clusters} clusters (k-means after training) Hungarian-matched to {cfg.data.n_classes} "
                 "classes, unmatched clusters' pixels counted wrong",
                 "dense CRF (10 iterations, STEGO's and HP's kernels) on each variant" if crf else "no CRF"]
        if probe:
            parts.append(f"linear probe fitted after training (Adam, {self.probe_epochs} epochs over "
                         f"{self.probe_pixels_per_image} pixels per training image)")
        if retrieval:
            parts.append(f"retrieval ({self.retrieval_k} nearest training prototypes vote)")
        return "; ".join(parts)


@dataclass
class MlflowConfig:
    experiment: str = _f("raysseg")
    tracking_uri: str = _f("", help="empty = $MLFLOW_TRACKING_URI or sqlite:///mlruns.db")


class _ConfigMethods:
    """The methods of :class:`Config` (whose fields come partly from the method registry)."""

    @property
    def n_clusters(self) -> int:
        return self.kmeans.n_clusters or self.data.n_classes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 5e-4, ...}`` for MLflow params."""
        out = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out

    def run_name(self) -> str:
        """The run's identity: the same settings give the same name, so a rerun resumes.

        The hash covers the generic sections and this run's own method's sections only, so a default of
        one method never renames another's runs. A run started under the earlier name (every method's
        section hashed) keeps it: when its folder exists under ``train.storage``, that name is used."""
        if self.train.run_name:
            return self.train.run_name
        name = f"{self.name}-{_digest(self._named_settings(own_method_only=True))}"
        legacy = self.legacy_run_name()
        storage = self.train.storage if "://" in self.train.storage else str(Path(self.train.storage).resolve())
        return legacy if legacy != name and _run_exists(storage, legacy) else name

    def legacy_run_name(self) -> str:
        """The name runs had before names hashed only their own method: every section known then."""
        settings = {k: v for k, v in self._named_settings(own_method_only=False).items()
                    if k.split(".")[0] in LEGACY_SECTIONS}
        return f"{self.name}-{_digest(settings)}"

    def _named_settings(self, own_method_only: bool) -> dict[str, Any]:
        """The settings a run's name hashes: not the operational ones, nor added ones at their default."""
        operational = ("eval.", "mlflow.", "pretrain.", "train.log_every", "train.checkpoint", "train.max_restarts",
                       "train.compile", "data.cache", "data.cpus", "data.max_pixels")
        own = {name for name, _ in spec(self.method).sections}
        method_sections = {name for name, _ in config_sections()}
        settings = {}
        for k, v in self.flat().items():
            section = k.split(".")[0]
            if k.startswith(operational) or (own_method_only and section in method_sections - own):
                continue
            settings[k] = v
        for key, default in ADDED_SETTINGS.items():  # named only away from their default: older runs keep their names
            if settings.get(key) == default:
                settings.pop(key)
        return settings


def _digest(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=64)
def _run_exists(storage: str, run_name: str) -> bool:
    """Whether ``storage`` (a URI or an absolute path) holds a folder for ``run_name`` (asked once per
    process and name)."""
    from raysseg.io.storage import StorageError, exists, join

    try:
        return exists(join(storage, run_name))
    except StorageError:
        return False


# The sections every run name hashed before names hashed only their own method (commit be9ce12). A
# section added later (a new method's) never enters a legacy name, so such runs keep resolving.
LEGACY_SECTIONS = ("name", "method", "data", "model", "train", "kmeans", "hp", "pgg", "segsort", "concepts",
                   "segments")


# Settings added after runs existed that change what a run computes: hashed into the run name only
# when set away from these defaults.
ADDED_SETTINGS = {"train.precision": "fp32", "hp.loss_form": "paper", "concepts.restart_after": 0,
                  "pgg.output_stride": 8, "segsort.min_cells": 1, "train.trunk_lr_scale": 1.0,
                  "train.optimizer": "adam", "train.lr_schedule": "constant",
                  "model.freeze_bn": False, "hp.selection": "fp32"}


def _section(name: str, cls: type) -> tuple[str, type, Any]:
    return name, cls, field(default_factory=cls)


# A run's whole configuration: the generic sections and every method's own (methods/<name>/spec.py).
Config = dataclasses.make_dataclass("Config", [
    ("name", str, _f("custom")),
    ("method", str, _f("kmeans", choices=tuple(METHODS))),
    _section("data", DataConfig), _section("model", ModelConfig), _section("train", TrainConfig),
    _section("kmeans", KMeansConfig),
    *(_section(name, cls) for name, cls in config_sections()),
    _section("segments", SegmentsConfig), _section("eval", EvalConfig), _section("mlflow", MlflowConfig),
], bases=(_ConfigMethods,), namespace={"__module__": __name__})


def available(package: str) -> list[str]:
    """Names of the YAML files shipped in ``package`` (``raysseg.configs``, ``raysseg.sweeps``)."""
    return sorted(p.name[:-5] for p in resources.files(package).iterdir() if p.name.endswith(".yaml"))


def available_configs() -> list[str]:
    return available("raysseg.configs")


def yaml_error_line(kind: str, path: str, error: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: the file, line and column (1-based) and what the parser expected."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else path
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} started at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return f"{kind} file {where}: not valid YAML: {problem}; fix the syntax there"


def read_named_yaml(name_or_path: str, package: str, kind: str) -> tuple[str, dict]:
    """(name, mapping) of a YAML path or of a built-in ``<package>/<name>.yaml``; errors name the ``kind``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{kind} file {path} does not exist")
        text, name = path.read_text(), path.stem
    else:
        res = resources.files(package) / f"{name_or_path}.yaml"
        if not res.is_file():
            known = available(package)
            hint = difflib.get_close_matches(name_or_path, known, n=1)
            raise ConfigError(
                f"unknown {kind} {name_or_path!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (built-in: {', '.join(known)}; or give a .yaml path)"
            )
        text, name, path = res.read_text(), name_or_path, res
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_line(kind, str(path), e)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{kind} {name_or_path}: top level must be a mapping")
    return name, raw


def _read_yaml(name_or_path: str) -> tuple[str, dict]:
    name, raw = read_named_yaml(name_or_path, "raysseg.configs", "config")
    raw.setdefault("name", name)
    return name, raw


def _coerce(key: str, value: Any, typ: type, meta: dict) -> Any:
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, str):  # YAML reads 1e30 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
    elif typ is str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            value = str(value)
    elif typ is list or get_origin(typ) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: {value} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value} is above the maximum {hi}")
    return value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            where = f"{prefix}{key}"
            raise ConfigError(
                f"unknown config key {where!r}" + (f"; did you mean '{prefix}{hint[0]}'?" if hint else "")
            )
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            values[key] = _build(typ, value, f"{prefix}{key}.")
        else:
            values[key] = _coerce(f"{prefix}{key}", value, typ, fields[key].metadata)
    return cls(**values)


def _set_key(raw: dict, key: str, value: Any, where: str) -> None:
    """Set dotted ``key`` in a raw config mapping (unknown keys are caught later by ``_build``)."""
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part} is not a section")
    node[parts[-1]] = value


def _apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    _set_key(raw, key, value, f"--set {key}")


def _check_consistency(cfg: Config) -> None:
    named = weights_lookup(cfg.model.weights)
    if named is not None and named.backbone != cfg.model.backbone:
        raise ConfigError(f"model.weights: {named.name} fits backbone {named.backbone}, not {cfg.model.backbone}; "
                          f"set model.backbone={named.backbone} or name other weights (`raysseg weights list`)")
    multiple = input_multiple(cfg.model.backbone)
    if cfg.data.image_size % multiple:
        raise ConfigError(
            f"data.image_size: {cfg.data.image_size} is not a multiple of {multiple}, the stride of {cfg.model.backbone}"
        )
    if cfg.data.class_names and len(cfg.data.class_names) != cfg.data.n_classes:
        raise ConfigError(
            f"data.class_names: {len(cfg.data.class_names)} names for data.n_classes = {cfg.data.n_classes}"
        )
    t, m = cfg.train, cfg.model
    trunk_keys = {"train.optimizer": t.optimizer != "adam", "train.lr_schedule": t.lr_schedule != "constant",
                  "train.trunk_lr_scale": t.trunk_lr_scale != 1.0, "model.freeze_bn": m.freeze_bn}
    for key in (k for k, changed in trunk_keys.items() if changed):
        if not spec(cfg.method).trains_trunk:
            raise ConfigError(f"{key}: {cfg.method} has its own optimiser settings and ignores it; leave it out")
        if m.frozen and key in ("train.trunk_lr_scale", "model.freeze_bn"):
            raise ConfigError(f"{key}: model.frozen is true, so the whole backbone is fixed already; "
                              f"set model.frozen=false or leave {key} out")
    spec(cfg.method).check_config(cfg)


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = (), resolve_paths: bool = True) -> Config:
    """Load a built-in config by name (``hp_camvid``) or a YAML path, then apply overrides.
    ``resolve_paths=False`` keeps local paths as written (``raysseg.apps.submit`` decides what they become)."""
    _, raw = _read_yaml(name_or_path)
    for assignment in overrides:
        _apply_override(raw, assignment)
    return _validated(raw, resolve_paths)


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted keys set (``{"hp.tau": 0.6}``), validated like a loaded config."""
    raw = cfg.to_dict()
    for key, value in values.items():
        _set_key(raw, key, value, key)
    return _validated(raw)


def with_data_settings(raw: dict, assignments: list[str] | tuple[str, ...]) -> dict:
    """A checkpoint's stored config ``raw`` with ``data.KEY=VALUE`` assignments (``evaluate --set``) over it, as
    a new mapping. The model stays the checkpoint's: its clusters too (``kmeans.n_clusters`` is pinned where it
    followed ``data.n_classes``), and a key outside ``data`` is refused with one line."""
    raw = json.loads(json.dumps(raw))
    n_clusters = config_from_dict(raw).n_clusters
    for assignment in assignments:
        if not assignment.strip().startswith("data."):
            raise ConfigError(f"--set {assignment}: evaluate takes data settings only (data.KEY=VALUE, e.g. "
                              "data.n_classes=12); the model's settings are the checkpoint's")
        _apply_override(raw, assignment)
    raw.setdefault("kmeans", {})["n_clusters"] = n_clusters
    cfg = _build(Config, raw, "")
    _check_consistency(cfg)
    for name in ("train", "val"):  # a split given here is a path from here
        value = getattr(cfg.data, name)
        if is_local_path(value):
            setattr(cfg.data, name, str(Path(value).expanduser().absolute()))
    return cfg.to_dict()


def _validated(raw: dict, resolve_paths: bool = True) -> Config:
    cfg = _build(Config, raw, "")
    _check_consistency(cfg)
    if resolve_paths:
        _resolve_paths(cfg)
    return cfg


# Settings that name a file or folder. Local ones are made absolute when a config is loaded, and
# jobs/submit.sh makes them absolute or refuses them before a job reaches a cluster (raysseg.apps.submit).
PATH_KEYS = ("data.train", "data.val", "data.cache", "train.storage", "model.weights")
RAY_UPLOAD_PREFIX = "_ray_pkg_"  # Ray unpacks a job's --working-dir into .../_ray_pkg_<hash>/


def is_local_path(value: str) -> bool:
    """Whether a path setting names a file or folder on this machine (not s3://, runs:/, models:/)."""
    return bool(value) and "://" not in value and not value.startswith(("runs:/", "models:/"))


def local_paths(cfg: Config) -> dict[str, str]:
    """``{key: value}`` of the :data:`PATH_KEYS` that are local paths (data.cache: not '' or 'auto')."""
    out = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if is_local_path(value) and not (key == "data.cache" and value == "auto") and not (
                key == "model.weights" and weights_lookup(value) is not None):
            out[key] = value
    return out


def in_ray_upload(cwd: Path | None = None) -> bool:
    """Whether ``cwd`` (default: the working directory) is inside the folder Ray unpacked a job's upload into."""
    return any(part.startswith(RAY_UPLOAD_PREFIX) for part in (cwd or Path.cwd()).parts)


def _resolve_paths(cfg: Config) -> None:
    """Local paths become absolute: Ray workers and sweep trials run in other folders.
    A local ``model.weights`` must exist. Inside a Ray job's uploaded working directory a relative
    path is an error: it would name a temporary folder that lacks .gitignored files like data/."""
    for key, value in local_paths(cfg).items():
        path = Path(value).expanduser()
        if not path.is_absolute() and in_ray_upload():
            raise ConfigError(
                f"{key}={value} is relative, and this job's working directory {Path.cwd()} is Ray's temporary "
                "upload of the repository (without .gitignored files like data/): submit with jobs/submit.sh, "
                "which makes local paths absolute for a cluster on this machine, or use s3://... or an absolute "
                "path the nodes share")
        section, name = key.split(".")
        if key == "model.weights":
            if not path.is_file():
                close = weights_close_names(value)
                hint = f"did you mean {', '.join(close)}? or give" if close else "give a weights name (`raysseg " \
                    "weights list`),"
                raise ConfigError(f"model.weights: {value} does not exist; {hint} a backbone checkpoint file or an "
                                  "s3:// URI")
            path = path.resolve()
        setattr(getattr(cfg, section), name, str(path.absolute()))


def config_from_dict(raw: dict) -> Config:
    """Rebuild a config stored in a checkpoint (validated like any other)."""
    return _build(Config, raw, "")
