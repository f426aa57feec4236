"""SegSort / visual-concepts maths against hand-computed cases and slow loops, and the bank's
ring table and dictionary updates on a real local Ray."""
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysseg.methods.segsort import core
from raysseg.core.segments import (batch_segment_ids, flat_pixels, merge_small_segments, oversegment, pixel_sort,
                                   segment_prototypes)


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


# ------------------------------------------------------------------ segments


def test_segment_prototypes_are_normalised_means():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    protos, counts = segment_prototypes(emb, torch.tensor([0, 0, 1]), 3)
    assert torch.allclose(protos[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert torch.allclose(protos[1], torch.tensor([0.0, 1.0]))
    assert torch.equal(protos[2], torch.zeros(2)) and counts.tolist() == [2, 1, 0]


def test_batch_segment_ids_intersects_maps_per_image():
    a = torch.tensor([[[0, 0], [1, 1]], [[0, 0], [0, 0]]])
    b = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [2, 2]]])
    ids, image = batch_segment_ids(a, b)
    # image 0: pieces (0,0), (0,1), (1,1); image 1: (0,2) -> 4 segments, numbered by image first
    assert ids.tolist() == [[[0, 1], [2, 2]], [[3, 3], [3, 3]]]
    assert image.tolist() == [0, 0, 0, 1]


def test_pixel_sort_separates_two_embeddings_and_follows_position_when_flat():
    h, w = 8, 8
    emb = torch.zeros(1, 4, h, w)
    emb[0, 0, :, :3] = 1.0  # a left strip of 3 columns
    emb[0, 1, :, 3:] = 1.0  # the rest
    ids = pixel_sort(emb, grid=2, iterations=10)[0]
    left, right = ids[:, :3], ids[:, 3:]
    assert set(left.unique().tolist()).isdisjoint(right.unique().tolist())  # no cluster straddles the edge
    flat = F.normalize(torch.ones(1, 4, h, w), dim=1)
    ids = pixel_sort(flat, grid=2, iterations=10)[0]  # only position differs: the 2 x 2 grid cells survive
    assert ids[:4, :4].unique().numel() == 1 and ids[4:, 4:].unique().numel() == 1
    assert ids.unique().numel() == 4


def test_oversegment_finds_flat_regions_and_numbers_them_from_zero():
    image = np.zeros((32, 48, 3), np.uint8)
    image[:, 24:] = (200, 30, 30)
    ids = oversegment(image, "felzenszwalb", scale=100, sigma=0.5, min_size=20)
    assert ids.dtype == np.int32 and ids.shape == (32, 48)
    assert np.array_equal(np.unique(ids), np.arange(ids.max() + 1)) and ids.max() < 8
    assert set(np.unique(ids[:, :24]).tolist()).isdisjoint(np.unique(ids[:, 24:]).tolist())  # no segment crosses the edge
    ids = oversegment(image, "slic", n_segments=8, compactness=10)
    assert np.array_equal(np.unique(ids), np.arange(ids.max() + 1)) and 2 <= ids.max() + 1 <= 16
    assert set(np.unique(ids[:, :24]).tolist()).isdisjoint(np.unique(ids[:, 24:]).tolist())
    with pytest.raises(ValueError, match="segments.method"):
        oversegment(image, "watershed")


# ------------------------------------------------------------------ losses


def test_segment_sort_loss_hand_case():
    emb = _unit([1.0, 0.0])
    protos = _unit([1.0, 0.0], [0.0, 1.0])
    loss = core.segment_sort_loss(emb, torch.tensor([5]), protos, torch.tensor([5, -1]), kappa=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))  # -log(e / (e + 1))


def test_segment_sort_loss_matches_a_loop_with_several_positives_and_skips_pixels_without_one():
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    proto_label = torch.tensor([0, 0, 1, 2, -1, -1])
    pixel_label = torch.tensor([0, 1, 2, 0, 9, 1, 2])  # label 9 has no prototype: left out
    kappa = 10.0
    terms = []
    for i in range(7):
        sims = [math.exp(kappa * float(emb[i] @ protos[s])) for s in range(6)]
        pos = [sims[s] for s in range(6) if proto_label[s] == pixel_label[i]]
        if pos:
            terms.append(-math.log(sum(pos) / sum(sims)))
    loss = core.segment_sort_loss(emb, pixel_label, protos, proto_label, kappa)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-9)
    none = core.segment_sort_loss(emb.requires_grad_(), torch.full((7,), 9), protos, proto_label, kappa)
    assert none.item() == 0 and none.requires_grad


def test_quantize_and_vq_loss_hand_case():
    dictionary = _unit([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0])
    protos = _unit([0.6, 0.8], [-1.0, 0.1]).requires_grad_()
    index = core.quantize(protos.detach(), dictionary)
    assert index.tolist() == [1, 2]
    total, commitment = core.vq_loss(protos, dictionary, index, beta=0.5)
    d = ((protos.detach() - dictionary[index]) ** 2).sum(1)
    assert commitment.item() == pytest.approx(d.mean().item())
    assert total.item() == pytest.approx(1.5 * d.mean().item())
    total.backward()  # only the commitment term reaches the prototypes: beta * 2 (mu - c) / S
    expected = 0.5 * 2 * (protos.detach() - dictionary[index]) / 2
    assert torch.allclose(protos.grad, expected)


def test_concept_pull_loss_is_one_minus_cosine_to_the_segment_concept():
    emb = _unit([1.0, 0.0], [0.0, 1.0]).requires_grad_()
    dictionary = _unit([1.0, 0.0], [0.6, 0.8])
    loss = core.concept_pull_loss(emb, torch.tensor([0, 1]), dictionary)
    assert loss.item() == pytest.approx(((1 - 1.0) + (1 - 0.8)) / 2)
    loss.backward()  # attraction only: each pixel's gradient is -c_k / N, nothing from the other concepts
    assert torch.allclose(emb.grad, -dictionary[[0, 1]] / 2)


def test_cooccurrence_weights_are_positive_pmi_without_the_diagonal():
    counts = torch.tensor([[7.0, 2.0, 2.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    w = core.cooccurrence_weights(counts)
    # off-diagonal total 8; P(0,1) = 2/8; P = (1/2, 1/4, 1/4), sum P^2 = 3/8;
    # chance of (0, 1) = (1/2 * 1/4) / (5/8) = 1/5 -> log(0.25 / 0.2) = log 1.25
    assert w[0, 1].item() == pytest.approx(math.log(1.25)) and w[1, 0].item() == pytest.approx(math.log(1.25))
    assert w[1, 2].item() == 0 and w[0, 0].item() == 0  # never seen together; diagonal
    # every pair co-occurring equally (one dominant group): PMI <= 0, nothing is pulled together
    flat = torch.ones(3, 3, dtype=torch.float64)
    assert core.cooccurrence_weights(flat).max().item() == pytest.approx(0, abs=1e-12)
    assert core.cooccurrence_weights(torch.zeros(3, 3)).sum() == 0


def test_cooccurrence_loss_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(4, 4, generator=g, dtype=torch.float64), dim=1)
    pixel_concept = torch.tensor([0, 1, 2, 0, 2])
    proto_concept = torch.tensor([0, 1, 1, 2])
    weights = torch.tensor([[0.0, 2.0, 0.0], [2.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    kappa = 3.0
    terms = []
    for i in range(5):
        w = [float(weights[pixel_concept[i], proto_concept[s]]) for s in range(4)]
        if sum(w) == 0:
            continue
        logits = [kappa * float(emb[i] @ protos[s]) for s in range(4)]
        lse = math.log(sum(math.exp(x) for x in logits))
        terms.append(-sum(wi / sum(w) * (logits[s] - lse) for s, wi in enumerate(w)))
    loss = core.cooccurrence_loss(emb, pixel_concept, protos, proto_concept, weights, kappa)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-9)
    none = core.cooccurrence_loss(emb, pixel_concept, protos, proto_concept, torch.zeros(3, 3, dtype=torch.float64), kappa)
    assert none.item() == 0


# ------------------------------------------------------------------ dictionary updates


def test_concept_statistics_hand_case():
    protos = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    stats = core.concept_statistics(protos, index=np.array([2, 0, 2]), image=np.array([0, 0, 1]), k=3)
    assert stats["sums"].tolist() == [[0, 1], [0, 0], [2, 0]]
    assert stats["counts"].tolist() == [1, 0, 2]
    # image 0 holds concepts {0, 2}; image 1 only {2}
    assert stats["pairs"].tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]
    empty = core.concept_statistics(np.zeros((0, 2), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64), 3)
    assert empty["counts"].sum() == 0 and empty["pairs"].sum() == 0


def test_update_dictionary_is_an_ema_with_dead_concept_restarts():
    state = {"concepts": np.array([[1, 0], [0, 1], [1, 0]], np.float32),
             "ema_counts": np.array([2.0, 1.0, 0.004], np.float32),
             "ema_sums": np.array([[2, 0], [0, 1], [0, 0]], np.float32),
             "cooccurrence": np.zeros((3, 3), np.float32)}
    before = {k: v.copy() for k, v in state.items()}
    s1 = {"sums": np.array([[0, 2], [0, 0], [0, 0]], np.float32), "counts": np.array([2, 0, 0], np.float32),
          "pairs": np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32),
          "candidates": np.array([[0.6, 0.8]], np.float32)}
    s2 = {"sums": np.zeros((3, 2), np.float32), "counts": np.zeros(3, np.float32),
          "pairs": np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32), "candidates": np.zeros((0, 2), np.float32)}
    new = core.update_dictionary(state, [s1, s2], decay=0.5, rng=np.random.default_rng(0))
    assert new["ema_counts"][:2].tolist() == [2.0, 0.5]  # 0.5 * 2 + 0.5 * 2; 0.5 * 1
    assert np.allclose(new["ema_sums"][0], [1, 1]) and np.allclose(new["concepts"][0], [2 ** -0.5, 2 ** -0.5])
    assert np.allclose(new["concepts"][1], [0, 1])
    # concept 2's count fell below DEAD_COUNT: restarted at the only candidate with ema count 1.0 (the original rule)
    assert np.allclose(new["concepts"][2], [0.6, 0.8]) and new["ema_counts"][2] == 1.0
    assert new["cooccurrence"].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    assert new["idle_steps"].tolist() == [0, 1, 0]  # concept 1 unassigned this step; 2 just restarted
    assert all(np.array_equal(state[k], before[k]) for k in state)  # pure


def _one_step_stats(k: int, assigned: dict[int, list[float]], candidate: list[float]) -> dict[str, np.ndarray]:
    """concept_statistics of one worker: one prototype per entry of ``assigned`` plus ``candidate``
    as the restart candidate (not assigned)."""
    stats = core.concept_statistics(np.array(list(assigned.values()), np.float32).reshape(-1, 2),
                                    np.array(list(assigned), np.int64), np.zeros(len(assigned), np.int64), k)
    stats["candidates"] = np.array([candidate], np.float32)
    return stats


def test_restart_after_idle_steps_with_one_assignments_weight():
    # 3 concepts, decay 0.5, restart after R = 1 idle update: concept 0 is used every step, concept 1 once
    # then never, concept 2 never.
    state = core.init_dictionary(3, 2, seed=0)
    step = functools.partial(core.update_dictionary, decay=0.5, restart_after=1)
    s1 = step(state, [_one_step_stats(3, {0: [1, 0], 1: [0, 1]}, [0.6, 0.8])], rng=np.random.default_rng(0))
    # concept 2 was never assigned: restarted at once, at the candidate, with one assignment's weight 1 - decay
    assert np.allclose(s1["concepts"][2], [0.6, 0.8]) and s1["ema_counts"][2] == 0.5
    assert np.allclose(s1["ema_sums"][2], [0.3, 0.4])
    assert s1["ema_counts"][:2].tolist() == [0.5, 0.5] and s1["idle_steps"].tolist() == [0, 0, 0]
    s2 = step(s1, [_one_step_stats(3, {0: [1, 0]}, [0.8, -0.6])], rng=np.random.default_rng(0))
    # one idle update is allowed (R = 1): concepts 1 and 2 keep their directions
    assert s2["idle_steps"].tolist() == [0, 1, 1]
    assert np.allclose(s2["concepts"][1], [0, 1]) and np.allclose(s2["concepts"][2], [0.6, 0.8])
    s3 = step(s2, [_one_step_stats(3, {0: [1, 0], 2: [0, 1]}, [-1, 0])], rng=np.random.default_rng(0))
    # concept 1's second idle update: restarted at [-1, 0] although its ema count (0.125) is far above DEAD_COUNT;
    # concept 2 was assigned again: its restart weight 0.5 -> 0.25, plus 0.5 * [0, 1]
    assert np.allclose(s3["concepts"][1], [-1, 0]) and s3["ema_counts"][1] == 0.5 and s3["idle_steps"][1] == 0
    assert np.allclose(s3["ema_sums"][2], [0.6 * 0.125, 0.8 * 0.125 + 0.5])
    # the original rule would have kept concept 1 (0.125 >= DEAD_COUNT)
    legacy = core.update_dictionary(s2, [_one_step_stats(3, {0: [1, 0], 2: [0, 1]}, [-1, 0])], 0.5,
                                    np.random.default_rng(0))
    assert np.allclose(legacy["concepts"][1], [0, 1])


def test_update_dictionary_reads_a_state_without_idle_steps():
    """A checkpoint from before idle_steps existed restores and updates."""
    state = core.init_dictionary(2, 2, seed=0)
    del state["idle_steps"]
    new = core.update_dictionary(state, [_one_step_stats(2, {0: [1, 0]}, [0, 1])], 0.9, np.random.default_rng(0),
                                 restart_after=3)
    assert new["idle_steps"].tolist() == [0, 0] and np.allclose(new["concepts"][1], [0, 1])


# ------------------------------------------------------------------ the bank on a real Ray


def test_bank_ring_table_and_dictionary_are_identical_for_every_rank(ray_local):
    from raysseg.runtime.bank import ConceptBank

    ray = ray_local
    bank = ConceptBank.remote(2)
    ray.get(bank.publish.remote("memory", 1, np.zeros((0, 2), np.float32)))
    for version in (2, 3, 4):  # rank 1 first: the table must still come out in rank order
        ray.get(bank.append.remote("memory", version, 1, np.full((1, 2), 10 * version + 1, np.float32), 2))
        assert ray.get(bank.version.remote("memory")) == version - 1
        ray.get(bank.append.remote("memory", version, 0, np.full((2, 2), 10 * version, np.float32), 2))
    _, table = ray.get(bank.get.remote("memory", 4, 0))
    assert table[:, 0].tolist() == [30, 30, 31, 40, 40, 41]  # the last 2 batches, oldest first

    state = core.init_dictionary(4, 2, seed=0)
    ray.get(bank.init_reduced.remote(state, 0))
    stats = [core.concept_statistics(np.array([[1, 0]], np.float32), np.array([r]), np.array([0]), 4) for r in (0, 1)]
    reducer = functools.partial(core.update_dictionary, decay=0.9)
    ray.get([bank.reduce.remote(2, r, stats[r], reducer) for r in (1, 0)])
    got = ray.get([bank.get_many.remote(["concepts", "cooccurrence"], 2, r) for r in (0, 1)])
    expected = core.update_dictionary(state, stats, 0.9, np.random.default_rng([0, 2]))
    for g in got:
        assert g["concepts"][0] == 2 and np.array_equal(g["concepts"][1], expected["concepts"])
        assert np.array_equal(g["cooccurrence"][1], expected["cooccurrence"])

    saved = ray.get(bank.state.remote())
    other = ConceptBank.remote(2)
    ray.get(other.restore.remote(saved))
    ray.get([other.append.remote("memory", 5, r, np.full((1, 2), 50 + r, np.float32), 2) for r in (0, 1)])
    _, table = ray.get(other.get.remote("memory", 5, 0))
    assert table[:, 0].tolist() == [40, 40, 41, 50, 51]  # the ring survived the checkpoint
    ray.kill(bank)
    ray.kill(other)


# ------------------------------------------------------------------ merging small segments (segsort.min_cells)


def test_merge_small_segments_hand_cases():
    ids = torch.tensor([[[0, 0, 1, 1],
                         [0, 0, 1, 1],
                         [2, 3, 3, 3]]])
    # min 2: only segment 2 (1 cell) is small; it borders 0 and 3 by one edge each: the larger (0, 4 cells) wins
    assert merge_small_segments(ids, 2).tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1], [0, 2, 2, 2]]]
    # min 4: 2 joins 0 as before; 3 (3 cells) borders 1 by two edges, 0 and 2 by one: it joins 1
    assert merge_small_segments(ids, 4).tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]]
    assert torch.equal(merge_small_segments(ids, 1), ids)  # 1 = off


def test_merge_small_segments_joins_chains_and_never_crosses_images():
    # image 0: three 1-cell segments in a row; 1 ties between 0 and 2 (same border, same size): lower id 0.
    # The picks 0->1, 1->0, 2->1 form one component; with min 5 it stays small but has no neighbour left.
    # Image 1 is one 3-cell segment with no neighbour: kept as it is.
    ids = torch.tensor([[[0, 1, 2]], [[3, 3, 3]]])
    merged = merge_small_segments(ids, 5)
    assert merged.tolist() == [[[0, 0, 0]], [[1, 1, 1]]]
    _, image = batch_segment_ids(merged)
    assert image.tolist() == [0, 1]


def test_merge_small_segments_leaves_no_small_segment_on_real_pseudo_segments():
    rng = np.random.default_rng(0)
    image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    pseudo = torch.from_numpy(oversegment(image, scale=10, min_size=2))[None].long()
    cells = F.interpolate(pseudo[:, None].float(), size=(16, 16), mode="nearest")[:, 0].long()
    ids, _ = batch_segment_ids(cells)
    merged = merge_small_segments(ids, 6)
    counts = torch.bincount(merged.reshape(-1))
    assert counts.min() >= 6 and counts.sum() == 256
    assert torch.equal(torch.unique(merged), torch.arange(len(counts)))  # consecutive
    # every merged segment is a union of old ones
    for old in torch.unique(ids):
        assert len(torch.unique(merged[ids == old])) == 1
