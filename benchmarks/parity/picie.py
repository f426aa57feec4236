"""PiCIE (and the parts PGG + CAE shares with it) against the authors' released code.

    python benchmarks/parity/picie.py /path/to/PiCIE [--out tests/fixtures/parity]

``/path/to/PiCIE`` is a checkout of github.com/janghyuncho/PiCIE. Their modules are imported at run
time (nothing of theirs is copied here) and run on the same small inputs as ours, on the CPU:

- loss: their ``train_picie.train`` runs one real step (their classifiers, criteria, equivariant
  transforms) on a tiny conv "network"; the features, labels and centroids it used are fed to
  our :func:`picie_loss`; gradients w.r.t. the network's feature maps and its weights are compared;
- labels: their ``commons.compute_labels`` (files it writes) against our :func:`assign_labels`;
- clustering: their ``commons.get_init_centroids`` (faiss L2 k-means, their settings) against our
  spherical k-means on the same features, and faiss's empty-cluster split against our torch k-means;
- transforms: their colour-jitter, grayscale, blur, crop and flip classes with fixed parameters;
- evaluation: their ``commons.evaluate`` (Hungarian matching, accuracy, mIoU) on fixed predictions.

Prints one table (quantity, max abs diff, max rel diff = max|ours - theirs| / max|theirs|) and writes
the inputs and their outputs to ``picie_*.npz`` under ``--out`` (checked by tests/test_parity_picie.py).

Compatibility stand-ins (their code targets 2021 libraries and a GPU), all outside their files:
``sklearn.utils.linear_assignment_`` (removed in scikit-learn 0.23) is scipy's
``linear_sum_assignment`` stacked as (row, col) pairs sorted by row, which is what the old function
returned; ``torchvision.models.utils`` is ``torch.hub`` (where torchvision moved
``load_state_dict_from_url``); ``cv2`` is an empty module (only their dataset readers use it, and they
are not called); ``.cuda()`` is a no-op on tensors and modules; their ``GpuIndexFlatL2`` (fp32, no
float16) is ``faiss.IndexFlatL2`` on the CPU. faiss must be importable (it is in this project's venv).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from raysseg.core.augment import color_jitter, crop_resize, gaussian_blur, rgb_to_gray  # noqa: E402
from raysseg.core.kmeans import spherical_kmeans  # noqa: E402
from raysseg.core.metrics import confusion_matrix, hungarian_scores  # noqa: E402
from raysseg.methods.picie.core import assign_labels, picie_loss  # noqa: E402
from diff_table import DiffTable  # noqa: E402  (beside this script)

B, S, D, K = 2, 32, 8, 5  # images, image side, feature dims, clusters (features at S / 4)


def load_released(path: Path):
    """Their modules (utils, commons, train_picie, data.custom_transforms, data.coco_train_dataset)."""
    from scipy.optimize import linear_sum_assignment

    shim = types.ModuleType("sklearn.utils.linear_assignment_")
    shim.linear_assignment = lambda cost: np.stack(linear_sum_assignment(cost), 1)
    sys.modules["sklearn.utils.linear_assignment_"] = shim
    tvu = types.ModuleType("torchvision.models.utils")
    tvu.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules.setdefault("torchvision.models.utils", tvu)
    try:
        import cv2  # noqa: F401
    except ImportError:
        sys.modules["cv2"] = types.ModuleType("cv2")
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    sys.path.insert(0, str(path))
    import commons
    import train_picie
    import utils
    from data import coco_train_dataset, custom_transforms

    return types.SimpleNamespace(utils=utils, commons=commons, train=train_picie, ct=custom_transforms,
                                 TrainCOCO=coco_train_dataset.TrainCOCO)


def eqv_dataset(rel, scales, corners, flips):
    """Their TrainCOCO's equivariant transform with fixed per-image parameters (random_crop, h_flip)."""
    ds = rel.TrainCOCO.__new__(rel.TrainCOCO)
    ds.eqv_list = ["random_crop", "h_flip"]
    ds.random_resized_crop = rel.ct.RandomResizedCrop(N=len(scales), res=S, scale=(0.5, 1.0))
    ds.random_resized_crop.rscale, ds.random_resized_crop.rcrop = list(scales), list(corners)
    ds.random_horizontal_flip = rel.ct.RandomHorizontalTensorFlip(N=len(flips))
    ds.random_horizontal_flip.plist = np.where(flips, 0.1, 0.9)
    return ds


class Loader(list):
    """A list of batches with a ``dataset`` (their loops read ``dataloader.dataset``)."""

    def __init__(self, batches, dataset):
        super().__init__(batches)
        self.dataset = dataset


def their_labels(rel, args, model, ds, indice, images, centroids, view) -> np.ndarray:
    """Labels their compute_labels writes for one view -> (B, h, w) int64."""
    rel.commons.compute_labels(args, logging.getLogger("picie"), Loader([(indice, images)], ds), model,
                               centroids, view)
    out = [torch.load(os.path.join(args.save_model_path, f"label_{view}", f"{i}.pkl"), weights_only=False)
           for i in indice]
    side = int(round(np.sqrt(out[0].size)))
    return np.stack(out).reshape(len(indice), side, side).astype(np.int64)


def their_step(rel, args, model, ds, indice, x1, x2, y1, y2, c1, c2, weights=None):
    """One step of their train(); returns (loss terms, d featmap1, d featmap2, featmap1, featmap2, d conv)."""
    captured = {}

    def keep(name, t):
        if t.requires_grad:
            t.retain_grad()
            captured[name] = t

    hook = model.register_forward_hook(lambda m, i, o: keep("f1", o) if "f1" not in captured else None)
    ds.transform_eqv = lambda ind, t: _kept(rel.TrainCOCO.transform_eqv(ds, ind, t), keep)
    classifiers = []
    for c in (c1, c2):
        cls = rel.utils.initialize_classifier(args)
        cls.module.weight.data = c.unsqueeze(-1).unsqueeze(-1)
        rel.utils.freeze_all(cls)
        classifiers.append(cls)
    crit = [nn.CrossEntropyLoss(weight=None if weights is None else w) for w in (weights or (None, None))]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is minus the gradient
    before = [p.detach().clone() for p in model.parameters()]
    out = rel.train.train(args, logging.getLogger("picie"), Loader([(indice, x1, x2, y1, y2)], ds), model,
                          classifiers[0], classifiers[1], crit[0], crit[1], opt, 0)
    hook.remove()
    grads = [(b - p.detach()).numpy() for b, p in zip(before, model.parameters())]
    return out, captured, grads


def _kept(t, keep):
    keep("f2", t)
    return t


def loss_case(rel, table: Table, out_dir: Path) -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, D, 4, stride=4)  # a tiny "network": S -> S/4 feature maps, as their FPN
    x1 = torch.rand(B, 3, S, S)  # view 1 (their photometric view, before the crop)
    x2 = torch.rand(B, 3, S, S)  # view 2
    indice = list(range(B))
    ds = eqv_dataset(rel, scales=(0.75, 0.5), corners=((0.3, 0.8), (1.0, 0.0)), flips=(True, False))
    # centroids: our spherical k-means of the model's normalised features (unit norm, as ours are)
    feats = F.normalize(model(torch.rand(16, 3, S, S)), dim=1).permute(0, 2, 3, 1).reshape(-1, D)
    c_unit = torch.from_numpy(spherical_kmeans(feats.detach().numpy(), K, 20, seed=0))
    c_b = torch.from_numpy(spherical_kmeans(feats.detach().numpy()[::-1].copy(), K, 20, seed=1))
    with tempfile.TemporaryDirectory() as tmp:
        args = argparse.Namespace(metric_train="cosine", metric_test="cosine", equiv=True, mse=False,
                                  in_dim=D, K_train=K, save_model_path=tmp)
        snapshot = copy.deepcopy(model)
        y1 = their_labels(rel, args, snapshot, ds, indice, x1, c_unit, view=1)
        y2 = their_labels(rel, args, snapshot, ds, indice, x2, c_b, view=2)
        ours_model = copy.deepcopy(model)
        (total, cet, within, across, _), cap, grads = their_step(
            rel, args, model, ds, indice, x1, x2, torch.from_numpy(y1), torch.from_numpy(y2), c_unit, c_b)
        f1, f2 = cap["f1"].detach().clone().requires_grad_(), cap["f2"].detach().clone().requires_grad_()
        loss, stats = picie_loss(F.normalize(f1, dim=1), F.normalize(f2, dim=1), c_unit, c_b,
                                 torch.from_numpy(y1), torch.from_numpy(y2))
        (loss / 4).backward()
        table.add("loss: total / 4 (theirs: mean of the 4 CEs)", float(loss) / 4, total)
        table.add("loss: within-view / 2", stats["loss_within"] / 2, within)
        table.add("loss: cross-view / 2", stats["loss_cross"] / 2, across)
        table.add("grad / 4 w.r.t. view-1 features", f1.grad.numpy(), cap["f1"].grad.numpy())
        table.add("grad / 4 w.r.t. view-2 features (after crop/flip)", f2.grad.numpy(), cap["f2"].grad.numpy())
        # the same step through the network: their transforms, our loss
        g1 = ours_model(rel.TrainCOCO.transform_eqv(ds, indice, x1))
        g2 = rel.TrainCOCO.transform_eqv(ds, indice, ours_model(x2))
        ours_loss, _ = picie_loss(F.normalize(g1, dim=1), F.normalize(g2, dim=1), c_unit, c_b,
                                  torch.from_numpy(y1), torch.from_numpy(y2))
        (ours_loss / 4).backward()
        table.add("grad / 4 w.r.t. the network's weights", ours_model.weight.grad.numpy(), grads[0])
        table.add("grad / 4 w.r.t. the network's bias", ours_model.bias.grad.numpy(), grads[1])
        # their default (no --no_balance): class weights = label frequencies (not copied)
        w1 = torch.from_numpy(np.bincount(y1.ravel(), minlength=K) / y1.size).float()
        w2 = torch.from_numpy(np.bincount(y2.ravel(), minlength=K) / y2.size).float()
        (wtotal, *_), _, _ = their_step(rel, args, copy.deepcopy(ours_model), ds, indice, x1, x2,
                                        torch.from_numpy(y1), torch.from_numpy(y2), c_unit, c_b, weights=(w1, w2))
        table.add("loss: their frequency-weighted default (NOT copied)", float(loss) / 4, wtotal,
                  "commons.py:181 + train_picie.py:232-234; ours unweighted (METHODS.md)")
        # labels: their files against our assign_labels on the same features and centroids
        with torch.no_grad():
            z1 = F.normalize(snapshot(rel.TrainCOCO.transform_eqv(ds, indice, x1)), dim=1)
            z2 = F.normalize(rel.TrainCOCO.transform_eqv(ds, indice, snapshot(x2)), dim=1)
        ours_y1, ours_y2 = assign_labels(z1, c_unit).numpy(), assign_labels(z2, c_b).numpy()
        table.add("labels, unit centroids (pixels that differ)", int((ours_y1 != y1).sum() + (ours_y2 != y2).sum()), 0)
        np.savez_compressed(out_dir / "picie_loss.npz", f1=cap["f1"].detach().numpy(), f2=cap["f2"].detach().numpy(),
                            c1=c_unit.numpy(), c2=c_b.numpy(), y1=y1, y2=y2, total=total, within=within,
                            across=across, weighted_total=wtotal, w1=w1.numpy(), w2=w2.numpy(),
                            grad_f1=cap["f1"].grad.numpy(), grad_f2=cap["f2"].grad.numpy(), z1=z1.numpy(),
                            z2=z2.numpy())


def clustering_case(rel, table: Table, out_dir: Path) -> None:
    import faiss

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((K, D)).astype(np.float32)
    x = centres[rng.integers(0, K, 600)] + 0.6 * rng.standard_normal((600, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    args = argparse.Namespace(in_dim=D, seed=2021, kmeans_n_iter=20)
    np.random.seed(1)  # their clus.seed = np.random.randint(args.seed)
    theirs = rel.commons.get_init_centroids(args, K, x, faiss.IndexFlatL2(D)).astype(np.float32)
    ours = spherical_kmeans(x, K, 20, seed=0)
    from scipy.optimize import linear_sum_assignment

    # their labels: nearest raw centroid in L2 (utils.py:125-128); ours: largest cosine
    their_lab = (-(1 - 2 * x @ theirs.T + (theirs ** 2).sum(1))).argmax(1)
    our_lab = (x @ ours.T).argmax(1)
    both = np.zeros((K, K), np.int64)
    np.add.at(both, (our_lab, their_lab), 1)
    r, c = linear_sum_assignment(-both)
    table.add("k-means partition, ours vs theirs (fraction of points)", 1 - both[r, c].sum() / len(x), 0,
              "utils.py:189-196 faiss L2 vs kmeans.py:102-104 spherical")
    z = torch.from_numpy(x.T.reshape(1, D, 1, -1).copy())
    ours_on_theirs = assign_labels(z, torch.from_numpy(theirs)).numpy().ravel()
    table.add("labels, their raw L2 centroids (fraction that differ)", float((ours_on_theirs != their_lab).mean()), 0,
              "utils.py:125-128 L2 to raw centroid vs core.py:88-101 cosine")
    # the same start for both (the first K points): what the geometry alone changes
    clus = faiss.Clustering(D, K)  # their settings (utils.py:190-193), started from x[:K]
    clus.niter, clus.max_points_per_centroid = 20, 10000000
    faiss.copy_array_to_vector(x[:K].ravel(), clus.centroids)
    clus.train(x, faiss.IndexFlatL2(D))
    l2 = faiss.vector_float_to_array(clus.centroids).reshape(K, D)
    sph = spherical_kmeans(x, K, 20, init_centroids=x[:K], backend="torch")
    lab_l2 = (2 * x @ l2.T - (l2 ** 2).sum(1)).argmax(1)
    table.add("k-means partition from the same start (fraction)", float((lab_l2 != (x @ sph.T).argmax(1)).mean()), 0,
              "the same two lines")
    # empty-cluster handling: faiss's split (what both codes call) against our torch k-means
    pts = np.concatenate([np.eye(D, dtype=np.float32)[:3], F.normalize(torch.ones(20, D) + 0.05 * torch.randn(
        20, D, generator=torch.Generator().manual_seed(3)), dim=1).numpy()])
    init = np.concatenate([pts[:3], -np.ones((1, D), np.float32) / np.sqrt(D), pts[3:4]])  # 4th never nearest
    split = {}
    for backend in ("faiss", "torch"):
        split[backend] = spherical_kmeans(pts, 5, 4, seed=0, init_centroids=init, backend=backend)
    table.add("empty-cluster split: our torch k-means vs faiss", split["torch"], split["faiss"],
              "faiss split_clusters, deterministic case")
    np.savez_compressed(out_dir / "picie_kmeans.npz", x=x, theirs=theirs, their_labels=their_lab,
                        split_points=pts, split_init=init, split_faiss=split["faiss"])


def transforms_case(rel, table: Table, out_dir: Path) -> None:
    from PIL import Image

    ct = rel.ct
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    # colour jitter: image 0 all four on, image 1 contrast and hue off (their p = 0.8 gates per op)
    factors = {"brightness": (1.2, 0.85), "contrast": (0.8, 1.3), "saturation": (1.25, 0.7), "hue": (0.07, -0.04)}
    gates = {"brightness": (True, True), "contrast": (True, False), "saturation": (True, True), "hue": (True, False)}
    ds = rel.TrainCOCO.__new__(rel.TrainCOCO)
    ds.inv_list = list(factors)
    for name, cls in (("brightness", ct.RandomColorBrightness), ("contrast", ct.RandomColorContrast),
                      ("saturation", ct.RandomColorSaturation), ("hue", ct.RandomColorHue)):
        op = cls(x=0.3, p=0.8, N=2)
        op.rlist, op.plist = list(factors[name]), np.where(gates[name], 0.1, 0.9)
        setattr(ds, f"random_color_{name}", [op])
    theirs = torch.stack([rel.TrainCOCO.transform_inv(ds, i, x[i], 0) for i in range(2)])
    eff = {n: torch.tensor([f if g else (0.0 if n == "hue" else 1.0) for f, g in zip(factors[n], gates[n])])
           for n in factors}
    ours = color_jitter(x, eff["brightness"], eff["contrast"], eff["saturation"], eff["hue"])
    table.add("colour jitter (float tensors)", ours, theirs)
    gray = ct.RandomGrayScale(p=0.2, N=1)
    gray.plist = np.array([0.1])
    their_gray = gray(0, x[0])
    table.add("grayscale", rgb_to_gray(x[:1])[0].expand(3, -1, -1), their_gray)
    # blur: their radius 0.1 + 3.8 (u - 0.5) < 0 for u < 0.5; PIL blurs with |radius| (uint8, box passes)
    blur = ct.RandomGaussianBlur(sigma=[0.1, 2.0], p=0.5, N=1)
    blur.plist = [0.2]  # Python floats: Pillow >= 10 rejects a numpy scalar radius (theirs came from numpy)
    img8 = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    their_blur = np.asarray(blur(0, Image.fromarray(img8)), np.float32) / 255
    sigma = abs(0.1 + 3.8 * (0.2 - 0.5))
    our_blur = gaussian_blur(torch.from_numpy(img8).permute(2, 0, 1)[None].float() / 255, torch.tensor([sigma]))
    our_blur = our_blur[0].permute(1, 2, 0).numpy()
    table.add("Gaussian blur |radius| 1.04, pixels >= 4 from the border", our_blur[4:-4, 4:-4], their_blur[4:-4, 4:-4],
              "custom_transforms.py:95 PIL box passes on uint8 vs augment.py:54-71 exact Gaussian")
    table.add("Gaussian blur |radius| 1.04, all pixels", our_blur, their_blur,
              "+ PIL extends the border, ours reflects")
    # crop + flip: their integer square crop resized by F.interpolate; ours a box sampled by grid_sample
    crop = ct.RandomResizedCrop(N=2, res=16, scale=(0.5, 1.0))
    crop.rscale, crop.rcrop = [0.75, 0.5], [(0.3, 0.8), (1.0, 0.0)]
    flip = ct.RandomHorizontalTensorFlip(N=2)
    flip.plist = np.array([0.1, 0.9])
    img = torch.rand(2, 3, 32, 32)   # 3 channels: resized to res (down-sampling here)
    fmap = torch.rand(2, 8, 8, 8)    # > 5 channels: resized to res // 4 = 8 (up-sampling here)
    crop_f = ct.RandomResizedCrop(N=2, res=32, scale=(0.5, 1.0))
    crop_f.rscale, crop_f.rcrop = crop.rscale, crop.rcrop
    boxes = {}
    for name, t, op in (("image", img, crop), ("features", fmap, crop_f)):
        side = t.shape[-1]
        bx = []
        for i in range(2):
            r2 = int(op.rscale[i] * side)
            top, left = int(round((side - r2) * op.rcrop[i][0])), int(round((side - r2) * op.rcrop[i][1]))
            bx.append([left / side, top / side, (left + r2) / side, (top + r2) / side])
        boxes[name] = torch.tensor(bx)
    flips = torch.tensor([True, False])
    their_img = flip([0, 1], crop([0, 1], img))
    our_img = crop_resize(img, boxes["image"], (16, 16), flips)
    table.add("crop + flip, image (down-sampled)", our_img, their_img)
    their_f = flip([0, 1], crop_f([0, 1], fmap))
    our_f = crop_resize(fmap, boxes["features"], (8, 8), flips)
    table.add("crop + flip, features (up-sampled), inner cells", our_f[..., 1:-1, 1:-1], their_f[..., 1:-1, 1:-1])
    table.add("crop + flip, features (up-sampled), all cells", our_f, their_f,
              "custom_transforms.py:221,231 crop edge clamped vs augment.py:149 grid_sample reads past it")
    np.savez_compressed(out_dir / "picie_transforms.npz", x=x.numpy(),
                        **{f"factor_{n}": eff[n].numpy() for n in eff}, jitter=theirs.numpy(), gray=their_gray.numpy(),
                        img=img.numpy(), img_boxes=boxes["image"].numpy(), flips=flips.numpy(),
                        crop_img=their_img.numpy(),
                        fmap=fmap.numpy(), fmap_boxes=boxes["features"].numpy(), crop_fmap=their_f.numpy())


def hungarian_case(rel, table: Table, out_dir: Path) -> None:
    hist = np.array([[50, 3, 0, 7, 1], [2, 40, 9, 0, 4], [6, 1, 33, 2, 0], [0, 12, 5, 44, 3], [8, 0, 2, 1, 29]])
    cases = {"all classes present": hist}
    absent = hist.copy()
    absent[4] = 0  # class 4 has no label pixel; a cluster still matches it
    cases["a class absent from the labels"] = absent
    saved = {}
    for name, h in cases.items():
        true, pred = np.nonzero(h)
        counts = h[true, pred]
        label = np.repeat(true, counts)[None, None, :]  # their histogram: rows = labels, columns = predictions
        pred_px = np.repeat(pred, counts)
        image = F.one_hot(torch.from_numpy(pred_px), K).T.float()[None, :, None, :]  # (1, K, 1, L)
        args = argparse.Namespace(metric_test="cosine", K_test=K, K_train=K, in_dim=K, thing=False, stuff=False)
        cls = rel.utils.initialize_classifier(args)
        cls.module.weight.data = torch.eye(K)[:, :, None, None]
        acc, res = rel.commons.evaluate(args, logging.getLogger("picie"),
                                        [(None, image, torch.from_numpy(label))], cls, nn.Identity())
        ours = hungarian_scores(confusion_matrix(pred_px, label.ravel(), K, K, ignore_index=255))
        note = "" if name == "all classes present" else "utils.py:111-116 IoU 0 counted vs metrics.py:132-137 left out"
        table.add(f"Hungarian accuracy, {name}", 100 * ours.accuracy, acc)
        table.add(f"Hungarian mIoU, {name}", 100 * ours.miou, res["mean_iou"], note)
        key = "present" if name == "all classes present" else "absent"
        saved.update({f"{key}_hist": h, f"{key}_acc": acc, f"{key}_miou": res["mean_iou"]})
    np.savez_compressed(out_dir / "picie_hungarian.npz", **saved)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("picie", type=Path, help="checkout of github.com/janghyuncho/PiCIE")
    p.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "parity", help="where picie_*.npz go")
    a = p.parse_args(argv)
    if not (a.picie / "train_picie.py").is_file() or not (a.picie / "commons.py").is_file():
        print(f"picie parity: {a.picie} has no train_picie.py/commons.py; pass a checkout of "
              "github.com/janghyuncho/PiCIE", file=sys.stderr)
        return 2
    try:
        import faiss  # noqa: F401
    except ImportError:
        print("picie parity: faiss is not importable; install faiss-cpu (their k-means is faiss's)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rel = load_released(a.picie.resolve())
    a.out.mkdir(parents=True, exist_ok=True)
    table = DiffTable()
    loss_case(rel, table, a.out)
    clustering_case(rel, table, a.out)
    transforms_case(rel, table, a.out)
    hungarian_case(rel, table, a.out)
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
