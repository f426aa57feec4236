"""Checks of a run's inputs that need no Ray: done by every runner before it starts anything."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from raysseg.io import storage
from raysseg.io.images import (
    BadFileError, DatasetError, SplitListing, _decoded, check_label_values, decode_label, list_split,
)
from raysseg.io.prepared import PreparedSplit, check_setting, prepare
from raysseg.methods.registry import output_stride, spec
from raysseg.settings import ConfigError


_REPORTED: set[str] = set()  # splits whose left-out files this process has named already (a sweep checks many)


def report_left_out(split_uri: str, split: SplitListing) -> None:
    """One warning line naming the files under ``images/`` that are not read, once per split and process."""
    if split.n_left_out and split_uri not in _REPORTED:
        _REPORTED.add(split_uri)
        print(f"warning: {split_uri}: {split.left_out_line()}", flush=True)


def check_inputs(cfg) -> int:
    """Everything that can be checked before training starts; returns the training image count."""
    return check_training(cfg)[0]


def check_training(cfg) -> tuple[int, SplitListing]:
    """:func:`check_inputs`, returning (the training image count, the training split's listing): the one
    listing of the command, which the runner passes on to the cache (:func:`prepared_split`), the plan and
    the readers (:func:`run_plan`)."""
    from raysseg.io.weights import ensure

    ensure(cfg.model.weights)  # a weights name is fetched (and checked) now, or one line says where to put it
    try:
        check_setting(cfg.data.cache)
    except DatasetError as exc:
        raise ConfigError(str(exc)) from None
    split = list_split(cfg.data.train)
    report_left_out(cfg.data.train, split)
    n = min(len(split), cfg.data.limit) if cfg.data.limit else len(split)
    per_worker = n // cfg.train.num_workers
    if spec(cfg.method).trainer and per_worker < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} images per worker but only {per_worker} per worker "
            f"({n} images, {cfg.train.num_workers} workers); lower train.batch_size or train.num_workers"
        )
    spec(cfg.method).check_inputs(cfg, n)
    return n, split


def prepared_split(cfg, run=None, listing: SplitListing | None = None) -> PreparedSplit | None:
    """The prepared-data cache of the training split (``data.cache``), built first if there is none for the
    split as it is now (``run``: see :func:`raysseg.io.prepared.prepare`; ``listing``: the split's, from
    :func:`check_training`); None when ``data.cache`` is off."""
    if not cfg.data.cache:
        return None
    return prepare(cfg.data.train, cfg.data.image_size, cfg.data.cache, run=run, listing=listing)


def run_plan(cfg, prepared: PreparedSplit | None = None, run=None,
             listing: SplitListing | None = None) -> tuple[dict, dict[str, dict]]:
    """(the method's plan, computed once for every worker; every dataset the run reads, name ->
    reading options of :func:`raysseg.io.images.read_plan` plus ``shuffle``): ``cluster``, the
    training split centre-cropped, and the method's own. With ``prepared`` (:func:`prepared_split`)
    every one of them reads that cache. The method's precomputed tables are read or built first
    (:mod:`raysseg.engine.tables`; ``run``: how their jobs run) and reach its datasets as ``plan["tables"]``.
    ``listing`` (the training split's, from :func:`check_training`; listed here when not given) reaches the
    plan and every reader."""
    from raysseg.engine.tables import build_tables

    if listing is None or listing.uri != cfg.data.train:
        listing = list_split(cfg.data.train)
    files = listing.images  # a compact sequence of URIs, made one at a time
    files = files[: cfg.data.limit] if cfg.data.limit else files
    method = spec(cfg.method)
    plan = method.plan(cfg, files, (cfg.data.image_size // output_stride(cfg)) ** 2) if method.plan else {}
    tables = build_tables(cfg, prepared, run, listing)
    if tables:
        plan["tables"] = tables
    common = {"image_size": cfg.data.image_size, "with_labels": False, "limit": cfg.data.limit or None,
              "listing": listing}
    if prepared is not None:
        common["prepared"] = prepared
    wanted = {"cluster": {"train": False}, **method.datasets(cfg, plan)}
    return plan, {name: {**common, **options} for name, options in wanted.items()}


LABEL_SAMPLE = 200  # label files read before a run starts; the rest are checked as evaluation reads them
LABEL_THREADS = 16


def _label_values(pair: tuple[str, str], settings, n_classes: int, ignore_index: int) -> tuple[str, list[int]] | None:
    """(label URI, its values outside the classes) when it holds any, else None; unreadable files are left to
    the evaluation, which skips, counts and lists them."""
    label_uri = pair[1]
    try:
        label = np.asarray(_decoded("label", label_uri, settings, decode_label))
    except BadFileError:
        return None
    if check_label_values(label, n_classes, ignore_index) is None:
        return None
    values = np.unique(label)
    return label_uri, [int(v) for v in values if (v < 0 or v >= n_classes) and v != ignore_index]


def check_labels(split_uri: str, n_classes: int, ignore_index: int, sample: int = LABEL_SAMPLE,
                 listing: SplitListing | None = None) -> SplitListing:
    """Check a labelled split before anything starts; returns its listing (``listing``: the split's, when
    the caller has it), with its labels.

    Pairing (every image has a label at the same relative path) is checked for every file, from the listing.
    Label values are checked on an evenly spaced sample of at most ``sample`` label files (all of them in
    smaller splits), read by ``LABEL_THREADS`` threads; the rest are checked as the evaluation reads them,
    where a bad file is skipped, counted and listed. A sampled label holding a value outside
    ``0..n_classes-1`` other than ``ignore_index`` raises one DatasetError line with the count, the first
    files and the fix."""
    split = (listing if listing is not None and listing.uri == split_uri else list_split(split_uri)).with_labels()
    step = max(1, -(-len(split) // sample))
    picked = [(split.images[i], split.labels[i]) for i in range(0, len(split), step)][:sample]
    settings = storage.s3_settings() if storage.is_s3(split_uri) else None
    with ThreadPoolExecutor(max_workers=min(LABEL_THREADS, len(picked))) as pool:
        bad = [b for b in pool.map(lambda p: _label_values(p, settings, n_classes, ignore_index), picked) if b]
    if bad:
        values = sorted({v for _, vs in bad for v in vs})
        names = ", ".join(uri.rstrip("/").rsplit("/", 1)[-1] for uri, _ in bad[:3]) + (", ..." if len(bad) > 3 else "")
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        hint = f" (e.g. --set data.n_classes={max(values) + 1})" if max(values) < 1000 else ""
        raise DatasetError(
            f"{split_uri}: {len(bad)} of {len(picked)} label files checked hold values [{shown}] outside "
            f"0..{n_classes - 1} (ignore_index {ignore_index}) (first: {names}): set data.n_classes{hint} "
            "or data.ignore_index to match the labels, or fix those files"
        )
    return split


def check_evaluation(cfg, split_uri: str, probe: bool, retrieval: bool, retrieval_asked: bool = True,
                     probe_train: str = "") -> bool:
    """Check what an evaluation of ``split_uri`` reads, before anything starts; returns whether retrieval
    stays on (:func:`evaluation_inputs`)."""
    return evaluation_inputs(cfg, split_uri, probe, retrieval, retrieval_asked, probe_train).retrieval


@dataclass(frozen=True)
class EvaluationInputs:
    """What an evaluation reads, checked: whether retrieval stays on, and the one listing of each split it
    reads (``train``: the labelled training split of the probe and retrieval, None when neither runs)."""

    retrieval: bool
    split: SplitListing
    train: SplitListing | None


def evaluation_inputs(cfg, split_uri: str, probe: bool, retrieval: bool, retrieval_asked: bool = True,
                      probe_train: str = "") -> EvaluationInputs:
    """Check what an evaluation of ``split_uri`` reads, before anything starts (:func:`check_labels`), listing
    each split once. The linear probe and retrieval read the labels of ``probe_train`` (default: the
    config's training split): when it has none that fit, retrieval on only by default (``retrieval_asked``
    False, no probe) is left out with a warning, anything else is one DatasetError line that names
    ``--probe-train SPLIT`` and ``--no-probe --no-retrieval``."""
    split = check_labels(split_uri, cfg.data.n_classes, cfg.data.ignore_index)
    report_left_out(split_uri, split)
    if not (probe or retrieval):
        return EvaluationInputs(retrieval, split, None)
    train = probe_train or cfg.data.train
    try:
        train_split = split if train == split_uri else check_labels(train, cfg.data.n_classes, cfg.data.ignore_index)
    except (DatasetError, storage.StorageError) as exc:
        if retrieval and not probe and not retrieval_asked:
            print(f"warning: retrieval left out: it needs the training split's labels ({exc})", flush=True)
            return EvaluationInputs(False, split, None)
        uses = " and ".join(u for u, on in (("linear probe", probe), ("retrieval", retrieval)) if on)
        raise DatasetError(f"the {uses} read the labelled training split {train}, which is not usable ({exc}); "
                           f"name one that is with `raysseg evaluate --probe-train SPLIT`, or score {split_uri} "
                           "without it with --no-probe --no-retrieval") from None
    return EvaluationInputs(retrieval, split, train_split)
