"""Concept browsing: segment geometry, adjacency, concept assignment, relation queries on a
hand-built index, and ``browse`` end to end (learned dictionary and k-means fallback)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from raysseg.apps.browse import (
    QueryError, SegmentIndex, adjacent_pairs, assign_concepts, parse_query, query, segment_geometry,
)

# --------------------------------------------------------------------------- pure logic


def test_adjacent_pairs_share_an_edge_not_a_corner():
    a = np.array([[0, 0, 1, 1],
                  [0, 0, 1, 1],
                  [2, 2, 3, 3],
                  [2, 2, 3, 3]])
    assert adjacent_pairs(a).tolist() == [[0, 1], [0, 2], [1, 3], [2, 3]]  # 0-3 and 1-2 touch at a corner only
    b = np.full((4, 4), 7)
    b[3, 3] = 5
    # a batch: maps are never joined (1 and 7 sit next to each other in memory)
    assert adjacent_pairs(np.stack([a, b])).tolist() == [[0, 1], [0, 2], [1, 3], [2, 3], [5, 7]]
    assert adjacent_pairs(np.zeros((3, 3), int)).shape == (0, 2)


def test_segment_geometry_fractions_of_the_map():
    ids = np.array([[0, 0, 1, 1],
                    [0, 0, 1, 1],
                    [2, 2, 2, 1],
                    [2, 2, 2, 1]])[None]
    area, centroid, box = segment_geometry(ids, 4)
    np.testing.assert_allclose(area, [4 / 16, 6 / 16, 6 / 16, 0])
    np.testing.assert_allclose(centroid[0], [0.25, 0.25])
    np.testing.assert_allclose(centroid[2], [0.75, (0.5 + 1.5 + 2.5) / 3 / 4])
    np.testing.assert_allclose(box[1], [0, 0.5, 1, 1])
    np.testing.assert_allclose(box[2], [0.5, 0, 1, 0.75])
    assert np.isnan(box[3]).all()


def test_assign_concepts_is_nearest_cosine_of_normalised_rows():
    dictionary = np.array([[1, 0, 0], [0, 10, 0], [0, 0, 1]], np.float32)  # row 1 is not unit length
    protos = np.array([[0.8, 0.6, 0], [0, 0.6, 0.8], [0.6, 0.8, 0], [0, 0, 1]], np.float32)
    assert assign_concepts(protos, dictionary).tolist() == [0, 2, 1, 2]


def _hand_index() -> SegmentIndex:
    """Six images; concepts 1 and 2 placed in known ways (y grows downwards), concept 3 unused.

    img0: 1 at the left, 2 at the right, rows overlap          -> 1 left-of 2
    img1: 1 on top, 2 below, columns overlap, adjacent          -> 1 above 2, 1 next-to 2
    img2: 1 top-left, 2 bottom-right, no overlap either way     -> only 1 with 2
    img3: two segments of 1 side by side, adjacent             -> 1 left-of 1, 1 next-to 1
    img4: only 2
    img5: 2 at the left, 1 at the right, adjacent, big segments -> 2 left-of 1, 1 next-to 2
    """
    segs = [  # image, concept, area, (cy, cx), (y0, x0, y1, x1)
        (0, 1, 0.10, (0.5, 0.2), (0.3, 0.1, 0.7, 0.3)),
        (0, 2, 0.05, (0.5, 0.8), (0.4, 0.7, 0.6, 0.9)),
        (1, 1, 0.20, (0.2, 0.5), (0.0, 0.3, 0.4, 0.7)),
        (1, 2, 0.20, (0.7, 0.5), (0.4, 0.4, 1.0, 0.6)),
        (2, 1, 0.16, (0.2, 0.2), (0.0, 0.0, 0.4, 0.4)),
        (2, 2, 0.16, (0.8, 0.8), (0.6, 0.6, 1.0, 1.0)),
        (3, 1, 0.30, (0.5, 0.25), (0.2, 0.0, 0.8, 0.5)),
        (3, 1, 0.30, (0.5, 0.75), (0.2, 0.5, 0.8, 1.0)),
        (4, 2, 1.00, (0.5, 0.5), (0.0, 0.0, 1.0, 1.0)),
        (5, 2, 0.40, (0.5, 0.3), (0.1, 0.0, 0.9, 0.5)),
        (5, 1, 0.40, (0.5, 0.7), (0.1, 0.5, 0.9, 1.0)),
    ]
    return SegmentIndex(
        paths=[f"img{i}" for i in range(6)], image=[s[0] for s in segs], concept=[s[1] for s in segs],
        area=[s[2] for s in segs], centroid=[s[3] for s in segs], box=[s[4] for s in segs],
        pairs=[(2, 3), (6, 7), (9, 10)], n_concepts=4)


@pytest.mark.parametrize("text, expected", [
    ("1 left-of 2", ["img0"]),
    ("2 right-of 1", ["img0"]),
    ("2 left-of 1", ["img5"]),
    ("1 right-of 2", ["img5"]),
    ("1 above 2", ["img1"]),
    ("2 below 1", ["img1"]),
    ("2 above 1", []),
    ("1 below 2", []),
    ("1 next-to 2", ["img5", "img1"]),  # ordered by the smaller area of the best pair
    ("2 NEXT_TO 1", ["img5", "img1"]),
    ("1 with 2", ["img5", "img1", "img2", "img0"]),
    ("1 left-of 1", ["img3"]),
    ("1 right-of 1", ["img3"]),
    ("1 above 1", []),
    ("1 next-to 1", ["img3"]),
    ("1 with 1", ["img3"]),
    ("2 with 2", []),
    ("3 with 1", []),
])
def test_relations_on_a_hand_built_index(text, expected):
    assert query(_hand_index(), text).paths == expected


def test_query_pairs_and_symmetric_pairs_once():
    index = _hand_index()
    r = query(index, "1 with 1")
    assert [m.pairs for m in r.matches] == [[(6, 7)]]
    r = query(index, "1 left-of 1")
    assert [m.pairs for m in r.matches] == [[(6, 7)]]  # s6 is the left one
    assert [m.pairs for m in query(index, "1 right-of 1").matches] == [[(7, 6)]]
    d = query(index, "2 next-to 1").to_dict()
    assert d["n_images"] == 2 and d["matches"][0] == {"path": "img5", "pairs": [[9, 10]]}


@pytest.mark.parametrize("text, message", [
    ("bad", "expected"),
    ("1 left-of", "expected"),
    ("1 near 2", 'unknown relation "near"'),
    ("a left-of 2", '"a" is not a concept id'),
    ("-1 with 2", '"-1" is not a concept id'),
    ("1 left-of 4", "unknown concept 4; this index has concepts 0..3"),
])
def test_query_errors_are_one_line(text, message):
    with pytest.raises(QueryError) as err:
        query(_hand_index(), text)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_parse_query():
    assert parse_query("  12 Left_Of 3 ") == (12, "left-of", 3)
    assert parse_query("12 with 3", n_concepts=13) == (12, "with", 3)


def test_index_save_load_roundtrip(tmp_path):
    index = _hand_index()
    index.meta = {"key": {"a": 1}}
    index.save(tmp_path)
    back = SegmentIndex.load(tmp_path)
    assert back.paths == index.paths and back.meta == index.meta and back.n_concepts == 4
    for name in ("image", "concept", "area", "centroid", "box", "pairs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(index, name))
    assert back.maps is None and back.proto is None


# --------------------------------------------------------------------------- end to end


def _write_checkpoint(path, synth_data, uri, method, run_name):
    import torch
    import torch.nn.functional as F

    from raysseg.io import tracking
    from raysseg.config import load_config
    from raysseg.methods.registry import build_segmenter
    from raysseg.io.checkpoints import save_checkpoint

    cfg = load_config("kmeans_synth", [
        f"method={method}", "model.backbone=resnet18_fpn", "model.frozen=false", "data.image_size=64",
        "concepts.n_concepts=8", f"data.train={synth_data}/train", f"data.val={synth_data}/val",
        "eval.workers=1", "eval.batch_size=4", f"mlflow.tracking_uri={uri}"])
    torch.manual_seed(0)
    seg = build_segmenter(cfg, load_backbone_weights=False)
    if method == "concepts":
        seg.concepts.copy_(F.normalize(torch.randn(8, seg.code_dim), dim=1))
    run_id, _ = tracking.start_or_resume_run(uri, "browse-test", run_name, {})
    save_checkpoint(str(path), seg, run_id=run_id, tracking_uri=uri)
    return seg, run_id


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, synth_data):
    root = tmp_path_factory.mktemp("browse_ckpt")
    uri = f"sqlite:///{root}/mlruns.db"
    out = {"uri": uri}
    for method in ("concepts", "kmeans"):
        seg, run_id = _write_checkpoint(root / f"{method}.pt", synth_data, uri, method, f"browse-{method}")
        out[method] = (str(root / f"{method}.pt"), seg, run_id)
    return out


def test_browse_concepts_checkpoint(ray_local, synth_data, checkpoints, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from raysseg.apps.browse import browse
    from raysseg.io.images import list_split

    ckpt, seg, run_id = checkpoints["concepts"]
    out = tmp_path / "concepts"
    result = browse(ckpt, out=str(out), log_to_mlflow=False)
    files = list_split(f"{synth_data}/train", with_labels=False).images
    assert not result["reused"] and result["source"] == "dictionary" and result["n_concepts"] == 8
    assert "[concepts] indexed 8 images of 8" in capsys.readouterr().out

    index = SegmentIndex.load(out)
    assert sorted(index.paths) == sorted(files) and result["n_images"] == len(files)
    assert np.array_equal(np.unique(index.image), np.arange(len(files)))  # every image has segments
    np.testing.assert_allclose(np.bincount(index.image, weights=index.area), 1.0, rtol=1e-5)
    assert index.maps.shape == (len(files), 16, 16) and index.image_size == 64
    assert (index.image[index.pairs[:, 0]] == index.image[index.pairs[:, 1]]).all()
    np.testing.assert_array_equal(index.concept, assign_concepts(index.proto, seg.concepts.numpy()))
    # the map and the table agree: each segment's cells are where its id is
    s = int(np.argmax(index.area))
    assert index.segment_mask(s, 16).sum() == round(index.area[s] * 256)

    summary = json.loads((out / "concepts.json").read_text())
    assert summary["source"] == "dictionary" and summary["n_segments"] == index.n_segments
    assert sum(c["segments"] for c in summary["concepts"]) == index.n_segments
    assert [c["segments"] for c in summary["concepts"]] == sorted((c["segments"] for c in summary["concepts"]),
                                                                   reverse=True)
    for c in summary["concepts"]:
        assert 1 <= c["images"] <= len(files) and 1 <= len(c["examples"]) <= min(5, c["images"])
        assert c["segments"] == int((index.concept == c["id"]).sum()) and set(c["examples"]) <= set(files)

    gallery = np.asarray(Image.open(out / "gallery.png"))
    n_cols = min(16, summary["used_concepts"])
    assert gallery.shape[2] == 3 and gallery.shape[0] > 6 * 96 and gallery.shape[1] >= min(360, n_cols * 100)
    assert gallery.std() > 10
    tsne = np.asarray(Image.open(out / "tsne.png"))
    assert tsne.shape[:2] == (900, 900) and tsne.std() > 10

    # a second call reuses the index and logs to MLflow; the most frequent concept with itself has matches
    top = summary["concepts"][0]["id"]
    again = browse(ckpt, out=str(out), queries=[f"{top} with {top}", f"{top} next-to {top}"])
    assert again["reused"] and again["n_segments"] == index.n_segments
    q = again["queries"][0]
    assert q["n_images"] == len(query(index, f"{top} with {top}").matches) > 0
    assert Image.open(out / "query_1.png").size[0] >= 400
    saved = json.loads((out / "queries.json").read_text())
    assert saved[0]["query"] == f"{top} with {top}" and saved[0]["n_images"] == q["n_images"]

    client = MlflowClient(checkpoints["uri"])
    logged = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "concepts/train")}
    assert {"gallery.png", "tsne.png", "concepts.json", "queries.json", "query_1.png"} <= logged


@pytest.mark.slow  # ~11 s; the concepts checkpoint test covers the command
def test_browse_kmeans_fallback(ray_local, checkpoints, tmp_path, capsys):
    from raysseg.apps.browse import browse

    ckpt, _, _ = checkpoints["kmeans"]
    out = tmp_path / "kmeans"
    result = browse(ckpt, out=str(out), n_concepts=5, limit=4, log_to_mlflow=False)
    printed = capsys.readouterr().out
    assert result["source"] == "kmeans" and result["n_concepts"] == 5 and result["n_images"] == 4
    assert "spherical k-means" in printed and "no concept dictionary" in printed
    summary = json.loads((out / "concepts.json").read_text())
    assert summary["source"] == "kmeans" and "no concept dictionary" in summary["note"]
    counts = [c["segments"] for c in summary["concepts"]]
    assert [c["id"] for c in summary["concepts"]] == list(range(len(counts)))  # k-means ids by frequency
    with pytest.raises(QueryError, match="unknown concept 5"):
        browse(ckpt, out=str(out), n_concepts=5, limit=4, queries=["5 with 0"], log_to_mlflow=False)


def test_cli_errors_are_one_line(checkpoints, tmp_path, capsys):
    from raysseg.apps.cli import main

    ckpt = checkpoints["concepts"][0]
    for argv, message in ((["--checkpoint", ckpt, "--query", "bad"], 'query "bad": expected'),
                          (["--checkpoint", str(tmp_path / "nope.pt"), "--query", "1 with 2"], "not found"),
                          (["--checkpoint", ckpt, "--query", "99 with 1"], "unknown concept 99"),
                          (["--checkpoint", ckpt, "--limit", "0"], "--limit")):
        with pytest.raises(SystemExit) as exit_:
            main(["concepts", "--out", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and message in err[0], err
