"""A synthetic segmentation dataset, generated locally or into s3:// (the quick start's data)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

SYNTH_CLASSES = ("sky", "ground", "grass", "red_object", "blue_shape")


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell_h: float, cell_w: float) -> np.ndarray:
    """Smooth random field in [-1, 1] of shape (h, w): coarse uniform noise upsampled bicubically."""
    gh, gw = max(2, int(h / cell_h) + 2), max(2, int(w / cell_w) + 2)
    coarse = rng.uniform(0, 255, (gh, gw)).astype(np.float32)
    up = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
    return np.clip(up / 127.5 - 1.0, -1.0, 1.0)


def _synth_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene: (image uint8 (h,w,3), label uint8 (h,w)) with classes SYNTH_CLASSES."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = h * rng.uniform(0.3, 0.5) + h * 0.05 * np.sin(xx / w * 2 * np.pi * rng.uniform(0.5, 2) + rng.uniform(0, 6.3))
    label = np.where(yy < horizon, 0, 1).astype(np.uint8)
    grass = _smooth_noise(rng, h, w, h / 3, w / 3) > rng.uniform(-0.3, 0.3)
    label[(label == 1) & grass] = 2

    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.15, 0.9) * h, rng.uniform(0.1, 0.9) * w
        ry, rx = rng.uniform(0.08, 0.2) * h, rng.uniform(0.06, 0.18) * w
        if rng.random() < 0.5:
            label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = 3
        else:
            label[(np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)] = 4

    img = np.zeros((h, w, 3), np.float32)
    t = np.clip(yy / np.maximum(horizon, 1.0), 0, 1)[..., None]
    sky_top = np.array([70, 120, 210]) + rng.normal(0, 12, 3)
    sky_low = np.array([190, 210, 235]) + rng.normal(0, 10, 3)
    sky = sky_top * (1 - t) + sky_low * t + rng.normal(0, 5, (h, w, 3))
    ground_tex = _smooth_noise(rng, h, w, 4, 6)[..., None]
    ground = (np.array([125, 95, 65]) + rng.normal(0, 10, 3)) * (1 + 0.25 * ground_tex) + rng.normal(0, 14, (h, w, 3))
    grass_tex = _smooth_noise(rng, h, w, 6, 1.5)[..., None]  # vertical blades
    grass_col = np.array([70, 135, 55]) + rng.normal(0, 10, 3)
    grass_px = grass_col * (1 + 0.3 * grass_tex) + rng.normal(0, 16, (h, w, 3))
    shade = (1 + 0.2 * _smooth_noise(rng, h, w, h / 2, w / 2))[..., None]
    red = (np.array([185, 55, 45]) + rng.normal(0, 15, 3)) * shade + rng.normal(0, 20, (h, w, 3))
    blue = (np.array([45, 65, 165]) + rng.normal(0, 15, 3)) * shade + rng.normal(0, 20, (h, w, 3))
    for cls, px in enumerate((sky, ground, grass_px, red, blue)):
        img[label == cls] = px[label == cls]
    img *= rng.uniform(0.8, 1.2)  # global exposure
    return np.clip(img, 0, 255).astype(np.uint8), label


def synth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n synthetic scenes as one uint8 array (n, size, size, 3), generated in memory (benchmarks)."""
    rng = np.random.default_rng(seed)
    return np.stack([_synth_image(rng, size, size)[0] for _ in range(n)])


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def synth_dataset(out_dir: str, n_train: int = 48, n_val: int = 16, size: tuple[int, int] = (96, 128), seed: int = 0) -> dict:
    """Write a small synthetic segmentation dataset (``train/`` and ``val/`` splits with images and
    labels, ``classes.txt`` and ``README.txt``) to a local folder or s3:// prefix.

    Five classes (SYNTH_CLASSES): a sky gradient, textured ground, textured grass, red-ish ellipses
    and blue-ish rectangles, with per-image colour shifts and pixel noise.
    Returns {"root", "classes", "train", "val"} (the last two: image counts).
    """
    from raysseg.io import storage

    h, w = size
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            image, label = _synth_image(rng, h, w)
            name = f"{split}_{i:04d}.png"
            storage.write_bytes_atomic(storage.join(out_dir, split, "images", name), _png_bytes(image))
            storage.write_bytes_atomic(storage.join(out_dir, split, "labels", name), _png_bytes(label))
    storage.write_bytes_atomic(storage.join(out_dir, "classes.txt"), ("\n".join(SYNTH_CLASSES) + "\n").encode())
    readme = (
        "raysseg synthetic segmentation dataset\n"
        f"image size {h}x{w} (HxW), seed {seed}, {n_train} train / {n_val} val images\n"
        "labels/*.png hold one class index per pixel:\n"
        + "".join(f"  {i}: {name}\n" for i, name in enumerate(SYNTH_CLASSES))
    )
    storage.write_bytes_atomic(storage.join(out_dir, "README.txt"), readme.encode())
    return {"root": out_dir, "classes": list(SYNTH_CLASSES), "train": n_train, "val": n_val}
