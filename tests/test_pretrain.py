"""MoCo v2 pretraining: the core maths in process, then a real 2-worker run on local Ray + SQLite MLflow."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from raysseg.core.backbones import build_backbone
from raysseg.config import ConfigError, load_config
from raysseg.methods.moco.core import (MoCo, ViewGeometry, dense_info_nce, info_nce, two_crops,
                                      view_correspondence)


def test_pooled_shapes():
    torch.manual_seed(0)
    for name, dim, size in (("resnet18_fpn", 512, 64), ("resnet50_fpn", 2048, 32), ("vit_small_patch16", 384, 32)):
        backbone = build_backbone(name, frozen=True)
        assert backbone.pooled_dim == dim
        with torch.no_grad():
            out = backbone.pooled(torch.randn(2, 3, size, size))
        assert out.shape == (2, dim), name
    vit = build_backbone("vit_small_patch16")
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():  # the mean of the patch tokens (the feature map), not the class token
        assert torch.allclose(vit.pooled(x), vit(x).features.mean(dim=(2, 3)), atol=1e-5)
    with pytest.raises(Exception, match="divisible by 16"):
        vit.pooled(torch.zeros(1, 3, 30, 32))


def test_info_nce_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    k = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    queue = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    t = 0.2
    expected = []
    for i in range(3):
        pos = float(q[i] @ k[i]) / t
        negs = [float(q[i] @ queue[j]) / t for j in range(5)]
        expected.append(-pos + np.log(np.exp(pos) + np.sum(np.exp(negs))))
    per_row = info_nce(q, k, queue, t, reduction="none")
    assert np.allclose(per_row.numpy(), expected, atol=1e-5)
    assert float(info_nce(q, k, queue, t)) == pytest.approx(np.mean(expected), abs=1e-5)
    # a perfect positive among orthogonal negatives gives a small loss; gradients reach q only
    q2 = torch.eye(4)[:2].requires_grad_(True)
    k2 = torch.eye(4)[:2].requires_grad_(True)
    small = info_nce(q2, k2, torch.eye(4)[2:], 0.05)
    small.backward()
    assert float(small.detach()) < 1e-6 and k2.grad is None and q2.grad is not None


def test_pooled_and_features_is_pooled_and_forward_in_one_pass():
    torch.manual_seed(0)
    for name in ("resnet18_fpn", "vit_small_patch16"):
        backbone = build_backbone(name, frozen=True)
        x = torch.randn(2, 3, 64, 32)
        with torch.no_grad():
            pooled, features = backbone.pooled_and_features(x)
            assert torch.allclose(pooled, backbone.pooled(x), atol=1e-5), name
            assert torch.allclose(features, backbone(x).features, atol=1e-5), name


def test_view_correspondence_maps_points_through_the_crops():
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    no, yes = torch.tensor([False]), torch.tensor([True])
    # the same crop: every point matches itself
    pq, pk, valid = view_correspondence(ViewGeometry(full, no, full, no), grid=2)
    assert torch.allclose(pq[0], torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]))
    assert torch.allclose(pk, pq) and bool(valid.all())
    # the key view mirrored: x changes sign
    _, pk, valid = view_correspondence(ViewGeometry(full, no, full, yes), grid=2)
    assert torch.allclose(pk[0], torch.tensor([[0.5, -0.5], [-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]))
    # the key view is the right half of the image: the left column (image x 1/4) is outside it,
    # the right column (image x 3/4) is the key view's centre column
    right = torch.tensor([[0.5, 0.0, 1.0, 1.0]])
    _, pk, valid = view_correspondence(ViewGeometry(full, no, right, no), grid=2)
    assert valid.tolist() == [[False, True, False, True]]
    assert torch.allclose(pk[0, [1, 3]], torch.tensor([[0.0, -0.5], [0.0, 0.5]]))
    assert torch.allclose(pk[0, [0, 2], 0], torch.tensor([-2.0, -2.0]))
    # the points read the same image content in both views (a crop of a linear ramp)
    from raysseg.core.augment import crop_resize, random_boxes
    g = torch.Generator().manual_seed(1)
    ramp = torch.linspace(0, 1, 64)
    image = torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64)])[None].expand(3, -1, -1, -1)
    geometry = ViewGeometry(random_boxes(3, g, (0.3, 1.0)), torch.tensor([True, False, True]),
                            random_boxes(3, g, (0.3, 1.0)), torch.tensor([False, False, True]))
    views = [crop_resize(image, geometry.boxes_q, (32, 32), geometry.flips_q),
             crop_resize(image, geometry.boxes_k, (32, 32), geometry.flips_k)]
    pq, pk, valid = view_correspondence(geometry, grid=4)
    from raysseg.methods.moco.core import sample_points
    at_q, at_k = sample_points(views[0], pq), sample_points(views[1], pk)
    assert bool(valid.any()) and torch.allclose(at_q[valid], at_k[valid], atol=2e-2)


def test_dense_info_nce_matches_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    n, k_images, m, p, t = 2, 3, 4, 5, 0.3
    q = F.normalize(torch.randn(n, m, p, generator=g), dim=-1)
    keys = F.normalize(torch.randn(k_images, m, p, generator=g), dim=-1)
    valid = torch.rand(n, m, generator=g) > 0.3
    key_valid = torch.rand(k_images, m, generator=g) > 0.2
    own = torch.tensor([1, 2])  # this worker's images are rows 1 and 2 of every worker's keys
    losses = []
    for i in range(n):
        for j in range(m):
            if not valid[i, j]:
                continue
            pos = float(q[i, j] @ keys[own[i], j]) / t
            negs = [float(q[i, j] @ keys[a, b]) / t for a in range(k_images) for b in range(m)
                    if a != own[i] and key_valid[a, b]]
            losses.append(-pos + np.log(np.exp(pos) + np.sum(np.exp(negs))))
    got = dense_info_nce(q, valid, keys, key_valid, own, t)
    assert float(got) == pytest.approx(np.mean(losses), abs=1e-5)
    none = dense_info_nce(q.requires_grad_(True), torch.zeros(n, m, dtype=torch.bool), keys, key_valid, own, t)
    assert float(none) == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="own"):
        dense_info_nce(q, valid, keys, key_valid, own[:1], t)


def test_queue_is_a_ring_buffer():
    moco = MoCo(build_backbone("resnet18_fpn", frozen=False), proj_dim=2, queue_size=5, seed=3)
    again = MoCo(build_backbone("resnet18_fpn", frozen=False), proj_dim=2, queue_size=5, seed=3)
    assert torch.equal(moco.queue, again.queue)  # same seed, same initial queue on every worker
    assert torch.allclose(moco.queue.norm(dim=1), torch.ones(5))
    keys = torch.arange(14, dtype=torch.float32).view(7, 2)
    moco.enqueue(keys[:3])
    assert int(moco.queue_ptr) == 3 and torch.equal(moco.queue[:3], keys[:3])
    moco.enqueue(keys[3:6])  # wraps: rows 3, 4, then 0
    assert int(moco.queue_ptr) == 1
    assert torch.equal(moco.queue, torch.stack([keys[5], keys[1], keys[2], keys[3], keys[4]]))
    moco.enqueue(torch.arange(14, 28, dtype=torch.float32).view(7, 2))  # more than L: the last 5 survive
    assert int(moco.queue_ptr) == (1 + 7) % 5
    assert sorted(moco.queue[:, 0].tolist()) == [18.0, 20.0, 22.0, 24.0, 26.0]
    assert moco.queue[(1 + 6) % 5, 0] == 26.0  # the newest key sits just before the pointer
    assert moco.queue_checksum()[0] != again.queue_checksum()[0]
    # the FPN is not on the pooled path: not trained, so DDP does not wait for its gradients
    assert not any(p.requires_grad for p in moco.encoder_q.backbone.fpn.parameters())
    assert not any(p.requires_grad for p in moco.encoder_k.parameters())


def test_two_crops_and_one_training_step(synth_data, tmp_path):
    from raysseg.methods.base import TrainContext
    from raysseg.methods.moco.trainer import MoCoTrainer
    from raysseg.runtime.pretrain import backbone_state

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 48, 48, 3), dtype=torch.uint8, generator=g)
    a, b, geometry = two_crops(images, g, 32, (0.2, 1.0))
    assert a.shape == b.shape == (4, 3, 32, 32) and not torch.allclose(a, b)
    assert geometry.boxes_q.shape == (4, 4) and geometry.flips_k.shape == (4,)
    g0 = torch.Generator().manual_seed(0)
    torch.randint(0, 256, (4, 48, 48, 3), dtype=torch.uint8, generator=g0)
    assert torch.allclose(two_crops(images, g0, 32, (0.2, 1.0))[0], a)  # all randomness from the generator

    cfg = load_config("kmeans_synth", [f"data.train={synth_data}/train", "model.backbone=resnet18_fpn",
                                       "data.image_size=32", "pretrain.queue=8", "pretrain.batch_size=4"])
    torch.manual_seed(0)
    moco = MoCo(build_backbone("resnet18_fpn", frozen=False), 16, 8, 0.9, 0.2).train()
    moco.sync_key_encoder()
    trainer = MoCoTrainer(cfg, moco, TrainContext(rank=0, world=1, device=torch.device("cpu"), shared=None, total_steps=4))
    before = {k: v.clone() for k, v in moco.state_dict().items()}
    weight = np.array([1, 1, 1, 0], np.float32)  # one filler row: not in the loss, not in the queue
    stats = trainer.step(images.numpy()[:, :32, :32], weight, step=0)
    assert np.isfinite(stats["loss"]) and stats["lr"] == cfg.pretrain.lr
    after = moco.state_dict()
    assert int(after["queue_ptr"]) == 3 and not torch.equal(after["queue"][:3], before["queue"][:3])
    assert torch.equal(after["queue"][3:], before["queue"][3:])
    name = "encoder_q.backbone.trunk.conv1.weight"
    assert not torch.equal(after[name], before[name])  # SGD moved the query encoder
    assert torch.equal(after["encoder_q.backbone.fpn.laterals.0.weight"], before["encoder_q.backbone.fpn.laterals.0.weight"])
    state = backbone_state(after, "resnet18_fpn")
    assert state and all(k.startswith("trunk.") for k in state)
    path = tmp_path / "b.pt"
    torch.save(state, path)
    loaded = build_backbone("resnet18_fpn", weights=str(path), fpn_dim=256)  # trunk only: any fpn_dim loads
    assert torch.equal(loaded.trunk.conv1.weight, after[name])


def test_a_step_with_the_dense_term_trains_the_fpn_and_saves_it(synth_data, tmp_path):
    from raysseg.core.backbones import BackboneWeightsError
    from raysseg.methods.base import TrainContext
    from raysseg.methods.moco.trainer import MoCoTrainer
    from raysseg.runtime.pretrain import backbone_state

    cfg = load_config("kmeans_synth", [f"data.train={synth_data}/train", "model.backbone=resnet18_fpn",
                                       "data.image_size=32", "pretrain.queue=8", "pretrain.batch_size=4",
                                       "pretrain.dense_weight=0.5", "pretrain.dense_grid=3"])
    torch.manual_seed(0)
    moco = MoCo(build_backbone("resnet18_fpn", frozen=False, fpn_dim=32), 16, 8, 0.9, 0.2, dense_weight=0.5).train()
    moco.sync_key_encoder()
    assert all(p.requires_grad for p in moco.encoder_q.backbone.fpn.parameters())
    trainer = MoCoTrainer(cfg, moco, TrainContext(rank=0, world=1, device=torch.device("cpu"), shared=None, total_steps=4))
    before = {k: v.clone() for k, v in moco.state_dict().items()}
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    stats = trainer.step(images.numpy(), np.ones(4, np.float32), step=0)
    assert np.isfinite(stats["dense_loss"]) and 0 < stats["dense_points"] <= 1
    after = moco.state_dict()
    for name in ("encoder_q.backbone.fpn.laterals.0.weight", "encoder_q.dense_projector.net.0.weight"):
        assert not torch.equal(after[name], before[name]), name
    state = backbone_state(after, "resnet18_fpn", with_fpn=True)
    assert any(k.startswith("fpn.") for k in state) and not any("projector" in k for k in state)
    torch.save(state, tmp_path / "b.pt")
    loaded = build_backbone("resnet18_fpn", weights=str(tmp_path / "b.pt"), fpn_dim=32)
    assert torch.equal(loaded.fpn.laterals[0].weight, after["encoder_q.backbone.fpn.laterals.0.weight"])
    with pytest.raises(BackboneWeightsError, match="an FPN of 32 channels .* set model.fpn_dim=32"):
        build_backbone("resnet18_fpn", weights=str(tmp_path / "b.pt"), fpn_dim=64)


def test_inputs_are_checked_before_ray(tmp_path, synth_data):
    from raysseg.runtime.pretrain import check_pretrain_inputs, pretrain_run_name

    cfg = load_config("kmeans_synth", [f"data.train={synth_data}/train", "pretrain.batch_size=8"])
    with pytest.raises(ConfigError, match=r"pretrain.batch_size: 8 images per worker but only 4"):
        check_pretrain_inputs(cfg)
    with pytest.raises(ConfigError, match=r"data.train: .*no images/ folder"):
        check_pretrain_inputs(load_config("kmeans_synth", [f"data.train={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"pretrain.crop_size: 40 is not a multiple of 16"):
        check_pretrain_inputs(load_config("kmeans_synth", [f"data.train={synth_data}/train", "pretrain.crop_size=40",
                                                           "pretrain.batch_size=2"]))
    name = pretrain_run_name(cfg)
    assert name.startswith("kmeans_synth-pretrain-")
    assert pretrain_run_name(load_config("kmeans_synth", [f"data.train={synth_data}/train", "pretrain.batch_size=8",
                                                          "eval.crf=false", "method=hp"])) == name
    assert pretrain_run_name(load_config("kmeans_synth", [f"data.train={synth_data}/train", "pretrain.lr=0.1"])) != name
    base = [f"data.train={synth_data}/train", "pretrain.batch_size=8"]
    # the dense term's settings were added later: at their default (or unused) they leave the name alone
    assert pretrain_run_name(load_config("kmeans_synth", base + ["pretrain.dense_grid=5"])) == name
    dense = pretrain_run_name(load_config("kmeans_synth", base + ["pretrain.dense_weight=0.5"]))
    assert dense != name
    assert pretrain_run_name(load_config("kmeans_synth", base + ["pretrain.dense_weight=0.5", "pretrain.dense_grid=5"])) != dense


@pytest.mark.slow  # ~40 s; the step is checked in process above, the Ray path is the one training uses
def test_two_workers_pretrain_a_resnet_and_its_backbone_loads(tmp_path, ray_local, synth_data, capsys):
    from raysseg.apps import cli
    from raysseg.runtime.pretrain import pretrain

    overrides = [
        f"data.train={synth_data}/train", "data.image_size=64", f"train.storage={tmp_path}/runs",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db", "train.num_workers=2", "model.backbone=resnet18_fpn",
        "pretrain.epochs=2", "pretrain.batch_size=2", "pretrain.queue=6", "pretrain.proj_dim=16",
        "pretrain.crop_size=32", "train.log_every=1", f"data.cache={tmp_path}/cache",
    ]
    cfg = load_config("kmeans_synth", overrides)
    result = pretrain(cfg)

    assert result.backbone == str(tmp_path / "runs" / result.run_name / "backbone.pt")
    assert Path(result.backbone).is_file()
    # 8 images / 2 workers / batch 2 = 2 steps per epoch; every worker holds the same queue
    assert result.metrics["epoch"] == 2 and result.metrics["step"] == 4
    digests = result.metrics["queue_sha1_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]

    torch.manual_seed(0)
    random_init = build_backbone("resnet18_fpn")
    loaded = build_backbone("resnet18_fpn", weights=result.backbone)
    assert not torch.equal(loaded.trunk.conv1.weight, random_init.trunk.conv1.weight)
    assert not torch.equal(loaded.trunk.layer4[1].bn2.running_var, torch.ones(512))  # BN statistics trained too

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["raysseg.backbone"] == result.backbone
    assert run.data.params["pretrain.queue"] == "6" and run.data.params["method"] == "moco_v2"
    assert len(client.get_metric_history(result.run_id, "train/loss")) == 4
    assert np.isfinite(run.data.metrics["epoch/loss"]) and run.data.metrics["epoch/images_per_s"] > 0
    assert [a.path for a in client.list_artifacts(result.run_id)] == ["backbone.pt"]
    out = capsys.readouterr().out
    assert "use it with: --set model.weights=" + result.backbone in out
    assert f"[data cache] decoding 8 images of {synth_data}/train" in out  # read from the prepared cache

    # the same command again is recognised as finished, through the CLI
    args = ["pretrain", "--config", "kmeans_synth"] + [a for o in overrides for a in ("--set", o)]
    cli.main(args)
    out = capsys.readouterr().out
    assert "already finished" in out and f"backbone: {result.backbone}" in out


@pytest.mark.slow  # ~40 s: the dense term across 2 workers (shuffled keys, every worker's key points)
def test_two_workers_pretrain_with_the_dense_term_and_save_the_fpn(tmp_path, ray_local, synth_data):
    from raysseg.runtime.pretrain import pretrain

    cfg = load_config("kmeans_synth", [
        f"data.train={synth_data}/train", "data.image_size=64", f"train.storage={tmp_path}/runs",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db", "train.num_workers=2", "model.backbone=resnet18_fpn",
        "model.fpn_dim=32", "pretrain.epochs=1", "pretrain.batch_size=2", "pretrain.queue=6", "pretrain.proj_dim=16",
        "pretrain.crop_size=32", "pretrain.dense_weight=0.5", "pretrain.dense_grid=3", "train.log_every=1",
    ])
    result = pretrain(cfg)
    digests = result.metrics["queue_sha1_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert np.isfinite(run.data.metrics["train/dense_loss"]) and run.data.params["pretrain.dense_weight"] == "0.5"
    assert np.isfinite(run.data.metrics["epoch/dense_loss"])
    saved = torch.load(result.backbone, weights_only=True)  # the FPN is saved (it trains: the step test above)
    loaded = build_backbone("resnet18_fpn", weights=result.backbone, fpn_dim=32)
    assert torch.equal(loaded.fpn.laterals[3].weight, saved["fpn.laterals.3.weight"])
