import itertools
import math

import numpy as np
import pytest
import torch

from raysseg.core.metrics import (
    EvalInputError,
    apply_mapping,
    cluster_probs,
    confusion_matrix,
    direct_scores,
    fit_linear_probe,
    hungarian_scores,
    matched_confusion,
)


def test_confusion_matrix_hand_case_with_ignore():
    pred = np.array([[0, 1, 2], [2, 1, 0], [5, 0, 1]])
    target = np.array([[0, 1, 1], [255, 0, 0], [255, 7, 1]])  # 255 ignore, 7 outside [0, 2)
    conf = confusion_matrix(pred, target, n_pred=3, n_classes=2, ignore_index=255)
    expected = np.array([[2, 0], [1, 2], [0, 1]])  # pred 5 sits on an ignore pixel
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, expected)


def test_confusion_matrix_rejects_bad_predictions():
    with pytest.raises(EvalInputError, match=r"\[0, 2\)"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), n_pred=2, n_classes=2, ignore_index=255)
    with pytest.raises(EvalInputError, match="shape"):
        confusion_matrix(np.array([0, 1]), np.array([0]), n_pred=2, n_classes=2, ignore_index=255)


def test_permuted_perfect_prediction():
    target = np.array([0, 0, 1, 2, 2, 2, 3, 11, 11])
    perm = np.array([2, 3, 1, 0])  # class c predicted as cluster perm[c]
    pred = np.where(target == 11, 0, perm[np.minimum(target, 3)])
    scores = hungarian_scores(confusion_matrix(pred, target, 4, 4, ignore_index=11))
    assert scores.accuracy == 1.0 and scores.miou == 1.0
    assert scores.n_pixels == 7
    assert scores.mapping == [3, 2, 0, 1]  # cluster p -> class with perm[class] == p


def test_more_clusters_than_classes():
    conf = np.array([[5, 1], [0, 4], [2, 0]])
    scores = hungarian_scores(conf)
    assert scores.mapping == [0, 1, -1]
    assert scores.accuracy == pytest.approx(9 / 12)
    assert scores.per_class_iou == pytest.approx([5 / 8, 4 / 5])
    assert scores.miou == pytest.approx((5 / 8 + 4 / 5) / 2)
    np.testing.assert_array_equal(matched_confusion(conf, scores.mapping), [[5, 1], [0, 4]])


def test_fewer_clusters_than_classes():
    conf = np.array([[4, 1, 0], [0, 3, 2]])
    scores = hungarian_scores(conf)
    assert scores.mapping == [0, 1]
    assert scores.accuracy == pytest.approx(7 / 10)
    assert scores.per_class_iou == pytest.approx([4 / 5, 3 / 6, 0.0])
    assert scores.miou == pytest.approx((4 / 5 + 3 / 6 + 0) / 3)


def test_class_absent_from_split_is_excluded():
    conf = np.array([[3, 1, 0], [0, 2, 0], [1, 0, 0]])  # class 2 has no pixel
    scores = hungarian_scores(conf)
    assert scores.mapping == [0, 1, 2]
    assert scores.accuracy == pytest.approx(5 / 7)
    assert scores.per_class_iou[:2] == pytest.approx([3 / 5, 2 / 3])
    assert math.isnan(scores.per_class_iou[2])
    assert scores.miou == pytest.approx((3 / 5 + 2 / 3) / 2)
    d = scores.to_dict()
    assert d["per_class_iou"][2] is None and d["n_pixels"] == 7


def test_direct_scores_hand_case():
    scores = direct_scores(np.array([[3, 1], [2, 4]]))
    assert scores.mapping == [0, 1]
    assert scores.accuracy == pytest.approx(7 / 10)
    assert scores.per_class_iou == pytest.approx([3 / 6, 4 / 7])
    assert scores.miou == pytest.approx((3 / 6 + 4 / 7) / 2)
    with pytest.raises(EvalInputError, match="square"):
        direct_scores(np.ones((3, 2)))
    with pytest.raises(EvalInputError, match="no labelled pixel"):
        direct_scores(np.zeros((2, 2)))


@pytest.mark.parametrize("n_pred, n_classes", [(3, 3), (4, 3), (2, 4)])
def test_hungarian_against_brute_force_pixel_loop(n_pred, n_classes):
    rng = np.random.default_rng(n_pred * 10 + n_classes)
    target = rng.integers(0, n_classes + 1, size=400)  # n_classes is the ignore label
    pred = (target + rng.integers(0, 2, size=400)) % n_pred
    scores = hungarian_scores(confusion_matrix(pred, target, n_pred, n_classes, ignore_index=n_classes))

    valid = target != n_classes
    best = None
    for assigned in itertools.permutations(range(max(n_pred, n_classes)), n_pred):
        mapping = [c if c < n_classes else -1 for c in assigned]
        mapped = np.array([mapping[p] for p in pred])
        correct = int(np.sum((mapped == target) & valid))
        if best is None or correct > best[0]:
            best = (correct, mapped)
    correct, mapped = best
    ious = []
    for c in range(n_classes):
        inter = np.sum((mapped == c) & (target == c) & valid)
        union = np.sum(((mapped == c) | (target == c)) & valid)
        ious.append(inter / union)
    assert scores.accuracy == pytest.approx(correct / valid.sum())
    assert scores.miou == pytest.approx(np.mean(ious))
    np.testing.assert_array_equal(apply_mapping(pred, scores.mapping, unmatched=-1)[valid], mapped[valid])


def _toy_probe_data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (3000,), generator=gen)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]]) + 10.0  # offset: needs standardising
    features = centres[labels] + torch.randn(3000, 4, generator=gen)
    return features, labels


def test_linear_probe_learns_separable_problem_and_drops_ignore():
    features, labels = _toy_probe_data()
    noise_features = torch.randn(1000, 4) * 50  # ignore pixels: wild features
    all_features = torch.cat([features[:2000], noise_features])
    all_labels = torch.cat([labels[:2000], torch.full((1000,), 255)])
    probe = fit_linear_probe(all_features, all_labels, 3, ignore_index=255, epochs=5, batch_size=256, seed=1)
    codes = features[2000:].T.reshape(1, 4, 40, 25)
    logits = probe.predict_logits(codes)
    assert logits.shape == (1, 3, 40, 25)
    accuracy = (logits.argmax(1).reshape(-1) == labels[2000:]).float().mean().item()
    assert accuracy > 0.95

    clean = fit_linear_probe(features[:2000], labels[:2000], 3, ignore_index=255, epochs=5, batch_size=256, seed=1)
    for a, b in zip(probe.state_dict().values(), clean.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_linear_probe_rejects_bad_labels():
    features, labels = _toy_probe_data()
    labels[0] = 7
    with pytest.raises(EvalInputError, match="labels span"):
        fit_linear_probe(features, labels, 3, ignore_index=255, epochs=1)


def test_cluster_probs_is_a_distribution_favouring_nearest_centroid():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randn(2, 8, 5, 6, generator=gen)
    centroids = torch.randn(4, 8, generator=gen)
    probs = cluster_probs(codes, centroids, temperature=0.1)
    assert probs.shape == (2, 4, 5, 6)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 5, 6))
    cos = torch.nn.functional.normalize(codes, dim=1).permute(0, 2, 3, 1) @ torch.nn.functional.normalize(centroids, dim=1).T
    torch.testing.assert_close(probs.argmax(1), cos.argmax(-1))
    with pytest.raises(EvalInputError, match="same C"):
        cluster_probs(codes, torch.randn(4, 7))


def test_apply_mapping_relabels_and_marks_unmatched():
    pred = np.array([[0, 1], [2, 0]])
    np.testing.assert_array_equal(apply_mapping(pred, [1, -1, 0], unmatched=255), [[1, 255], [0, 1]])
    with pytest.raises(EvalInputError, match="mapping has 2 entries"):
        apply_mapping(pred, [1, 0], unmatched=255)


def test_codes_at_equals_full_upsampling():
    from raysseg.runtime.evaluate import codes_at

    codes = torch.randn(5, 3, 4)
    ys, xs = np.array([0, 7, 11, 3]), np.array([0, 15, 2, 9])
    full = torch.nn.functional.interpolate(codes[None], size=(12, 16), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(codes_at(codes, ys, xs, (12, 16)), full[:, ys, xs].T)
