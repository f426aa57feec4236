"""SegSort against the authors' released TensorFlow 1 code, run under ``tf.compat.v1``.

    python benchmarks/parity/segsort.py /path/to/SegSort --tf-python /work/ext/tfvenv/bin/python \
        [--out tests/fixtures/parity]

``/path/to/SegSort`` is a checkout of github.com/jyhjinghwang/SegSort. ``--tf-python`` is a Python with
``tensorflow-cpu`` (a separate venv: ``python3 -m venv /work/ext/tfvenv && /work/ext/tfvenv/bin/pip install
tensorflow-cpu``). This script runs itself under that Python (``--tf-worker``) to import their
``network/segsort`` modules, with ``tensorflow`` standing for ``tensorflow.compat.v1`` (their code is
TF1: ``tf.log``, ``tf.get_variable``, ``keep_dims``), and compares on the same inputs:

- ``add_unsupervised_segsort_loss`` (the loss of their unsupervised training script) and
  ``_calculate_vmf_loss`` with a memory bank (every pixel its own segment's class, memory labels that
  match no pixel) against our :func:`segment_sort_loss` on :func:`segment_prototypes`; the loss and its
  gradient w.r.t. the un-normalised embedding;
- ``kmeans_with_initial_labels`` (their pixel sorting, vMF k-means) against our :func:`pixel_sort`:
  once on our features (our position encoding and grid start, their k-means), once with their
  conventions (location features y/H, x/W, ceil-sized grid cells, ``iterations`` E-steps).

Prints one table (quantity, max abs diff, max rel diff = max|ours - theirs| / max|theirs|) and writes
the inputs and their outputs to ``segsort_*.npz`` (checked by tests/test_parity_segsort.py).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from diff_table import DiffTable  # beside this script

REPO = Path(__file__).resolve().parents[2]
B, H, W, D, KAPPA, GRID, ITERS = 2, 10, 10, 6, 10.0, 5, 10


def tf_worker(segsort: Path, inp: Path, out: Path) -> None:
    """Runs under the TensorFlow Python: their functions on ``inp``'s arrays -> ``out``."""
    import tensorflow.compat.v1 as tf

    tf.disable_v2_behavior()
    sys.modules["tensorflow"] = tf  # their modules `import tensorflow as tf` and use TF1 names
    sys.path.insert(0, str(segsort))
    from network.segsort import common_utils, train_utils

    x = dict(np.load(inp))
    res = {}
    with tf.Graph().as_default(), tf.Session() as sess:
        emb = tf.constant(x["emb"])  # (B, H, W, D), un-normalised
        loss = train_utils.add_unsupervised_segsort_loss(emb, KAPPA, tf.constant(x["clusters"][..., None]))
        res["unsup_loss"], res["unsup_grad"] = sess.run([loss, tf.gradients(loss, emb)[0]])
        flat = common_utils.normalize_embedding(tf.reshape(emb, [-1, D]))
        inst = tf.constant(x["instance"])  # consecutive segment of each pixel (the unsupervised reading)
        n_seg = int(x["instance"].max()) + 1
        vmf, _, _ = train_utils._calculate_vmf_loss(flat, inst, inst, tf.range(n_seg), KAPPA,
                                                    tf.constant(x["memory"]), tf.constant(x["memory_labels"]))
        res["memory_loss"], res["memory_grad"] = sess.run([vmf, tf.gradients(vmf, emb)[0]])
        # pixel sorting, (a) on our features and start, iterations + 1 E-steps (as ours at most)
        sort = [common_utils.kmeans_with_initial_labels(tf.constant(x["ours_feats"][b]), tf.constant(x["ours_init"][b]),
                                                        GRID * GRID, ITERS + 1) for b in range(B)]
        res["sort_ours_conventions"] = np.stack(sess.run(sort))
        # (b) their conventions: location y/H, x/W (image_reader.py), their grid, ITERS E-steps
        labels = []
        for b in range(B):
            loc = common_utils.generate_location_features([H, W], "float")
            feats = common_utils.normalize_embedding(
                tf.concat([tf.reshape(tf.constant(x["unit"][b]), [-1, D]), tf.reshape(loc, [-1, 2])], 1))
            init = tf.reshape(common_utils.initialize_cluster_labels([GRID, GRID], [H, W]), [-1])
            labels.append(common_utils.kmeans_with_initial_labels(feats, init, GRID * GRID, ITERS))
        res["sort_their_conventions"] = np.stack(sess.run(labels))
    np.savez(out, **res)


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # 3 embedding directions in blocks, plus noise: segments that pixel sorting can find
    centres = rng.standard_normal((3, D)).astype(np.float32)
    block = (np.arange(H)[:, None] // 4 + np.arange(W)[None, :] // 5) % 3
    emb = np.stack([centres[(block + b) % 3] for b in range(B)]) + 0.3 * rng.standard_normal((B, H, W, D))
    emb = (emb * rng.uniform(0.5, 2.0, (B, H, W, 1))).astype(np.float32)  # un-normalised
    clusters = np.stack([(np.arange(H)[:, None] // 3) * 4 + np.arange(W)[None, :] // 4 + 7 * b
                         for b in range(B)]).astype(np.int32)  # segment ids per image (< 256)
    clusters[1, :3, :3] = 200
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    return {"emb": emb, "clusters": clusters, "unit": unit.astype(np.float32),
            "memory": rng.standard_normal((9, D)).astype(np.float32), "memory_labels": np.full(9, -1, np.int32)}


def ours_side(x: dict[str, np.ndarray]):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from raysseg.core.segments import batch_segment_ids, flat_pixels, grid_cells, pixel_sort, segment_prototypes
    from raysseg.methods.segsort.core import segment_sort_loss

    emb = torch.from_numpy(x["emb"]).permute(0, 3, 1, 2)  # (B, D, H, W)
    ids, _ = batch_segment_ids(torch.from_numpy(x["clusters"]).long())
    ids = ids.reshape(-1)
    n = int(ids.max()) + 1

    def loss_and_grad(memory: bool):
        e = emb.clone().requires_grad_()
        pix = flat_pixels(F.normalize(e, dim=1))
        protos, _ = segment_prototypes(pix, ids, n)
        labels = torch.arange(n)
        if memory:
            protos = torch.cat([protos, F.normalize(torch.from_numpy(x["memory"]), dim=1)])
            labels = torch.cat([labels, torch.from_numpy(x["memory_labels"]).long()])
        loss = segment_sort_loss(pix, ids, protos, labels, KAPPA)
        loss.backward()
        return float(loss.detach()), e.grad.permute(0, 2, 3, 1).numpy()

    # pixel sorting: our features and start, as pixel_sort builds them (for their k-means)
    unit = torch.from_numpy(x["unit"]).permute(0, 3, 1, 2)
    ys, xs = torch.linspace(-1, 1, H), torch.linspace(-1, 1, W)
    pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).reshape(2, H * W)
    feats = F.normalize(torch.cat([unit.reshape(B, D, H * W), pos.expand(B, 2, H * W)], 1), dim=1)
    init = grid_cells(H, W, GRID).expand(B, H * W)
    return {"unsup": loss_and_grad(False), "memory": loss_and_grad(True), "instance": ids.numpy().astype(np.int32),
            "ours_feats": feats.transpose(1, 2).numpy(), "ours_init": init.numpy().astype(np.int32),
            "sort": pixel_sort(unit, GRID, ITERS).reshape(B, -1).numpy()}


def disagreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels outside the best one-to-one matching of a's segments to b's (per image)."""
    from scipy.optimize import linear_sum_assignment

    wrong = 0
    for la, lb in zip(a, b):
        _, ia = np.unique(la, return_inverse=True)
        _, ib = np.unique(lb, return_inverse=True)
        both = np.zeros((ia.max() + 1, ib.max() + 1), np.int64)
        np.add.at(both, (ia, ib), 1)
        r, c = linear_sum_assignment(-both)
        wrong += la.size - both[r, c].sum()
    return wrong / a.size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("segsort", type=Path, help="checkout of github.com/jyhjinghwang/SegSort")
    p.add_argument("--tf-python", help="a Python with tensorflow-cpu (a separate venv)")
    p.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "parity", help="where segsort_*.npz go")
    p.add_argument("--tf-worker", nargs=2, type=Path, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not (a.segsort / "network" / "segsort" / "train_utils.py").is_file():
        print(f"segsort parity: {a.segsort} has no network/segsort/train_utils.py; pass a checkout of "
              "github.com/jyhjinghwang/SegSort", file=sys.stderr)
        return 2
    if a.tf_worker:
        tf_worker(a.segsort.resolve(), *a.tf_worker)
        return 0
    if not a.tf_python or subprocess.run([a.tf_python, "-c", "import tensorflow"], capture_output=True).returncode:
        print(f"segsort parity: --tf-python {a.tf_python!r} cannot import tensorflow; make one with "
              "`python3 -m venv /work/ext/tfvenv && /work/ext/tfvenv/bin/pip install tensorflow-cpu`", file=sys.stderr)
        return 2
    x = inputs()
    ours = ours_side(x)
    x.update(instance=ours["instance"], ours_feats=ours["ours_feats"], ours_init=ours["ours_init"])
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "in.npz", **x)
        run = subprocess.run([a.tf_python, __file__, str(a.segsort.resolve()), "--tf-worker", f"{tmp}/in.npz",
                              f"{tmp}/out.npz"], capture_output=True, text=True)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            print("segsort parity: their TensorFlow code failed (above)", file=sys.stderr)
            return 1
        theirs = dict(np.load(f"{tmp}/out.npz"))
    t = DiffTable()
    for key, name in (("unsup", "add_unsupervised_segsort_loss"), ("memory", "_calculate_vmf_loss + memory bank")):
        t.add(f"loss: {name}", ours[key][0], theirs[f"{key}_loss"])
        t.add(f"grad w.r.t. the embedding: {name}", ours[key][1], theirs[f"{key}_grad"])
    same = theirs["sort_ours_conventions"]
    t.add("pixel sorting, our features + start (pixels that differ)", int((ours["sort"] != same).sum()), 0)
    t.add("pixel sorting, their conventions (fraction of pixels)",
          disagreement(ours["sort"], theirs["sort_their_conventions"]), 0,
          "image_reader.py:250-253 (y, x) in [0, 1) vs segments.py:63-65 in [-1, 1]")
    t.print()
    a.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out / "segsort_loss.npz", emb=x["emb"], clusters=x["clusters"], memory=x["memory"],
                        memory_labels=x["memory_labels"], kappa=KAPPA, **{k: v for k, v in theirs.items()
                                                                         if k.endswith(("_loss", "_grad"))})
    np.savez_compressed(a.out / "segsort_sort.npz", unit=x["unit"], grid=GRID, iterations=ITERS,
                        labels=same, their_conventions=theirs["sort_their_conventions"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
