"""Feature backbones: DINO and DINOv2 ViTs (timm) and ResNet + FPN (torchvision), plus weight loading.

Every backbone maps ImageNet-normalised images [B, 3, H, W] to a feature map
[B, C, H / stride, W / stride]. ViTs can also return the pre-softmax attention logits
of their last block between patch tokens (used by HP's local hidden positives).
ViTs take any input size that is a multiple of their patch: timm's ``dynamic_img_size``
resamples the position table (bicubic, antialiased, by output size; DINO's and DINOv2's
own code resample by scale factor with a 0.1 offset: equal at the training grid, close
elsewhere). Nothing here downloads weights: models are built randomly initialised (seed with
``torch.manual_seed``) and checkpoints are loaded from a path or whatever ``read_bytes``
reads (s3:// URIs; names of :mod:`raysseg.io.weights`).
"""

from __future__ import annotations

import argparse
import io
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.flop_counter import flop_registry, register_flop_formula

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# backbone name -> timm structure name (DINO: timm's ViTs at 224; DINOv2: timm's own names, at 518)
VIT_MODELS = {
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_small_patch8": "vit_small_patch8_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_base_patch8": "vit_base_patch8_224",
    **{name: name for name in ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2",
                               "vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2")},
}
# backbone name -> (torchvision constructor name, channels of layer1..layer4)
RESNET_MODELS = {
    "resnet18_fpn": ("resnet18", (64, 128, 256, 512)),
    "resnet50_fpn": ("resnet50", (256, 512, 1024, 2048)),
}
BACKBONE_NAMES = tuple(VIT_MODELS) + tuple(RESNET_MODELS)
DEFAULT_FPN_DIM = 128


class BackboneError(ValueError):
    """Bad backbone name, arguments or input."""


class BackboneWeightsError(BackboneError):
    """A checkpoint that cannot be read or does not fit the backbone."""


@dataclass
class BackboneOutput:
    """features: [B, C, h, w]; attn_logits: [B, h*w, h*w] head-mean pre-softmax logits
    of the last block between patch tokens (row = query), or None."""

    features: Tensor
    attn_logits: Tensor | None = None


def normalize(images_uint8: Tensor) -> Tensor:
    """uint8 images [B, H, W, 3] -> ImageNet-normalised float32 [B, 3, H, W]."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise BackboneError(
            f"normalize expects uint8 images shaped [B, H, W, 3], got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}; convert the batch to uint8 NHWC RGB first"
        )
    return standardize(images_uint8.permute(0, 3, 1, 2).float().div_(255.0)).contiguous()


def standardize(x: Tensor) -> Tensor:
    """Float images in [0, 1] [B, 3, H, W] -> ImageNet-normalised (e.g. after photometric augmentation)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def vit_attention_logits(attn: nn.Module, qkv: Tensor) -> Tensor:
    """Pre-softmax attention logits of a timm ``Attention`` module.

    attn: the module (uses its q_norm, k_norm, scale, num_heads, head_dim); qkv: the output of its ``qkv``
    layer in a forward pass [B, T, 3D] (captured, not recomputed). Returns [B, heads, T, T] with
    logits[b, h, i, j] = scale * q_i . k_j, exactly what timm softmaxes.
    """
    b, t, _ = qkv.shape
    qkv = qkv.reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return (q * attn.scale) @ k.transpose(-2, -1)


# oneDNN's fused linear, on x86-64 only (where it was measured; elsewhere torch's default stays)
ONEDNN = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")


class OneDnnLinear(nn.Module):
    """A ViT's ``nn.Linear``, optionally with the GELU that follows it, on oneDNN where that is safe.

    It keeps the layer's own ``weight`` and ``bias`` (same parameters, same state-dict keys). A frozen
    backbone's eager forward (float32 on CPU, no gradient to record, no autocast, not traced by
    torch.compile) runs ``torch.ops.mkldnn._linear_pointwise`` with the GELU fused. Everything else (GPU,
    autocast, training, compiled graphs, whose inductor lowers that op only for frozen constants) runs
    ``F.linear`` and ``F.gelu`` as before. Same float32 precision, another kernel: outputs differ from
    MKL's sgemm by rounding. On the benchmarks' AMD EPYC a ViT-S/16 forward ran 1.17x (1 thread) and
    1.22x (2 threads) as fast as with MKL's sgemm (benchmarks/vit_linears.py).

    x: [..., in_features] -> [..., out_features]; ``gelu``: None, "none" (erf) or "tanh"."""

    def __init__(self, linear: nn.Linear, gelu: str | None = None):
        super().__init__()
        self.weight, self.bias, self.gelu = linear.weight, linear.bias, gelu

    def forward(self, x: Tensor) -> Tensor:
        if self._onednn_applies(x):
            if self.gelu is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], self.gelu)
        y = F.linear(x, self.weight, self.bias)
        return y if self.gelu is None else F.gelu(y, approximate=self.gelu)

    def _onednn_applies(self, x: Tensor) -> bool:
        if not ONEDNN or x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return False
        if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
            return False
        return not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias))

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"in_features={inp}, out_features={out}, bias={self.bias is not None}, gelu={self.gelu}"


if ONEDNN and torch.ops.mkldnn._linear_pointwise not in flop_registry:  # a later torch may count it itself
    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_pointwise_flops(x_shape, w_shape, *args, **kwargs) -> int:
        """torch.utils.flop_counter's count for oneDNN's linear, as for F.linear's: 2 x rows x in x out (without
        it the counter skips the op, and a frozen CPU ViT's linears vanish from `bench demand` and `bench step`)."""
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def use_onednn_linears(vit: nn.Module) -> None:
    """Every ``nn.Linear`` in the ViT's blocks becomes a :class:`OneDnnLinear` in place; an MLP's first
    layer takes over the GELU after it (its ``act`` becomes the identity; dropout and norm follow as before)."""
    for module in list(vit.modules()):
        act = getattr(module, "act", None)
        fuse = isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(act, nn.GELU)
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, OneDnnLinear(child, act.approximate if fuse and name == "fc1" else None))
        if fuse:
            module.act = nn.Identity()


class Backbone(nn.Module):
    """Base class. Attributes: name, dim (feature channels C), stride (pixels per cell),
    frozen (parameters fixed and module always in eval mode)."""

    name: str
    dim: int
    stride: int

    def __init__(self, name: str, dim: int, stride: int):
        super().__init__()
        self.name, self.dim, self.stride = name, dim, stride
        self.frozen = self.trunk_frozen = self.batchnorm_frozen = False

    def freeze(self) -> Backbone:
        """Disable gradients for every parameter and pin eval mode."""
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> Backbone:
        # A frozen backbone stays in eval mode (BatchNorm statistics, dropout) whatever the caller does;
        # so do a frozen trunk and BatchNorm layers pinned by freeze_batchnorm.
        super().train(mode and not self.frozen)
        pinned = [self.trunk_module()] if self.trunk_frozen else []
        if self.batchnorm_frozen:
            pinned += [m for m in self.trunk_module().modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for module in pinned:
            for sub in module.modules():
                sub.training = False  # not .eval(): the trunk may be this module itself
        return self

    def trunk_module(self) -> nn.Module:
        """The pretrainable part (ResNet stages, ViT blocks); a ResNet-FPN's FPN is not part of it."""
        return self

    def freeze_trunk(self) -> Backbone:
        """Fix the trunk (no gradients, eval mode); the rest (an FPN) still trains."""
        self.trunk_module().requires_grad_(False)
        self.trunk_frozen = True
        return self.train(self.training)

    def freeze_batchnorm(self) -> Backbone:
        """Keep the trunk's BatchNorm layers at their (pretrained) statistics and affine parameters."""
        for m in self.trunk_module().modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.requires_grad_(False)
        self.batchnorm_frozen = True
        return self.train(self.training)

    def forward(self, x: Tensor, with_attention: bool = False) -> BackboneOutput:
        """x: ImageNet-normalised [B, 3, H, W] with H, W divisible by ``stride``."""
        self._check_input(x)
        return self._features(x, with_attention)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % self.stride or x.shape[3] % self.stride:
            raise BackboneError(
                f"backbone {self.name} needs images [B, 3, H, W] with H and W divisible by "
                f"{self.stride}, got {tuple(x.shape)}; resize or crop the input"
            )

    def _features(self, x: Tensor, with_attention: bool) -> BackboneOutput:
        raise NotImplementedError

    pooled_dim: int  # channels of ``pooled`` (set by each subclass)

    def pooled(self, x: Tensor) -> Tensor:
        """One global vector per image: ImageNet-normalised [B, 3, H, W] -> [B, pooled_dim].

        ResNet: global average pool of the trunk's last stage (layer4; the FPN is not used);
        ViT: mean of the final-normed patch tokens (prefix tokens excluded). Used by MoCo
        pretraining and by image-level pseudo labels."""
        self._check_input(x)
        return self._pooled(x, with_features=False)[0]

    def pooled_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``pooled`` and ``forward``'s feature map [B, dim, H/stride, W/stride] from one trunk pass."""
        self._check_input(x)
        return self._pooled(x, with_features=True)

    def _pooled(self, x: Tensor, with_features: bool) -> tuple[Tensor, Tensor | None]:
        if isinstance(self, ViTBackbone):
            tokens, _ = self.forward_tokens(x)
            patches = tokens[:, self.num_prefix_tokens:]
            features = None
            if with_features:
                h, w = x.shape[2] // self.stride, x.shape[3] // self.stride
                features = patches.reshape(x.shape[0], h, w, self.dim).permute(0, 3, 1, 2)
            return patches.mean(dim=1), features
        stages = self.stages(x)
        return stages[-1].mean(dim=(2, 3)), (self.fpn(stages) if with_features else None)


class ViTBackbone(Backbone):
    """timm VisionTransformer; features are the final-normed patch tokens."""

    def __init__(self, name: str):
        vit = timm.create_model(VIT_MODELS[name], pretrained=False, num_classes=0, dynamic_img_size=True)
        super().__init__(name, dim=vit.embed_dim, stride=vit.patch_embed.patch_size[0])
        self.vit = vit
        self.vit.blocks[-1].attn.fused_attn = False
        use_onednn_linears(self.vit.blocks)
        self.pooled_dim = vit.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def forward_tokens(self, x: Tensor, with_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """All output tokens [B, T, C] (prefix tokens first) and, if asked, the last block's
        per-head pre-softmax attention logits [B, heads, T, T]."""
        if not with_attention:
            return self.vit.forward_features(x), None
        last_attn = self.vit.blocks[-1].attn
        captured: list[Tensor] = []
        hook = last_attn.qkv.register_forward_hook(lambda _module, _args, out: captured.append(out))
        try:
            tokens = self.vit.forward_features(x)
        finally:
            hook.remove()
        return tokens, vit_attention_logits(last_attn, captured[0])

    def _features(self, x: Tensor, with_attention: bool) -> BackboneOutput:
        h, w = x.shape[2] // self.stride, x.shape[3] // self.stride
        tokens, head_logits = self.forward_tokens(x, with_attention)
        p = self.num_prefix_tokens
        features = tokens[:, p:].reshape(x.shape[0], h, w, self.dim).permute(0, 3, 1, 2).contiguous()
        attn_logits = head_logits[:, :, p:, p:].mean(dim=1) if head_logits is not None else None
        return BackboneOutput(features=features, attn_logits=attn_logits)


class FPN(nn.Module):
    """Top-down feature pyramid: 1x1 lateral convs on the four ResNet stages, coarse maps
    bilinearly upsampled and summed into finer ones; returns the stride-4 map."""

    def __init__(self, in_channels: tuple[int, ...], out_dim: int):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, out_dim, kernel_size=1) for c in in_channels)

    def forward(self, stages: list[Tensor]) -> Tensor:
        """stages: [B, C_i, H_i, W_i] finest first -> [B, out_dim, H_0, W_0]."""
        out = self.laterals[-1](stages[-1])
        for lateral, stage in zip(reversed(self.laterals[:-1]), reversed(stages[:-1])):
            out = lateral(stage) + F.interpolate(out, size=stage.shape[-2:], mode="bilinear", align_corners=False)
        return out


class ResNetFPNBackbone(Backbone):
    """torchvision ResNet trunk (no fc) + FPN, features at stride 4."""

    def __init__(self, name: str, fpn_dim: int = DEFAULT_FPN_DIM):
        arch, channels = RESNET_MODELS[name]
        super().__init__(name, dim=fpn_dim, stride=4)
        self.trunk = getattr(torchvision.models, arch)(weights=None)
        self.trunk.fc = nn.Identity()
        self.fpn = FPN(channels, fpn_dim)
        self.pooled_dim = channels[-1]

    def trunk_module(self) -> nn.Module:
        return self.trunk

    def _features(self, x: Tensor, with_attention: bool) -> BackboneOutput:
        if with_attention:
            raise BackboneError(
                f"backbone {self.name} has no attention; use a ViT backbone or with_attention=False"
            )
        return BackboneOutput(features=self.fpn(self.stages(x)))

    def stages(self, x: Tensor) -> list[Tensor]:
        """The trunk's four stage outputs, finest first."""
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        stages = []
        for layer in (t.layer1, t.layer2, t.layer3, t.layer4):
            x = layer(x)
            stages.append(x)
        return stages


def build_backbone(
    name: str, weights: str | None = None, frozen: bool = True, fpn_dim: int | None = None, read_bytes=None
) -> Backbone:
    """Build a randomly initialised backbone, optionally load ``weights`` (a path, or any URI that
    ``read_bytes`` reads, e.g. :func:`raysseg.io.storage.read_bytes` for s3://), and freeze it if
    ``frozen``. ``fpn_dim`` (ResNet-FPN only) defaults to 128."""
    if name in VIT_MODELS:
        if fpn_dim is not None:
            raise BackboneError(f"fpn_dim is only for ResNet-FPN backbones, not {name}; drop it")
        model: Backbone = ViTBackbone(name)
    elif name in RESNET_MODELS:
        model = ResNetFPNBackbone(name, DEFAULT_FPN_DIM if fpn_dim is None else fpn_dim)
    else:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    if weights:
        load_backbone_weights(model, weights, name, read_bytes)
    return model.freeze() if frozen else model


# Key prefixes stripped from checkpoints (DDP wrapper, DINO backbone, MoCo query encoder).
_WRAPPER_PREFIXES = ("module.", "backbone.", "encoder_q.")
# Keys of training heads that are never part of a backbone (DINO, torchvision/MoCo, SwAV).
_DROPPED_PREFIXES = ("head.", "fc.", "projection_head.", "prototypes.")


def dinov2_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A DINOv2 backbone state dict (facebookresearch/dinov2 names) in timm's names.

    ``mask_token`` (masked-image training only) is dropped. With registers, timm keeps the
    position table for patches only: ``register_tokens`` -> ``reg_token``, and the class
    token's position ``pos_embed[:, 0]`` (never resampled) is added into ``cls_token``,
    which gives the same tokens as DINOv2 adding it after concatenation."""
    state = {k: v for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    return state


def _checkpoint_state_dict(obj: object) -> dict[str, Tensor] | None:
    """Find the backbone state dict in a loaded checkpoint (plain, DINO or MoCo layout)."""
    if isinstance(obj, dict):
        for key in ("teacher", "student", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        return None
    keys = list(obj)
    if any(k.startswith(("encoder_q.", "module.encoder_q.")) for k in keys):
        # MoCo: keep only the query encoder (drops encoder_k, queue, queue_ptr).
        obj = {k: v for k, v in obj.items() if k.startswith(("encoder_q.", "module.encoder_q."))}
    cleaned = {}
    for key, value in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if not key.startswith(_DROPPED_PREFIXES):
            cleaned[key] = value
    if "mask_token" in cleaned or "register_tokens" in cleaned:  # DINOv2's own names
        cleaned = dinov2_to_timm(cleaned)
    return cleaned


def _model_key(module: Backbone, key: str) -> str:
    """Map a checkpoint key to the Backbone's own state-dict namespace."""
    if isinstance(module, ViTBackbone):
        return key if key.startswith("vit.") else "vit." + key
    if key.startswith(("trunk.", "fpn.")):
        return key
    return "trunk." + key


def _few(keys: list[str], limit: int = 4) -> str:
    """A short listing of keys, without the Backbone's own vit./trunk. namespace."""
    shown = ", ".join(k.removeprefix("vit.").removeprefix("trunk.") for k in keys[:limit])
    return f"[{shown}{f', ... +{len(keys) - limit} more' if len(keys) > limit else ''}]"


def _read_local(uri: str) -> bytes:
    if "://" in uri or ("/" not in uri and "." not in uri and not Path(uri).exists()):
        raise BackboneWeightsError(f"model.weights: {uri} needs a reader for URIs and weights names (read_bytes="
                                   "raysseg.io.weights.read_weights); give a local path or load through "
                                   "raysseg's runners")
    if not Path(uri).is_file():
        raise BackboneWeightsError(f"model.weights: {uri} not found; give a backbone checkpoint file")
    return Path(uri).read_bytes()


def load_backbone_weights(module: Backbone, uri: str, name: str, read_bytes=None) -> None:
    """Load a checkpoint from a local path (or a URI ``read_bytes`` reads) into ``module`` (in place).

    Accepts a plain state dict, DINO checkpoints (``teacher``/``student``/``state_dict``/
    ``model``; ``module.``/``backbone.`` prefixes; ``head.*`` dropped), DINOv2 backbones
    (:func:`dinov2_to_timm`) and torchvision/MoCo/SwAV ResNet trunks (``module.encoder_q.``
    or ``module.``; ``fc.*``, ``projection_head.*``, ``prototypes.*`` dropped). A trunk-only
    checkpoint leaves the FPN as initialised. Raises BackboneWeightsError on any other mismatch.
    """
    data = (read_bytes or _read_local)(uri)
    try:
        # Full DINO checkpoints also pickle their argparse.Namespace of training args.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a torch checkpoint"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneWeightsError(
            f"weights {uri} for backbone {name} are not a readable torch checkpoint ({first_line}); "
            "point weights at a .pth/.pt state dict"
        ) from None
    state = _checkpoint_state_dict(checkpoint)
    if state is None:
        raise BackboneWeightsError(
            f"weights {uri} for backbone {name} hold no state dict of tensors (looked at the top level "
            "and keys teacher/student/state_dict/model); point weights at a model checkpoint"
        )
    state = {_model_key(module, k): v for k, v in state.items()}
    expected = module.state_dict()
    has_fpn = any(k.startswith("fpn.") for k in state)
    missing = [
        k for k in expected
        if k not in state
        and not k.endswith("num_batches_tracked")  # BatchNorm step counter, unused in eval
        and not (k.startswith("fpn.") and not has_fpn)  # trunk-only checkpoint: FPN stays as initialised
    ]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched and not missing and not unexpected and all(m.startswith("fpn.") for m in mismatched):
        trained = int(state["fpn.laterals.0.weight"].shape[0])
        raise BackboneWeightsError(
            f"weights {uri} hold an FPN of {trained} channels (trained by `raysseg pretrain` with its dense term) "
            f"but model.fpn_dim is {int(expected['fpn.laterals.0.weight'].shape[0])}; set model.fpn_dim={trained}"
        )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_few(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches {_few(mismatched, 2)}")
        raise BackboneWeightsError(
            f"weights {uri} do not fit backbone {name}: {'; '.join(problems)}; "
            "pick the backbone that matches the checkpoint (or the right checkpoint for this backbone)"
        )
    module.load_state_dict(state, strict=False)
