"""``raysseg predict``: label PNGs and colour overlays at each image's own size."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def _input_size(h: int, w: int, short_side: int, stride: int) -> tuple[int, int]:
    """Resize so the short side is ``short_side``, both sides multiples of ``stride``."""
    scale = short_side / min(h, w)
    return (max(stride, round(h * scale / stride) * stride), max(stride, round(w * scale / stride) * stride))


def predict(checkpoint: str, images: str, out: str) -> dict:
    """Segment every image under ``images`` (folder or s3:// prefix) into ``out``/{labels,overlays}."""
    from raysseg.io.checkpoints import load_segmenter
    from raysseg.io.storage import StorageError, list_files, read_bytes
    from raysseg.core.pictures import overlay

    seg, _ = load_segmenter(checkpoint)
    files = list_files(images)
    if not files:
        raise StorageError(f"no images (.png/.jpg) under {images}; point --images at a folder of images")
    out_dir = Path(out)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    done, skipped = 0, []
    for i, uri in enumerate(files):
        try:
            image = np.asarray(Image.open(io.BytesIO(read_bytes(uri))).convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            skipped.append((uri, str(e)))
            continue
        h, w = image.shape[:2]
        size = _input_size(h, w, seg.cfg.data.image_size, seg.input_multiple)
        resized = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
        labels = seg.cluster_map(torch.from_numpy(resized)[None], size=(h, w))[0].numpy().astype(np.uint8)
        stem = Path(uri).stem
        Image.fromarray(labels).save(out_dir / "labels" / f"{stem}.png")
        Image.fromarray(overlay(image, labels)).save(out_dir / "overlays" / f"{stem}.png")
        done += 1
        print(f"[predict] {i + 1}/{len(files)} {stem}", flush=True)
    for uri, error in skipped:
        print(f"skipped {uri}: {error}")
    print(f"wrote {done} label maps and overlays to {out_dir} ({len(skipped)} skipped)")
    return {"written": done, "skipped": skipped}
