import argparse

import pytest
import torch
import torchvision

from raysseg.core.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneError,
    BackboneWeightsError,
    build_backbone,
    normalize,
)


def _seeded(name, seed, **kwargs):
    torch.manual_seed(seed)
    return build_backbone(name, **kwargs)


@pytest.mark.parametrize(
    "name, kwargs, image_hw, dim, stride",
    [
        ("vit_small_patch16", {}, (48, 64), 384, 16),
        ("vit_small_patch8", {}, (32, 48), 384, 8),
        ("vit_base_patch8", {}, (32, 32), 768, 8),
        ("resnet18_fpn", {}, (64, 64), 128, 4),
        ("resnet50_fpn", {"fpn_dim": 256}, (64, 96), 256, 4),
    ],
)
def test_feature_shape_and_stride(name, kwargs, image_hw, dim, stride):
    model = _seeded(name, 0, **kwargs)
    assert (model.name, model.dim, model.stride) == (name, dim, stride)
    h, w = image_hw
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    assert out.features.shape == (2, dim, h // stride, w // stride)
    assert out.attn_logits is None
    assert torch.isfinite(out.features).all()


def test_input_not_divisible_by_stride_is_rejected():
    model = _seeded("vit_small_patch16", 0)
    with pytest.raises(BackboneError, match="divisible by 16"):
        model(torch.randn(1, 3, 40, 64))


def test_unknown_name_and_misplaced_fpn_dim_are_rejected():
    with pytest.raises(BackboneError, match="unknown backbone 'vit_huge'"):
        build_backbone("vit_huge")
    with pytest.raises(BackboneError, match="fpn_dim"):
        build_backbone("vit_small_patch16", fpn_dim=256)


def test_resnet_has_no_attention():
    model = _seeded("resnet18_fpn", 0)
    with pytest.raises(BackboneError, match="no attention"):
        model(torch.randn(1, 3, 32, 32), with_attention=True)


def test_attention_logits_match_timm_probabilities_and_weights():
    model = _seeded("vit_small_patch16", 0)
    attn = model.vit.blocks[-1].attn
    captured = {}
    hooks = [
        attn.attn_drop.register_forward_pre_hook(lambda m, args: captured.__setitem__("probs", args[0])),
        attn.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0])),
    ]
    x = torch.randn(2, 3, 48, 64)  # 3 x 4 patches + CLS = 13 tokens
    with torch.no_grad():
        tokens, head_logits = model.forward_tokens(x, with_attention=True)
    for hook in hooks:
        hook.remove()
    heads = attn.num_heads
    assert head_logits.shape == (2, heads, 13, 13)
    # softmax of our per-head logits is exactly what timm applies to v
    torch.testing.assert_close(head_logits.softmax(-1), captured["probs"], rtol=0, atol=1e-6)

    # softmax is shift-invariant per row, so also check the raw values against a per-head loop
    tokens_in = captured["x"]
    w_q, w_k, _ = attn.qkv.weight.chunk(3, dim=0)
    b_q, b_k, _ = attn.qkv.bias.chunk(3, dim=0)
    head_dim = tokens_in.shape[-1] // heads
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        q = tokens_in @ w_q[rows].T + b_q[rows]
        k = tokens_in @ w_k[rows].T + b_k[rows]
        reference = q @ k.transpose(-2, -1) / head_dim**0.5
        torch.testing.assert_close(head_logits[:, h], reference, rtol=1e-4, atol=1e-4)

    # the public output: CLS removed, mean over heads; features unaffected by the attention path
    with torch.no_grad():
        out = model(x, with_attention=True)
        plain = model(x)
    assert out.attn_logits.shape == (2, 12, 12)
    torch.testing.assert_close(out.attn_logits, head_logits[:, :, 1:, 1:].mean(1))
    torch.testing.assert_close(out.features, plain.features)
    torch.testing.assert_close(out.features, tokens[:, 1:].reshape(2, 3, 4, 384).permute(0, 3, 1, 2))


def test_frozen_backbone_has_no_grads_and_stays_in_eval():
    model = _seeded("resnet18_fpn", 0, frozen=True)
    assert all(not p.requires_grad for p in model.parameters())
    model.train()
    assert not any(m.training for m in model.modules())
    bn_before = model.trunk.bn1.running_mean.clone()
    out = model(torch.randn(2, 3, 32, 32))
    assert not out.features.requires_grad
    torch.testing.assert_close(model.trunk.bn1.running_mean, bn_before)  # no BatchNorm update

    trainable = _seeded("resnet18_fpn", 0, frozen=False)
    trainable.train()
    assert trainable.training and trainable.trunk.bn1.training
    trainable(torch.randn(2, 3, 32, 32)).features.sum().backward()
    assert trainable.trunk.conv1.weight.grad is not None
    assert trainable.fpn.laterals[0].weight.grad is not None


def test_normalize_hand_computed():
    images = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    images[0, 0, 1] = 255
    out = normalize(images)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c])
        assert out[0, c, 0, 1].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
    with pytest.raises(BackboneError, match="uint8"):
        normalize(torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize("layout", ["dino_teacher", "plain"])
def test_vit_weights_round_trip(tmp_path, layout):
    source = _seeded("vit_small_patch16", 0)
    state = source.vit.state_dict()
    if layout == "dino_teacher":
        teacher = {"module.backbone." + k: v for k, v in state.items()}
        teacher["module.head.mlp.0.weight"] = torch.randn(8, 384)
        teacher["module.head.last_layer.weight_g"] = torch.randn(65536, 1)
        checkpoint = {"teacher": teacher, "epoch": 3, "args": argparse.Namespace(arch="vit_small")}
    else:
        checkpoint = state
    path = tmp_path / "weights.pth"
    torch.save(checkpoint, path)

    x = torch.randn(2, 3, 64, 64)
    unloaded = _seeded("vit_small_patch16", 1)
    loaded = _seeded("vit_small_patch16", 1, weights=str(path))
    with torch.no_grad():
        expected = source(x, with_attention=True)
        got = loaded(x, with_attention=True)
        assert not torch.allclose(unloaded(x).features, expected.features)
    torch.testing.assert_close(got.features, expected.features)
    torch.testing.assert_close(got.attn_logits, expected.attn_logits)
    assert loaded.frozen and not loaded.training


def test_moco_resnet_trunk_loads_and_fpn_stays_initialised(tmp_path):
    torch.manual_seed(0)
    trunk = torchvision.models.resnet18(weights=None)
    state = {}
    for k, v in trunk.state_dict().items():  # includes fc.* which must be dropped
        state["module.encoder_q." + k] = v
        state["module.encoder_k." + k] = torch.zeros_like(v)
    state["module.queue"] = torch.randn(128, 16)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path = tmp_path / "moco_r18.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)

    loaded = _seeded("resnet18_fpn", 1, weights=str(path))
    reference = _seeded("resnet18_fpn", 1)
    for k, v in trunk.state_dict().items():
        if not k.startswith("fc."):
            torch.testing.assert_close(loaded.trunk.state_dict()[k], v)
    for k, v in reference.fpn.state_dict().items():
        torch.testing.assert_close(loaded.fpn.state_dict()[k], v)
    assert not torch.equal(loaded.trunk.conv1.weight, reference.trunk.conv1.weight)


def test_swav_resnet_loads_without_its_heads(tmp_path):
    """SwAV's release: the DDP ``module.`` prefix, a projection head and prototypes beside the trunk."""
    torch.manual_seed(0)
    trunk = torchvision.models.resnet18(weights=None)
    state = {"module." + k: v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.randn(2048, 512)
    state["module.prototypes.weight"] = torch.randn(3000, 128)
    path = tmp_path / "swav_r18.pth.tar"
    torch.save(state, path)
    loaded = _seeded("resnet18_fpn", 1, weights=str(path))
    torch.testing.assert_close(loaded.trunk.layer4[1].conv2.weight, trunk.layer4[1].conv2.weight)


def _single_line_error(path, name, match):
    with pytest.raises(BackboneWeightsError) as info:
        build_backbone(name, weights=str(path))
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and name in message and "pick the backbone" in message
    assert match in message
    return message


def test_wrong_keys_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    message = _single_line_error(path, "vit_small_patch16", "missing keys")
    assert "unexpected keys" in message and "conv1.weight" in message


def test_wrong_shapes_checkpoint_is_rejected(tmp_path):
    state = _seeded("vit_small_patch16", 0).vit.state_dict()
    state["pos_embed"] = torch.zeros(1, 785, 384)  # a /8 model's position table
    path = tmp_path / "vit_s8_pos.pth"
    torch.save({"student": state}, path)
    message = _single_line_error(path, "vit_small_patch16", "shape mismatches")
    assert "pos_embed: checkpoint (1, 785, 384) vs model (1, 197, 384)" in message


def test_unreadable_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "not_a_checkpoint.pth"
    path.write_bytes(b"definitely not a torch file")
    with pytest.raises(BackboneWeightsError, match="not a readable torch checkpoint") as info:
        build_backbone("resnet18_fpn", weights=str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    from raysseg.core.backbones import BackboneWeightsError
    from raysseg.io.storage import StorageError, read_bytes

    path = tmp_path / "nowhere" / "dino.pth"
    with pytest.raises(StorageError) as info:
        build_backbone("vit_small_patch16", weights=str(path), read_bytes=read_bytes)
    assert str(path) in str(info.value)
    with pytest.raises(BackboneWeightsError) as info:  # core's own reader (no storage layer) says the same
        build_backbone("vit_small_patch16", weights=str(path))
    assert str(path) in str(info.value)


def test_dino_checkpoint_loads_from_s3(s3_server):
    """The real loading path from object storage, on a checkpoint the test writes itself."""
    import io

    from raysseg.io.storage import read_bytes, write_bytes_atomic

    source = _seeded("vit_small_patch16", 0)
    buf = io.BytesIO()
    torch.save({"teacher": {"backbone." + k: v for k, v in source.vit.state_dict().items()}}, buf)
    s3_server.create_bucket("weights")
    write_bytes_atomic("s3://weights/dino/vits16.pth", buf.getvalue())
    loaded = _seeded("vit_small_patch16", 1, weights="s3://weights/dino/vits16.pth", read_bytes=read_bytes)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).features, source(x).features)


# --------------------------------------------------------------------------- DINOv2 (patch 14, registers)

DINOV2 = ("vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2")


def test_every_vit_is_in_the_stride_table_and_in_timm():
    import timm

    from raysseg.core.backbones import RESNET_MODELS, VIT_MODELS
    from raysseg.core.geometry import BACKBONES, VIT_PATCH, input_multiple

    assert set(VIT_MODELS) == set(VIT_PATCH) and set(BACKBONES) == set(VIT_MODELS) | set(RESNET_MODELS)
    for name, timm_name in VIT_MODELS.items():
        assert timm.is_model(timm_name), timm_name
        assert input_multiple(name) == VIT_PATCH[name] == int(timm_name.split("patch")[1][:2].rstrip("_"))


def _as_dinov2_release(model) -> dict:
    """The state dict in the names facebookresearch/dinov2 saves (the inverse of our mapping): a
    ``mask_token``; with registers ``register_tokens`` and a position table with the class token's row."""
    state = dict(model.vit.state_dict())
    state["mask_token"] = torch.randn(1, 384)
    if "reg_token" in state:
        cls_position = torch.randn(1, 1, 384) * 0.02
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
        state["cls_token"] = state["cls_token"] - cls_position
    return state


@pytest.mark.parametrize("name, prefix", [(DINOV2[0], 1), (DINOV2[1], 5)])
def test_dinov2_at_any_size_with_attention_and_its_release_layout(tmp_path, name, prefix):
    """Any multiple of 14 (the position table is resampled); the last block's attention as for DINO's ViTs
    (per-head logits whose softmax is timm's; prefix tokens, CLS and registers, dropped; mean over heads);
    a checkpoint in DINOv2's own names gives the same features."""
    model = _seeded(name, 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # the tokens timm initialises to zero must load too
    assert (model.stride, model.dim, model.num_prefix_tokens) == (14, 384, prefix)
    attn = model.vit.blocks[-1].attn
    probs = []
    hook = attn.attn_drop.register_forward_pre_hook(lambda m, args: probs.append(args[0]))
    try:
        for h, w in ((56, 84), (112, 70)):
            with torch.no_grad():
                tokens, head_logits = model.forward_tokens(torch.randn(2, 3, h, w), with_attention=True)
            t = prefix + (h // 14) * (w // 14)
            assert tokens.shape == (2, t, 384) and head_logits.shape == (2, 6, t, t)
            torch.testing.assert_close(head_logits.softmax(-1), probs[-1], rtol=0, atol=1e-6)
    finally:
        hook.remove()
    x = torch.randn(2, 3, 56, 84)
    with torch.no_grad():
        out, plain = model(x, with_attention=True), model(x)
        tokens, head_logits = model.forward_tokens(x, with_attention=True)
    assert out.features.shape == (2, 384, 4, 6) and out.attn_logits.shape == (2, 24, 24)
    torch.testing.assert_close(out.attn_logits, head_logits[:, :, prefix:, prefix:].mean(1))
    torch.testing.assert_close(out.features, plain.features)
    torch.testing.assert_close(out.features, tokens[:, prefix:].reshape(2, 4, 6, 384).permute(0, 3, 1, 2))
    with pytest.raises(BackboneError, match="divisible by 14"):
        model(torch.randn(1, 3, 56, 64))

    path = tmp_path / f"{name}.pth"
    torch.save(_as_dinov2_release(model), path)
    loaded = _seeded(name, 1, weights=str(path))
    assert (loaded.vit.reg_token is None) == (prefix == 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).features, out.features, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["kmeans", "hp", *(pytest.param(m, marks=pytest.mark.slow)
                                                      for m in ("segsort", "concepts", "moco"))])
def test_every_method_that_takes_a_vit_runs_on_dinov2(method):
    """One training step (k-means: codes and cluster maps) at 56 px on the register variant. The methods
    that train the ViT (segsort, concepts, MoCo: a backward through it) are in the slow set."""
    import numpy as np

    from raysseg.apps.bench_steps import CPU_SETTINGS, _config
    from raysseg.apps.synth import synth_images

    backbone = ["model.backbone=vit_small_patch14_reg4_dinov2", "data.image_size=56"]
    if method == "kmeans":
        from raysseg.methods.registry import build_segmenter

        seg = build_segmenter(_config("kmeans_camvid", backbone))
        codes = seg.codes(torch.from_numpy(synth_images(2, 56)))
        assert codes.shape == (2, 384, 4, 4) and torch.isfinite(codes).all()
        assert seg.cluster_map(torch.from_numpy(synth_images(1, 56))).shape == (1, 56, 56)
        return
    if method == "moco":
        from raysseg.methods.base import TrainContext
        from raysseg.methods.moco.trainer import MoCoTrainer, build_moco
        from raysseg.methods.shared import LocalSharedState

        cfg = _config("kmeans_camvid", ["pretrain.batch_size=4", "pretrain.queue=64", "pretrain.crop_size=56",
                                        *backbone])
        moco = build_moco(cfg, torch.device("cpu"))
        moco.sync_key_encoder()
        ctx = TrainContext(rank=0, world=1, device=torch.device("cpu"), shared=LocalSharedState(), total_steps=2)
        batch = synth_images(cfg.pretrain.batch_size, 56)
        stats = MoCoTrainer(cfg, moco, ctx).step(batch, np.ones(len(batch), np.float32), 0)
    else:
        from raysseg.engine.steps import build_rig, memory_rows

        name, preset = CPU_SETTINGS[method]  # segsort and concepts train the ViT; hp keeps it frozen
        cfg = _config(name, [*preset, *backbone])
        rig = build_rig(cfg, memory_rows(synth_images(4, 56), 16), "cpu", total_steps=2)
        stats = rig.trainer.train_step(next(rig.batches()), 0)
    assert cfg.model.backbone == "vit_small_patch14_reg4_dinov2"
    losses = {k: v for k, v in stats.items() if k.startswith("loss")}
    assert losses and all(np.isfinite(v) for v in losses.values()), stats


def test_vit_linears_run_on_onednn_only_where_nothing_else_changes():
    """A frozen CPU forward takes oneDNN's fused linear (+GELU) and equals timm's own modules to float32
    rounding; with gradients or autocast it is F.linear exactly as before; the state dict is timm's."""
    import timm
    from raysseg.core.backbones import ONEDNN, OneDnnLinear

    model = _seeded("vit_small_patch16", 0).eval()
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    assert list(model.vit.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(model.vit.state_dict())
    reference.eval()
    mlp = model.vit.blocks[0].mlp
    assert isinstance(mlp.fc1, OneDnnLinear) and mlp.fc1.gelu == "none" and mlp.fc2.gelu is None
    assert isinstance(mlp.act, torch.nn.Identity)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        assert mlp.fc1._onednn_applies(torch.randn(2, 13, 384)) == ONEDNN
        torch.testing.assert_close(model.forward_tokens(x)[0], reference.forward_features(x), rtol=0, atol=5e-5)
    tokens = torch.randn(2, 13, 384, requires_grad=True)
    assert not mlp.fc1._onednn_applies(tokens)
    expected = torch.nn.functional.gelu(torch.nn.functional.linear(tokens, mlp.fc1.weight, mlp.fc1.bias))
    assert torch.equal(mlp.fc1(tokens), expected)  # the autograd path is the plain one, bit for bit
    mlp.fc1(tokens).sum().backward()
    assert tokens.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not mlp.fc2._onednn_applies(torch.randn(2, 13, 1536))
        assert mlp.fc2(torch.randn(2, 13, 1536)).dtype == torch.bfloat16
    from raysseg.core.machine import count_flops

    with torch.no_grad():  # the FLOP counter counts oneDNN's linears as it counts timm's
        assert count_flops(lambda: model.forward_tokens(x)) == count_flops(lambda: reference.forward_features(x))


@pytest.mark.slow
def test_compiled_frozen_vit_on_cpu_equals_eager():
    """torch.compile traces the plain F.linear path (inductor cannot lower oneDNN's op on parameters)."""
    model = _seeded("vit_small_patch16", 0, frozen=True)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        eager = model(x, with_attention=True)
        model.compile()
        compiled = model(x, with_attention=True)
    torch.testing.assert_close(compiled.features, eager.features, rtol=0, atol=5e-5)
    torch.testing.assert_close(compiled.attn_logits, eager.attn_logits, rtol=0, atol=5e-5)
