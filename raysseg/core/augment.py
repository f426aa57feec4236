"""Photometric and geometric augmentation of float image batches (torch only)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """Luma of (B,3,H,W) RGB in [0,1] -> (B,1,H,W)."""
    w = images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def _rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB in [0,1] -> HSV with hue in [0,1)."""
    r, g, b = images.unbind(1)
    maxc, _ = images.max(1)
    minc, _ = images.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([hue, sat, maxc], 1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of _rgb_to_hsv."""
    h, s, v = hsv.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)  # (B,3,H,W) for R, G, B
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * (torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(
    images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor, hue: torch.Tensor
) -> torch.Tensor:
    """Per-image colour jitter of (B,3,H,W) in [0,1] with factors of shape (B,), applied in the order
    brightness, contrast, saturation (multiplicative, 1 = unchanged), hue (shift in turns, 0 = unchanged);
    clamped to [0,1] after each step, as torchvision's functional ops."""
    view = (-1, 1, 1, 1)
    x = (images * brightness.view(view)).clamp(0, 1)
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (contrast.view(view) * x + (1 - contrast.view(view)) * mean).clamp(0, 1)
    x = (saturation.view(view) * x + (1 - saturation.view(view)) * rgb_to_gray(x)).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    hsv = torch.stack([(hsv[:, 0] + hue.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return _hsv_to_rgb(hsv).clamp(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of (B,C,H,W) with its own Gaussian sigma (B,) > 0, separably.

    Kernel size is the odd 2*ceil(3*max(sigma))+1 shared by the batch (each kernel normalised);
    borders are reflected (replicated when the image is smaller than the kernel radius).
    """
    if (sigma <= 0).any():
        raise ValueError("gaussian_blur needs sigma > 0 for every image")
    b, c, h, w = images.shape
    radius = int(math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.to(images).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    mode = "reflect" if radius < min(h, w) else "replicate"
    x = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(x, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)


def photometric_augment(
    images: torch.Tensor, generator: torch.Generator, *, brightness: float = 0.3, contrast: float = 0.3,
    saturation: float = 0.3, hue: float = 0.1, p_gray: float = 0.2, p_blur: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0), p_jitter: float = 1.0,
) -> torch.Tensor:
    """Random per-image photometric augmentation of (B,3,H,W) RGB in [0,1] -> same shape.

    ColorJitter(brightness, contrast, saturation, hue) with probability p_jitter and factors
    drawn uniformly from [1-x, 1+x] (hue: [-hue, hue]), then grayscale with probability p_gray,
    then Gaussian blur with probability p_blur and sigma uniform in blur_sigma. All randomness
    comes from ``generator``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"photometric_augment expects (B,3,H,W) images, got shape {tuple(images.shape)}")
    if not 0 < blur_sigma[0] <= blur_sigma[1]:
        raise ValueError(f"blur_sigma must be a positive (low, high) range, got {blur_sigma}")
    b = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        u = torch.rand(b, generator=generator, device=generator.device).to(images.device, images.dtype)
        return low + (high - low) * u

    x = color_jitter(
        images, uniform(1 - brightness, 1 + brightness), uniform(1 - contrast, 1 + contrast),
        uniform(1 - saturation, 1 + saturation), uniform(-hue, hue),
    )
    if p_jitter < 1:  # drawn only then, so the default keeps its random stream
        x = torch.where((uniform(0, 1) < p_jitter).view(-1, 1, 1, 1), x, images)
    gray = uniform(0, 1) < p_gray
    x = torch.where(gray.view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)
    blur = uniform(0, 1) < p_blur
    sigma = uniform(*blur_sigma)
    if blur.any():
        x = torch.where(blur.view(-1, 1, 1, 1), gaussian_blur(x, sigma), x)
    return x


def random_boxes(
    n: int, generator: torch.Generator, scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """n random crop boxes (n, 4) as (x0, y0, x1, y1) fractions of the image, inside [0, 1].

    Area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio`` (the
    RandomResizedCrop recipe); a box that would not fit is shrunk to fit."""
    u = torch.rand(n, 4, generator=generator, device=generator.device).cpu()
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = (area * torch.exp(log_r)).sqrt().clamp(max=1.0)
    h = (area / torch.exp(log_r)).sqrt().clamp(max=1.0)
    x0, y0 = (1 - w) * u[:, 2], (1 - h) * u[:, 3]
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def crop_affine(boxes: torch.Tensor, flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The map from a crop's view to its image, in ``F.grid_sample``'s [-1, 1] coordinates (x, y):
    image = view * scale + shift. boxes (B, 4) as (x0, y0, x1, y1) image fractions, flips (B,) bool
    (mirrored views); returns (scale, shift), each (B, 2), in the boxes' dtype and device."""
    x0, y0, x1, y1 = boxes.unbind(1)
    sx = x1 - x0
    if flips is not None:
        sx = torch.where(flips.to(boxes.device), -sx, sx)
    return torch.stack([sx, y1 - y0], 1), torch.stack([x0 + x1 - 1, y0 + y1 - 1], 1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], flips: torch.Tensor | None = None,
                mode: str = "bilinear") -> torch.Tensor:
    """Crop each map of x (B, C, H, W) to its box (B, 4) of image fractions, resize to ``size``
    and mirror it where ``flips`` (B,) is true -> (B, C, size[0], size[1]).

    Works the same on images and on feature maps: a box is a fraction of the map, so
    cropping an image and cropping the features of the whole image select the same region
    (PiCIE's equivariance). Sampling is bilinear at output-cell centres (align_corners=False),
    through :func:`crop_affine`.
    """
    b = x.shape[0]
    scale, shift = crop_affine(boxes.to(x.device, x.dtype), flips)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = scale.unbind(1)
    theta[:, 0, 2], theta[:, 1, 2] = shift.unbind(1)
    grid = F.affine_grid(theta, [b, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
