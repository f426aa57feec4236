"""The label map of one image: the model's input size, the resized input, and the cluster ids at the image's
own size. One source for ``raysseg predict`` (:mod:`raysseg.runtime.predict`), the single-process loop
(:mod:`raysseg.apps.predict`) and the registered MLflow model (:mod:`raysseg.io.registry`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from raysseg.core.precision import exact_fp32


def input_size(h: int, w: int, short_side: int, multiple: int) -> tuple[int, int]:
    """The model's input size for an (h, w) image: short side ``short_side``, both sides multiples of ``multiple``."""
    scale = short_side / min(h, w)
    return (max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple))


def model_input(image: np.ndarray, short_side: int, multiple: int) -> np.ndarray:
    """uint8 (H, W, 3) -> the bilinearly resized uint8 input (h, w, 3) the model sees."""
    size = input_size(*image.shape[:2], short_side, multiple)
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))


@torch.inference_mode()
def label_maps(seg, inputs: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Model inputs of one size, uint8 (B, h, w, 3) -> cluster ids at each image's own size ``sizes[b]``
    (bilinear upsampling of the cluster logits, then argmax, as ``Segmenter.cluster_map``)."""
    logits = seg.cluster_logits(seg.codes(torch.from_numpy(np.array(inputs))))  # a writable copy
    dtype = label_dtype(seg.cfg.n_clusters)
    by_size: dict[tuple[int, int], list[int]] = {}
    for b, size in enumerate(sizes):
        by_size.setdefault(tuple(size), []).append(b)
    maps: list[np.ndarray] = [np.empty(0)] * len(sizes)
    with exact_fp32():  # one upsampling per output size (each image's result is the same as alone)
        for size, rows in by_size.items():
            labels = F.interpolate(logits[rows], size=size, mode="bilinear", align_corners=False).argmax(1)
            for b, label in zip(rows, labels.to(torch.uint8 if dtype == np.uint8 else torch.int32).cpu().numpy()):
                maps[b] = label.astype(dtype, copy=False)
    return maps


def label_map(seg, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> cluster ids (H, W): the label map ``raysseg predict`` writes for this image."""
    short_side, multiple = seg.cfg.data.image_size, seg.input_multiple
    return label_maps(seg, model_input(image, short_side, multiple)[None], [image.shape[:2]])[0]


def label_dtype(n_clusters: int) -> type:
    """uint8 label PNGs up to 256 clusters, 16-bit beyond."""
    return np.uint8 if n_clusters <= 256 else np.uint16
