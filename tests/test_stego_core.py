"""STEGO's loss functions on hand-computed cases and against slow loops (raysseg/methods/stego/core.py)."""
import numpy as np
import pytest
import torch

from raysseg.methods.stego.core import (
    StegoHead, StegoInputError, correlation, correspondence_loss, feature_correspondence, nearest_neighbours,
    pooled_features, random_partner, random_points, sample_points, stego_loss,
)


def _points(*vectors) -> torch.Tensor:
    """(1, C, 1, n) tensor of n points, each a C-vector."""
    return torch.tensor(vectors, dtype=torch.float32).T[None, :, None, :]


def test_correlation_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 2, 4, generator=g), torch.randn(2, 3, 3, 2, generator=g)
    out = correlation(a, b)
    assert out.shape == (2, 2, 4, 3, 2)
    for n in range(2):
        for h in range(2):
            for w in range(4):
                for i in range(3):
                    for j in range(2):
                        assert out[n, h, w, i, j] == pytest.approx(float(a[n, :, h, w] @ b[n, :, i, j]), abs=1e-5)
    with pytest.raises(StegoInputError, match="stego_core.correlation"):
        correlation(a, b[:1])


def test_sample_points_reads_grid_points_transposed():
    t = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3)
    # coords[0, x, y] = (x coordinate, y coordinate) in [-1, 1]: -1, 0, 1 are columns/rows 0, 1, 2
    coords = torch.tensor([[[[-1.0, -1.0], [1.0, -1.0]], [[0.0, 1.0], [1.0, 1.0]]]])
    out = sample_points(t, coords)
    assert out.shape == (1, 2, 2, 2)
    # out[:, :, y, x] is read at coords[:, x, y]: (0,0) <- (-1,-1) = t[.., 0, 0]; (0,1) <- coords[0,1,0] = (0, 1)
    # = row 2, column 1; (1,0) <- coords[0,0,1] = (1, -1) = row 0, column 2; (1,1) <- (1, 1) = row 2, column 2
    assert torch.equal(out[0, 0], torch.tensor([[t[0, 0, 0, 0], t[0, 0, 2, 1]], [t[0, 0, 0, 2], t[0, 0, 2, 2]]]))
    assert torch.allclose(sample_points(t, torch.full((1, 1, 1, 2), 3.0))[0, :, 0, 0], t[0, :, 2, 2])  # border


def test_shifted_loss_by_hand():
    # F = cos(f1, f2) = [1, 0]; S = cos(c1, c2) = [1, -1]; shift 0.25
    f1, f2 = _points([1, 0]), _points([1, 0], [0, 1])
    c1, c2 = _points([2, 0]), _points([3, 0], [-1, 0])
    loss, cd = correspondence_loss(f1, f2, c1, c2, 0.25, pointwise=False)
    assert cd.flatten().tolist() == [1.0, -1.0]
    assert loss.flatten().tolist() == [-0.75, 0.0]  # zero clamp: -max(S, 0) (F - b)
    loss, _ = correspondence_loss(f1, f2, c1, c2, 0.25, pointwise=False, zero_clamp=False)
    assert loss.flatten().tolist() == [-0.75, -0.25]  # -S (F - b)


def test_pointwise_centring_by_hand():
    # rows of F: [1, 1] and [0, 0]; each loses its mean (1, 0), then the global mean 0.5 comes back
    f1, f2 = _points([1, 0], [0, 1]), _points([1, 0], [2, 0])
    assert feature_correspondence(f1, f2, pointwise=False).flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    assert feature_correspondence(f1, f2, pointwise=True).flatten().tolist() == [0.5, 0.5, 0.5, 0.5]


def _slow_pair_loss(pairs, shift):
    """Mean of -max(S, 0) * (F_pointwise - shift) over a batch of image pairs and every pair of their points,
    with loops. ``pairs``: per image (fa, fb, ca, cb), (C, P) arrays. Each row of F loses its mean over the
    second image's points; the mean of F over the whole batch comes back."""
    def cos(u, v):
        return float(u @ v / max(np.linalg.norm(u), 1e-10) / max(np.linalg.norm(v), 1e-10))

    fds = [np.array([[cos(fa[:, a], fb[:, b]) for b in range(fb.shape[1])] for a in range(fa.shape[1])])
           for fa, fb, _, _ in pairs]
    batch_mean = np.mean(fds)
    total, count = 0.0, 0
    for fd, (_, _, ca, cb) in zip(fds, pairs):
        fd = fd - fd.mean(axis=1, keepdims=True) + batch_mean
        for a in range(fd.shape[0]):
            for b in range(fd.shape[1]):
                total += -max(cos(ca[:, a], cb[:, b]), 0.0) * (fd[a, b] - shift)
                count += 1
    return total / count


def test_stego_loss_equals_a_slow_reference_on_grid_points():
    g = torch.Generator().manual_seed(1)
    b, s = 3, 3
    feats, feats_knn = torch.randn(b, 4, 3, 3, generator=g), torch.randn(b, 4, 3, 3, generator=g)
    codes, codes_knn = torch.randn(b, 5, 3, 3, generator=g), torch.randn(b, 5, 3, 3, generator=g)
    cells = torch.randint(0, 3, (2, b, s, s, 2), generator=g)
    coords1, coords2 = (cells.float() - 1.0).unbind(0)  # grid points: bilinear reads are exact
    partners = [torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])]
    shifts, weights = {"self": 0.1, "knn": 0.2, "random": 0.4}, {"self": 0.7, "knn": 0.3, "random": 0.6}
    total, parts = stego_loss(feats, feats_knn, codes, codes_knn, coords1, coords2, partners, shifts=shifts,
                              weights=weights)

    def points(t, image, cell):  # (C, S*S): point (y, x) of the sample is read at cell[x, y] = (column, row)
        return np.stack([t[image, :, cell[x, y, 1], cell[x, y, 0]].numpy() for y in range(s) for x in range(s)], 1)

    c1, c2 = cells[0], cells[1]

    def first(i):
        return points(feats, i, c1[i]), points(codes, i, c1[i])

    want = {
        "self": _slow_pair_loss([(first(i)[0], first(i)[0], first(i)[1], first(i)[1]) for i in range(b)], 0.1),
        "knn": _slow_pair_loss([(first(i)[0], points(feats_knn, i, c2[i]), first(i)[1], points(codes_knn, i, c2[i]))
                                for i in range(b)], 0.2),
        "random": np.mean([_slow_pair_loss([(first(i)[0], points(feats, int(p[i]), c2[i]), first(i)[1],
                                             points(codes, int(p[i]), c2[i])) for i in range(b)], 0.4)
                           for p in partners]),
    }
    for kind, value in want.items():
        assert float(parts[kind]) == pytest.approx(value, abs=1e-5), kind
    assert float(total) == pytest.approx(sum(weights[k] * want[k] for k in want), abs=1e-5)


def test_the_feature_correspondence_gets_no_gradient_and_the_codes_do():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    codes = torch.randn(2, 5, 3, 3, generator=g, requires_grad=True)
    total, _ = stego_loss(feats, feats, codes, codes, random_points(2, 3, g), random_points(2, 3, g),
                          [random_partner(2, g)], shifts={"self": 0.1, "knn": 0.1, "random": 0.1},
                          weights={"self": 1.0, "knn": 1.0, "random": 1.0})
    total.backward()
    assert feats.grad is None and codes.grad is not None and codes.grad.abs().sum() > 0


def test_random_partner_never_pairs_an_image_with_itself():
    g = torch.Generator().manual_seed(3)
    for batch in (2, 3, 5, 8):
        for _ in range(50):
            p = random_partner(batch, g)
            assert p.shape == (batch,) and (p != torch.arange(batch)).all() and p.min() >= 0 and p.max() < batch
    assert random_points(2, 4, g).shape == (2, 4, 4, 2)


def test_nearest_neighbours_equal_a_sort():
    g = torch.Generator().manual_seed(4)
    vectors = pooled_features(torch.randn(9, 6, 2, 2, generator=g))
    assert torch.allclose(vectors.norm(dim=1), torch.ones(9))
    table = nearest_neighbours(vectors, 2, 7, 4)
    sims = (vectors @ vectors.T).numpy()
    for row, i in enumerate(range(2, 7)):
        assert table[row].tolist() == list(np.argsort(-sims[i])[:4])
        assert table[row, 0] == i  # each image is its own nearest
    assert nearest_neighbours(vectors, 0, 9, 50).shape == (9, 9)


def test_head_is_linear_plus_mlp_and_drops_out_only_in_training():
    torch.manual_seed(5)
    head = StegoHead(6, 3, dropout=0.5).eval()
    x = torch.randn(2, 6, 2, 2)
    lin = torch.einsum("oc,bchw->bohw", head.linear.weight[:, :, 0, 0], x) + head.linear.bias[:, None, None]
    hidden = torch.relu(torch.einsum("oc,bchw->bohw", head.nonlinear[0].weight[:, :, 0, 0], x)
                        + head.nonlinear[0].bias[:, None, None])
    mlp = torch.einsum("oc,bchw->bohw", head.nonlinear[2].weight[:, :, 0, 0], hidden) + head.nonlinear[2].bias[:, None, None]
    assert torch.allclose(head(x), lin + mlp, atol=1e-5)
    head.train()
    assert not torch.allclose(head(x), lin + mlp, atol=1e-5)
