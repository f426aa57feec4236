"""Retrieval evaluation (k-means segments + kNN vote of labelled training prototypes):
the pure functions on hand-computed cases, then ``evaluate`` end to end on the synthetic data."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysseg.core.metrics import EvalInputError, knn_vote, segment_majority_labels, upsample_nearest


def test_upsample_nearest_reads_pixel_centres():
    ids = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(upsample_nearest(ids, (4, 6)), [[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2)
    # 3 -> 5 rows: centres 0.5..4.5 of the output fall at 0.3, 0.9, 1.5, 2.1, 2.7 of the input
    col = np.array([[0], [1], [2]])
    np.testing.assert_array_equal(upsample_nearest(col, (5, 1))[:, 0], [0, 0, 1, 2, 2])
    ref = F.interpolate(torch.arange(12.0).view(1, 1, 3, 4), size=(7, 9), mode="nearest-exact")[0, 0]
    np.testing.assert_array_equal(upsample_nearest(np.arange(12).reshape(3, 4), (7, 9)), ref.long().numpy())


def test_segment_majority_labels_hand_case():
    # segments at feature resolution (2, 2); the label is (4, 4): each segment cell covers 2x2 pixels
    ids = np.array([[0, 1],
                    [2, 2]])
    label = np.array([[1, 1, 0, 9],
                      [1, 0, 9, 9],     # segment 1: one 0 and three ignore (9) -> 0
                      [2, 2, 2, 1],
                      [7, 1, 1, 1]])    # segment 2: three 2s, four 1s, one 7 (outside [0, 3)) -> 1
    out = segment_majority_labels(ids, label, n_segments=4, n_classes=3, ignore_index=9)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [1, 0, 1, -1])  # segment 3 has no pixel at all


def test_segment_majority_labels_all_ignore_ties_and_batches():
    ids = np.array([[0, 0, 1, 1]])
    label = np.array([[255, 255, 2, 1]])  # segment 0 only ignore -> -1; segment 1 ties 1 vs 2 -> lowest
    np.testing.assert_array_equal(segment_majority_labels(ids, label, 2, 3, 255), [-1, 1])
    # a batch: ids numbered across the images (B, h, w) with labels (B, H, W)
    ids = np.array([[[0]], [[1]]])
    label = np.array([[[0, 0], [0, 1]], [[1, 2], [2, 2]]])
    np.testing.assert_array_equal(segment_majority_labels(ids, label, 2, 3, 255), [0, 2])
    with pytest.raises(EvalInputError, match="leading dims"):
        segment_majority_labels(ids, label[0], 2, 3, 255)


def test_knn_vote_hand_case():
    angle = lambda deg: [np.cos(np.radians(deg)), np.sin(np.radians(deg))]  # noqa: E731
    keys = torch.tensor([angle(0), angle(10), angle(20), angle(90), angle(100), angle(180)], dtype=torch.float32)
    key_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    query = torch.tensor([angle(5), angle(93), angle(170)], dtype=torch.float32)
    votes = knn_vote(query, keys, key_labels, k=3, n_classes=4)
    assert votes.shape == (3, 4) and votes.dtype == torch.float32
    # 5 deg: nearest 0, 10, 20 -> labels 0, 0, 1; 93: 90, 100, then 20 (73 deg away) before 180 (87) -> 1, 2, 1
    # 170: 180, 100, 90 -> 2, 2, 1
    expected = torch.tensor([[2 / 3, 1 / 3, 0, 0], [0, 2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3, 0]])
    torch.testing.assert_close(votes, expected)
    # k = 1 is the nearest key's label; k above P is capped at P (every key votes)
    torch.testing.assert_close(knn_vote(query, keys, key_labels, 1, 4).argmax(1), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(knn_vote(query, keys, key_labels, 50, 4), torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0]] * 3))


def test_knn_vote_chunks_do_not_change_the_answer():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(37, 8, generator=g), dim=1)
    keys = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (50,), generator=g)
    whole = knn_vote(q, keys, labels, 7, 5)
    torch.testing.assert_close(knn_vote(q, keys, labels, 7, 5, max_elements=1), whole)  # one query per chunk
    torch.testing.assert_close(knn_vote(q, keys, labels, 7, 5, max_elements=120), whole)  # chunks of 2
    torch.testing.assert_close(whole.sum(1), torch.ones(37))


def test_knn_vote_rejects_bad_input():
    keys, labels = torch.eye(2), torch.tensor([0, 1])
    with pytest.raises(EvalInputError, match="no keys"):
        knn_vote(torch.eye(2), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 3, 2)
    with pytest.raises(EvalInputError, match="outside"):
        knn_vote(torch.eye(2), keys, torch.tensor([0, 2]), 1, 2)
    with pytest.raises(EvalInputError, match="query"):
        knn_vote(torch.ones(2, 3), keys, labels, 1, 2)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def kmeans_checkpoint(tmp_path_factory, ray_local, synth_data):
    """One k-means checkpoint on the synthetic data, shared by the end-to-end tests."""
    from raysseg.runtime.driver import train
    from tests.test_train import synth_config

    tmp = tmp_path_factory.mktemp("retrieval")
    cfg = synth_config(tmp, str(synth_data / "train"), str(synth_data / "val"), "data.image_size=96")
    return train(cfg).checkpoint, tmp


@pytest.mark.slow  # a quality check (~50 s); the vote and segment labels are checked by hand cases above
def test_evaluate_reports_retrieval_well_above_chance(kmeans_checkpoint, capsys):
    from raysseg.runtime.evaluate import _table, evaluate

    checkpoint, tmp = kmeans_checkpoint
    report = evaluate(checkpoint, crf=True, probe=False, out=str(tmp / "eval"), log_to_mlflow=False)
    printed = capsys.readouterr().out
    assert set(report["scores"]) == {"clusters", "clusters_crf", "retrieval", "retrieval_crf"}
    index = report["retrieval_index"]
    assert index["images"] == 8 and index["k"] == 15 and 8 <= index["prototypes"] <= 8 * 25
    assert f"retrieval index: {index['prototypes']:,} labelled prototypes from 8 images" in printed
    scores = report["scores"]["retrieval"]
    assert scores["mapping"] == list(range(5))  # scored directly, no matching
    conf = np.array(report["confusion"]["retrieval"])
    majority = conf.sum(0).max() / conf.sum()
    print(f"retrieval on synth val: accuracy {scores['accuracy']:.3f} (majority class {majority:.3f}), "
          f"mIoU {scores['miou']:.3f}\n" + _table(report))
    assert scores["accuracy"] > max(0.6, majority + 0.15)
    assert scores["miou"] > 0.35  # chance with 5 classes is about 0.2 / 0.1
    assert report["scores"]["retrieval_crf"]["accuracy"] > 0.6
