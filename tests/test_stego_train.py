"""STEGO's KNN table (built by parallel jobs, stored, resumed) and its partner rows; a Ray Train run (slow).
Three in-process training steps are in tests/test_local.py (every trained method)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from raysseg.config import load_config


def stego_config(tmp_path: Path, synth_data: Path, *overrides: str):
    return load_config("stego_camvid", [
        f"data.train={synth_data}/train", f"data.val={synth_data}/val", "data.image_size=64", "data.n_classes=5",
        "data.ignore_index=255", "data.class_names=[]", f"train.storage={tmp_path}/runs",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db", "stego.neighbours=3", "stego.points=4",
        "model.code_dim=16", "kmeans.pixels_per_image=16", "train.log_every=1", *overrides])


def test_knn_table_is_built_in_chunks_stored_resumed_and_equals_the_neighbours(tmp_path, synth_data, monkeypatch):
    from raysseg.engine import tables
    from raysseg.io.images import read_plan
    from raysseg.methods.registry import build_segmenter
    from raysseg.methods.stego.spec import knn_vectors

    monkeypatch.setattr(tables, "CHUNK", 3)  # 8 images: 3 vector chunks, 3 row blocks
    cfg = stego_config(tmp_path, synth_data)
    lines = []
    first = tables.build_table(cfg, "knn", log=lines.append)
    assert len(first["paths"]) == 8 and first["rows"].shape == (8, 4)
    folder = Path(tables.table_folder(cfg, "knn", {"columns": 4}, None))
    assert folder.parent.parent == tmp_path / "runs" / "tables"  # the split is not written to
    assert sorted(p.name for p in folder.glob("*.npy")) == [f"{kind}-{i:05d}.npy" for kind in ("rows", "vectors")
                                                          for i in range(3)]

    torch.manual_seed(cfg.train.seed)  # the run's random-init backbone
    seg = build_segmenter(cfg).eval()
    items, decode = read_plan(cfg.data.train, image_size=64, train=False, with_labels=False)
    images = decode({"path": np.array([i["path"] for i in items], dtype=object)})["image"]
    with torch.no_grad():
        vectors = knn_vectors(seg, images)
    sims = (vectors @ vectors.T).numpy()
    want = np.argsort(-sims, axis=1, kind="stable")[:, :4]
    assert [p for p in first["paths"]] == [i["path"] for i in items]
    assert (first["rows"] == want).all() and (first["rows"][:, 0] == np.arange(8)).all()

    (folder / "manifest.json").unlink()  # a build killed before its manifest, with a chunk and a block missing
    (folder / "vectors-00002.npy").unlink()
    (folder / "rows-00001.npy").unlink()
    lines.clear()
    again = tables.build_table(cfg, "knn", log=lines.append)
    assert "(2 done before)" in lines[0] and "(2 done before)" in lines[1], lines
    assert again["paths"] == first["paths"] and (again["rows"] == first["rows"]).all()
    lines.clear()
    tables.build_table(cfg, "knn", log=lines.append)
    assert lines == [f"[tables] knn: 8 rows read from {folder}"]
    assert tables.table_folder(cfg, "knn", {"columns": 5}, None) != str(folder)  # other settings, another table


def test_rows_carry_a_knn_partner_drawn_per_epoch_from_files_and_from_the_cache(tmp_path, synth_data):
    from raysseg.engine.inputs import prepared_split, run_plan
    from raysseg.engine.local import local_shards

    cfg = stego_config(tmp_path, synth_data)
    plan, reads = run_plan(cfg)
    partners = reads["train"]["partners"]
    assert set(map(len, partners.values())) == {3}  # K neighbours, the image itself left out
    shards = local_shards(cfg, reads)
    centre = {p: im for b in shards["cluster"].iter_batches(8) for p, im in zip(b["path"], b["image"])}

    def epoch_rows(shard, epoch):
        shard.epoch = epoch
        return {p: (q, im) for b in shard.iter_batches(4) for p, q, im in zip(b["path"], b["partner_path"], b["partner"])}

    drawn = [epoch_rows(shards["train"], epoch) for epoch in range(4)]
    for rows in drawn:
        assert set(rows) == set(partners)
        for path, (partner, image) in rows.items():
            assert partner in partners[path] and np.array_equal(image, centre[partner])
    assert len({tuple(sorted((p, q) for p, (q, _) in rows.items())) for rows in drawn}) > 1  # new picks by epoch
    assert {p: q for p, (q, _) in epoch_rows(shards["train"], 1).items()} == {p: q for p, (q, _) in drawn[1].items()}

    cached = stego_config(tmp_path, synth_data, f"data.cache={tmp_path}/cache")
    prepared = prepared_split(cached)
    _, reads_cached = run_plan(cached, prepared)
    assert list((Path(prepared.folder) / "tables").glob("knn-*/manifest.json"))  # beside the prepared shards
    again = epoch_rows(local_shards(cached, reads_cached)["train"], 1)
    assert {p: q for p, (q, _) in again.items()} == {p: q for p, (q, _) in drawn[1].items()}
    for path, (partner, image) in again.items():
        assert np.abs(image.astype(int) - centre[partner].astype(int)).mean() < 3  # resampled from the cache


@pytest.mark.slow
def test_two_ray_workers_train_with_the_table_built_by_ray_tasks(tmp_path, ray_local, synth_data):
    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.runtime.driver import train

    result = train(stego_config(tmp_path, synth_data, "train.num_workers=2", "train.batch_size=2", "train.epochs=1",
                                "train.run_name=stego-test"))
    ckpt = read_checkpoint(result.checkpoint)
    assert ckpt["finished"] and ckpt["progress"]["step"] == 2 and ckpt["progress"]["clustered"]
    assert np.isfinite(result.metrics["loss_total"]) and {"loss_self", "loss_knn", "loss_random"} <= set(result.metrics)
    assert list((tmp_path / "runs" / "tables").glob("*/knn-*/manifest.json"))
