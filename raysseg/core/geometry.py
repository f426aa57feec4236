"""Backbone geometry without building a model: the one table of strides (pure Python)."""
from __future__ import annotations

VIT_PATCH = {  # pixels per token: DINO (timm ViT names) and DINOv2, with and without 4 register tokens
    "vit_small_patch16": 16, "vit_small_patch8": 8, "vit_base_patch16": 16, "vit_base_patch8": 8,
    "vit_small_patch14_dinov2": 14, "vit_base_patch14_dinov2": 14,
    "vit_small_patch14_reg4_dinov2": 14, "vit_base_patch14_reg4_dinov2": 14,
}
RESNET_FPN = ("resnet18_fpn", "resnet50_fpn")  # features at 1/4 from a trunk that downsamples by 32
BACKBONES = tuple(VIT_PATCH) + RESNET_FPN


def feature_stride(backbone: str) -> int:
    """Pixels per feature cell of the backbone's output."""
    return VIT_PATCH.get(backbone, 4)


def input_multiple(backbone: str) -> int:
    """Image sides must be multiples of this (a ViT's patch; 32 for a ResNet trunk)."""
    return VIT_PATCH.get(backbone, 32)


def patch_size(backbone: str) -> int:
    """A ViT's patch side; 1 for a ResNet (any crop size works)."""
    return VIT_PATCH.get(backbone, 1)
