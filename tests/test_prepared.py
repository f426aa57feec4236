"""The prepared-data cache (raysseg.io.prepared): rows as a direct decode gives them, bad images kept as
invalid rows, a new cache when the split or the size changes, half-written caches never read, S3, and
both runners reading it."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from raysseg.io import prepared as prepared_module, storage
from raysseg.io.images import read_plan
from raysseg.io.prepared import MANIFEST, MARGIN, prepare

# A cached image keeps its original pixels when its short side is at most ceil(size * MARGIN): then the
# crops are those of a direct decode exactly. Smaller sizes resample twice (file -> cache -> crop): on the
# synthetic scenes (hard edges) that moves pixels by about 2-3 grey levels on average.
MEAN_ABS_TOLERANCE = 4.0


def _split(synth_data: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic training images (8 PNGs of 64x48): the shared one stays untouched."""
    split = tmp_path / "split"
    shutil.copytree(synth_data / "train" / "images", split / "images")
    return split


def _rows(items: list[dict], fn) -> dict:
    return fn({k: np.array([item[k] for item in items], dtype=object) for k in items[0]})


def _both(split: str, prepared, **options) -> tuple[dict, dict]:
    """(rows of a direct decode, rows read from the cache) with the same options."""
    options = {"image_size": prepared.image_size, "with_labels": False, **options}
    return _rows(*read_plan(split, **options)), _rows(*read_plan(split, prepared=prepared, **options))


def _quiet(*_):
    pass


@pytest.mark.parametrize("size", [32, 64])
def test_cached_rows_are_those_of_a_direct_decode(size, synth_data, tmp_path):
    split = str(_split(synth_data, tmp_path))
    prepared = prepare(split, size, str(tmp_path / "cache"), log=_quiet)
    resized = np.ceil(size * MARGIN) < 48  # 48 = the images' short side
    # Crops are seeded from (seed, file path), and the path holds pytest's temporary folder, so one seed's
    # crops differ from run to run (mean moves of 2.2 to 4.1 over 40 folders). Eight seeds average that out.
    train_seeds = [{"train": True, "seed": seed, "crop_scale": (0.3, 1.0)} for seed in range(3, 11)]
    cases = {"centre": [{"train": False}], "crops": train_seeds,
             "segments": [{"train": False, "limit": 5, "segments": {"method": "slic", "n_segments": 8}}]}
    for case, option_list in cases.items():
        diffs = []
        for options in option_list:
            direct, cached = _both(split, prepared, **options)
            assert list(cached["path"]) == list(direct["path"]) and cached["valid"].all() and direct["valid"].all()
            assert cached["image"].shape == direct["image"].shape == (options.get("limit", 8), size, size, 3)
            diffs.append(np.abs(cached["image"].astype(int) - direct["image"].astype(int)))
            if "segments" in options:
                assert cached["segments"].shape == (5, size, size) and cached["segments"].max() > 0
        if resized:
            assert 0 < np.mean([d.mean() for d in diffs]) <= MEAN_ABS_TOLERANCE, case
        else:
            assert max(d.max() for d in diffs) == 0, case
    trained = _rows(*read_plan(split, image_size=size, train=True, with_labels=False, seed=3, prepared=prepared))
    fresh = _rows(*read_plan(split, image_size=size, train=True, with_labels=False, seed=4, prepared=prepared))
    assert not np.array_equal(trained["image"], fresh["image"])  # another seed, other crops


def test_bad_images_are_invalid_rows_counted_and_listed(synth_data, tmp_path):
    split = _split(synth_data, tmp_path)
    good = sorted((split / "images").glob("*.png"))[0].read_bytes()  # before empty.png exists (tmpfs lists it first)
    (split / "images" / "empty.png").write_bytes(b"")
    (split / "images" / "truncated.png").write_bytes(good[: len(good) // 2])
    lines = []
    prepared = prepare(str(split), 32, "auto", log=lines.append)
    assert sorted(Path(r["path"]).name for r in prepared.invalid) == ["empty.png", "truncated.png"]
    assert any("2 of 10 images do not decode" in line for line in lines)
    again = prepare(str(split), 32, "auto", log=lines.append)  # read back from the manifest
    assert again.folder == prepared.folder and again.invalid == prepared.invalid
    direct, cached = _both(str(split), again, train=False)
    assert list(cached["valid"]) == list(direct["valid"]) and (~cached["valid"]).sum() == 2
    assert list(cached["error"]) == list(direct["error"])  # the same one line, naming the file
    bad = cached["error"][~cached["valid"]]
    assert "empty.png: empty file" in bad[0] and "truncated.png: truncated" in bad[1]
    assert (cached["image"][~cached["valid"]] == 0).all()


def test_a_changed_split_or_size_builds_a_new_cache(synth_data, tmp_path):
    split = _split(synth_data, tmp_path)
    images = sorted((split / "images").iterdir())
    lines = []

    def folder(size: int = 32) -> str:
        return prepare(str(split), size, "auto", log=lines.append).folder

    first = folder()
    assert folder() == first and "reading 8 prepared images" in lines[-1]  # unchanged: reused
    assert Path(first).parent == split / ".raysseg-cache"
    assert folder(64) != first  # another image size
    shutil.copy(images[0], split / "images" / "added.png")
    added = folder()
    assert added != first and len(prepare(str(split), 32, "auto", log=_quiet).rows) == 9
    os.remove(split / "images" / "added.png")
    assert folder() == first  # the split as it was: its cache again
    images[1].write_bytes(images[2].read_bytes())  # changed content (and size)
    changed = folder()
    assert changed not in (first, added)
    stat = images[3].stat()
    os.utime(images[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, newer mtime
    assert folder() not in (first, added, changed)


def test_a_half_written_cache_is_never_read(synth_data, tmp_path):
    split = str(_split(synth_data, tmp_path))
    prepared = prepare(split, 32, str(tmp_path / "cache"), log=_quiet)
    manifest = Path(prepared.folder) / MANIFEST
    shard = Path(prepared.folder) / json.loads(manifest.read_text())["shards"][0]["name"]
    lines = []
    manifest.unlink()  # shards written, manifest not yet: built again
    prepare(split, 32, str(tmp_path / "cache"), log=lines.append)
    assert "decoding 8 images" in lines[0] and manifest.exists()
    shard.write_bytes(shard.read_bytes()[:-100])  # a damaged shard: built again
    lines.clear()
    rebuilt = prepare(split, 32, str(tmp_path / "cache"), log=lines.append)
    assert "wrong size" in lines[0] and "decoding 8 images" in lines[1]
    direct, cached = _both(split, rebuilt, train=False)
    assert np.abs(cached["image"].astype(int) - direct["image"].astype(int)).mean() <= MEAN_ABS_TOLERANCE


def test_pseudo_segments_of_centre_crops_are_computed_once_and_cached(synth_data, tmp_path):
    from raysseg.core.segments import oversegment

    split = str(_split(synth_data, tmp_path))
    shutil.copy(Path(__file__).parent / "__init__.py", Path(split) / "images" / "not_an_image.png")  # one bad file
    said = []
    prepared = prepare(split, 32, str(tmp_path / "cache"), log=_quiet)
    segments = {"method": "felzenszwalb", "scale": 50.0, "sigma": 0.5, "min_size": 10}
    options = {"image_size": 32, "train": False, "with_labels": False, "segments": segments}
    plain = _rows(*read_plan(split, prepared=prepared, **options))  # builds the segments cache
    bad = np.array([str(p).endswith("not_an_image.png") for p in plain["path"]])
    assert np.array_equal(plain["valid"], ~bad)
    for image, ids in zip(plain["image"][~bad], plain["segments"][~bad]):
        assert np.array_equal(ids, oversegment(image, **segments))  # what computing them in the read gives
    folder = prepared_module.segments_folder(prepared, segments)
    assert storage.exists(f"{folder}/{MANIFEST}")
    prepared_module.prepare_segments(prepared, segments, log=said.append)
    assert said == []  # cached: nothing computed again
    (Path(folder) / "shard-00000.npy").write_bytes(b"torn")  # a damaged shard is computed again
    prepared_module.prepare_segments(prepared, segments, log=said.append)
    assert any("computing the pseudo segments of 8 centre crops" in line for line in said)
    assert np.array_equal(_rows(*read_plan(split, prepared=prepared, **options))["segments"], plain["segments"])
    other = {**segments, "scale": 200.0}
    assert prepared_module.segments_folder(prepared, other) != folder


def test_s3_round_trip(s3_server, synth_data, tmp_path, monkeypatch):
    bucket = "prep-" + uuid.uuid4().hex[:8]
    s3_server.create_bucket(bucket)
    local = str(_split(synth_data, tmp_path))
    remote = f"s3://{bucket}/synth/train"
    storage.copy_tree(local, remote)
    on_s3 = prepare(remote, 32, "auto", log=_quiet)  # split and cache on S3
    assert on_s3.folder.startswith(f"{remote}/.raysseg-cache/32px-")
    assert storage.exists(f"{on_s3.folder}/{MANIFEST}")
    assert prepare(remote, 32, "auto", log=_quiet).folder == on_s3.folder  # found again on S3
    in_folder = prepare(local, 32, str(tmp_path / "cache"), log=_quiet)
    options = {"image_size": 32, "with_labels": False, "train": False}
    from_s3 = _rows(*read_plan(remote, prepared=on_s3, **options))
    from_folder = _rows(*read_plan(local, prepared=in_folder, **options))
    assert np.array_equal(from_s3["image"], from_folder["image"]) and from_s3["valid"].all()
    direct, cached = _both(remote, on_s3, train=True, seed=5)  # crops are seeded by (seed, URI)
    assert np.abs(cached["image"].astype(int) - direct["image"].astype(int)).mean() <= MEAN_ABS_TOLERANCE
    mixed = type(on_s3)(on_s3.split, 32, on_s3.folder, on_s3.rows[::-2])  # out of order, with gaps
    merged = (prepared_module.S3_PIECE_BYTES, prepared_module.S3_GAP_BYTES)
    for piece, gap in (merged, (1, 0)):  # rows merged into one request; one request per row
        monkeypatch.setattr(prepared_module, "S3_PIECE_BYTES", piece)
        monkeypatch.setattr(prepared_module, "S3_GAP_BYTES", gap)
        assert np.array_equal(_rows(*read_plan(remote, prepared=mixed, **options))["image"], from_s3["image"][::-2])
    local_split_s3_cache = prepare(local, 32, f"s3://{bucket}/caches", log=_quiet)  # a local split, cached on S3
    assert local_split_s3_cache.folder.startswith(f"s3://{bucket}/caches/32px-")
    assert np.array_equal(_rows(*read_plan(local, prepared=local_split_s3_cache, **options))["image"],
                          from_folder["image"])


def test_data_cache_key_is_checked_before_training(synth_data, tmp_path):
    from raysseg.config import ConfigError
    from raysseg.engine.inputs import check_inputs
    from tests.test_local import small_config

    cfg = small_config("segsort", synth_data, tmp_path, "data.cache=gs://bucket/cache")
    with pytest.raises(ConfigError, match=r"^data.cache: unsupported URI scheme .*use '' \(off\), 'auto'"):
        check_inputs(cfg)
    assert small_config("segsort", synth_data, tmp_path).run_name() == cfg.run_name()  # operational


def test_in_process_training_reads_the_cache(synth_data, tmp_path, capsys):
    from raysseg.engine.inputs import prepared_split, run_plan
    from raysseg.engine.local import LocalShard, train_local
    from tests.test_local import small_config

    cfg = small_config("segsort", synth_data, tmp_path, f"data.cache={tmp_path}/cache")
    result = train_local(cfg)
    assert result.metrics["final"] == 1 and np.isfinite(result.metrics["loss_total"])
    out = capsys.readouterr().out
    assert f"[data cache] decoding 8 images of {synth_data}/train" in out
    prepared = prepared_split(cfg)
    assert "[data cache] reading 8 prepared images" in capsys.readouterr().out
    _, reads = run_plan(cfg, prepared)
    assert set(reads) == {"cluster", "train"} and all(r["prepared"] is prepared for r in reads.values())
    options = dict(reads["train"])
    shuffle = options.pop("shuffle")
    batch = next(LocalShard(*read_plan(cfg.data.train, **options), shuffle=shuffle).iter_batches(batch_size=6))
    assert batch["image"].shape == (6, 64, 64, 3) and batch["segments"].shape == (6, 64, 64)
    assert batch["valid"].all()


def test_ray_builds_and_reads_the_cache(ray_local, synth_data, tmp_path):
    from raysseg.runtime.datasets import make_dataset, run_tasks

    split = str(_split(synth_data, tmp_path))
    prepared = prepare(split, 32, str(tmp_path / "cache"), run=run_tasks, log=_quiet)
    options = {"image_size": 32, "train": True, "with_labels": False, "seed": 2}
    expected = _rows(*read_plan(split, prepared=prepared, **options))
    rows = {}
    for batch in make_dataset(split, prepared=prepared, shuffle=True, **options).iter_batches(batch_size=3):
        rows.update({str(p): image for p, image in zip(batch["path"], batch["image"])})
    assert sorted(rows) == list(expected["path"])
    assert all(np.array_equal(rows[p], image) for p, image in zip(expected["path"], expected["image"]))


@pytest.mark.slow
def test_ray_train_run_builds_and_reads_the_cache(ray_local, synth_data, tmp_path, capsys):
    from raysseg.runtime.driver import train
    from tests.test_local import small_config

    cfg = small_config("segsort", synth_data, tmp_path, f"data.cache={tmp_path}/cache")
    result = train(cfg)
    assert result.metrics["final"] == 1 and np.isfinite(result.metrics["loss_total"])
    assert f"[data cache] decoding 8 images of {synth_data}/train" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob(f"64px-*/{MANIFEST}"))) == 1
    assert len(list((tmp_path / "cache").glob(f"64px-*/segments-*/{MANIFEST}"))) == 1  # built by Ray tasks
