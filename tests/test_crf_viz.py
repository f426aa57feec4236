import numpy as np
import pytest
from PIL import Image

from raysseg.core.crf import dense_crf
from raysseg.core.metrics import EvalInputError, confusion_matrix
from raysseg.core.pictures import colorize, confusion_figure, overlay, overlay_grid, palette, save_png


def _two_colour_image(height=48, width=64):
    """Left half red, right half blue; the true labels follow the colour edge."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = (200, 30, 30)
    image[:, width // 2 :] = (30, 30, 200)
    truth = np.zeros((height, width), dtype=np.int64)
    truth[:, width // 2 :] = 1
    return image, truth


def test_dense_crf_returns_distribution_and_fixes_noise():
    image, truth = _two_colour_image()
    rng = np.random.default_rng(0)
    flipped = rng.random(truth.shape) < 0.25
    noisy = np.where(flipped, 1 - truth, truth)
    probs = np.where(np.arange(2)[:, None, None] == noisy[None], 0.65, 0.35)

    refined = dense_crf(image, probs)
    assert refined.shape == probs.shape
    assert refined.dtype == np.float32
    assert np.all(refined >= 0) and np.all(refined <= 1)
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4)

    error_before = np.mean(probs.argmax(0) != truth)
    error_after = np.mean(refined.argmax(0) != truth)
    assert error_before > 0.2
    assert error_after < 0.5 * error_before


def test_dense_crf_rejects_mismatched_shapes():
    image, _ = _two_colour_image()
    with pytest.raises(EvalInputError, match="upsample"):
        dense_crf(image, np.full((2, 10, 10), 0.5))
    with pytest.raises(EvalInputError, match="uint8"):
        dense_crf(image.astype(np.float32), np.full((2, 48, 64), 0.5))


def test_palette_is_distinct_deterministic_and_prefix_stable():
    colours = palette(300)
    assert colours.dtype == np.uint8 and colours.shape == (300, 3)
    assert len({tuple(c) for c in colours}) == 300
    assert not np.any(np.all(colours == 0, axis=1))  # black is reserved for ignore
    np.testing.assert_array_equal(palette(12), colours[:12])


def test_colorize_and_overlay():
    labels = np.array([[0, 1], [255, 2]])
    coloured = colorize(labels, ignore_index=255)
    assert coloured.shape == (2, 2, 3) and coloured.dtype == np.uint8
    np.testing.assert_array_equal(coloured[1, 0], [0, 0, 0])
    np.testing.assert_array_equal(coloured[0, 1], palette(3)[1])

    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    blended = overlay(image, labels, alpha=0.5, ignore_index=255)
    assert blended.shape == (2, 2, 3) and blended.dtype == np.uint8
    np.testing.assert_array_equal(blended[1, 0], [100, 100, 100])
    expected = np.round(0.5 * 100 + 0.5 * palette(3)[2].astype(float))
    np.testing.assert_array_equal(blended[1, 1], expected)


def test_overlay_grid_shape():
    images = [np.zeros((10, 12, 3), np.uint8), np.zeros((8, 12, 3), np.uint8)]
    preds = [np.zeros((10, 12), np.int64), np.ones((8, 12), np.int64)]
    targets = [np.full((10, 12), 255), np.ones((8, 12), np.int64)]
    grid = overlay_grid(images, preds, targets, ignore_index=255)
    assert grid.dtype == np.uint8
    # cells 12 px wide are enlarged 4x (at most); a 22 px title band on top, a legend band below
    assert grid.shape[1] == 3 * 48 + 2 * 2 and grid.shape[0] > 22 + 2 * 40 + 2
    assert overlay_grid(images, preds, None, ignore_index=255).shape[1] == 2 * 48 + 2
    with pytest.raises(EvalInputError, match="as many"):
        overlay_grid(images, preds[:1], None, ignore_index=255)


def test_confusion_figure_png_and_save_png(tmp_path):
    conf = confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3, 3, ignore_index=255)
    png = confusion_figure(conf, ["road", "sky", "car"], "val")
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG\r\n\x1a\n")
    raw = confusion_figure(np.ones((5, 3)), ["road", "sky", "car"], "raw clusters")
    assert raw.startswith(b"\x89PNG")
    with pytest.raises(EvalInputError, match="class names"):
        confusion_figure(conf, ["road"], "bad")

    path = tmp_path / "sub" / "grid.png"
    picture = colorize(np.arange(12).reshape(3, 4))
    save_png(picture, path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), picture)
