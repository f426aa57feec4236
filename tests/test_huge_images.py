"""Huge images within bounded memory: label maps upsampled in row strips (equal to ``F.interpolate``), a JPEG decoded
at a reduced scale for the model, ``data.max_pixels`` checked from the header (PIL's decompression-bomb bound out of
its way), and the peak memory of predicting and evaluating one 12000 x 9000 JPEG, measured in a fresh process."""
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
HUGE = (9000, 12000)  # (H, W): 108 megapixels
# Bytes per input pixel above what the replica holds with the model loaded, at most: twice what was measured after
# the change, or the goal of 20. Measured on a 2-core, 24 GiB machine (one torch thread): predict 1.2 (52.8 before
# the change), with overlays 11.9 (55.6 before), evaluate's reading 12.1 (12.1 before: it decodes whole images
# into model-sized crops, as before).
BOUND = {"predict": 2.5, "predict_overlays": 20.0, "evaluate": 20.0}


def test_label_map_in_strips_equals_interpolate_then_argmax():
    from raysseg.core.label_strips import label_map_in_strips, strips

    torch.manual_seed(0)
    for (h, w), size in [((2, 3), (40, 57)), ((8, 12), (150, 217)), ((3, 5), (200, 71)), ((7, 9), (7, 9))]:
        logits = torch.randn(11, h, w)
        expected = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        top2 = expected.topk(2, dim=0).values
        clear = (top2[0] - top2[1] > 1e-5).numpy()  # near-ties may go either way (rounding)
        budget = 4 * 11 * size[1] * 7  # strips of 7 rows
        assert len(list(strips(size, 11, budget))) == -(-size[0] // 7)
        labels, counts = label_map_in_strips(logits, size, np.uint8, budget=budget)
        assert labels.dtype == np.uint8 and labels.shape == size
        np.testing.assert_array_equal(labels[clear], expected.argmax(0).numpy()[clear])
        np.testing.assert_array_equal(counts, np.bincount(labels.ravel(), minlength=11))
        whole, _ = label_map_in_strips(logits, size, np.uint16)  # one strip
        np.testing.assert_array_equal(whole, labels)


def jpeg(size: tuple[int, int], orientation: int = 1, quality: int = 90) -> bytes:
    """A smooth RGB JPEG of ``size`` (H, W) as stored, with an EXIF orientation."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[0] // 100 + 2, size[1] // 100 + 2, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).resize(size[::-1], Image.BILINEAR).save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_into_the_same_model_input():
    from raysseg.core.label_maps import model_input
    from raysseg.io.decode_large import decode_for_model
    from raysseg.io.images import decode_image

    for orientation, shown in ((1, (1500, 2000)), (6, (2000, 1500))):  # 6: turned by a quarter
        data = jpeg((1500, 2000), orientation)
        decoded = decode_for_model(data, 64, 32, 10**9)
        expected = model_input(np.asarray(decode_image(data)), 64, 32)  # a full decode, then resized
        assert decoded.size == shown and decoded.full is None and decoded.input.shape == expected.shape
        difference = np.abs(decoded.input.astype(int) - expected)
        assert difference.mean() < 0.5 and difference.max() <= 2, (orientation, difference.mean(), difference.max())
    small = jpeg((90, 120))  # nothing to reduce: exactly the full decode's input
    decoded = decode_for_model(small, 64, 32, 10**9, full=True)
    full = np.asarray(decode_image(small))
    np.testing.assert_array_equal(decoded.full, full)
    np.testing.assert_array_equal(decoded.input, model_input(full, 64, 32))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` grey pixels and holds none (what a decompression bomb looks like)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_max_pixels_is_checked_from_the_header_and_pil_bound_stays_out_of_its_way(monkeypatch):
    from raysseg.io.decode_large import TooLargeError, decode_for_model

    with pytest.raises(TooLargeError) as refused:  # refused from the header: nothing is decoded
        decode_for_model(header_only_png(30000, 10000), 64, 32, 250_000_000)
    assert str(refused.value) == ("30000x10000 = 300,000,000 pixels, more than data.max_pixels (250,000,000): split "
                                  "or downscale the image, or raise data.max_pixels")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own bound, far below this image and data.max_pixels
    data = jpeg((150, 200))
    decoded = decode_for_model(data, 64, 32, 40_000)
    assert decoded.size == (150, 200)
    assert Image.MAX_IMAGE_PIXELS == 1000  # put back
    with pytest.raises(TooLargeError):
        decode_for_model(data, 64, 32, 29_999)


def test_evaluation_skips_an_image_over_max_pixels_with_one_line(tmp_path):
    import functools

    from raysseg.io.decode_large import decode_bounded
    from raysseg.io.images import read_plan

    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for name, size in (("small", (40, 30)), ("wide", (200, 150))):
        Image.new("RGB", size).save(tmp_path / "images" / f"{name}.png")
        Image.new("L", size).save(tmp_path / "labels" / f"{name}.png")
    items, decode = read_plan(str(tmp_path), image_size=32, train=False, with_labels=True, n_classes=5,
                              image_decoder=functools.partial(decode_bounded, max_pixels=20_000))
    items = list(items)
    rows = decode({"path": np.array([i["path"] for i in items], dtype=object),
                   "label_path": np.array([i["label_path"] for i in items], dtype=object)})
    assert rows["valid"].tolist() == [True, False]  # small.png, wide.png
    assert rows["error"][1] == (f"image {tmp_path / 'images' / 'wide.png'}: 200x150 = 30,000 pixels, more than "
                                "data.max_pixels (20,000): split or downscale the image, or raise data.max_pixels: "
                                "replace or remove the file")


MEASURE = textwrap.dedent("""
    import gc, json, lzma, re, sys
    from pathlib import Path
    import numpy as np

    def memory(key):  # this process's resident memory (VmRSS) or its peak since the last reset (VmHWM), bytes
        return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    def start():  # the memory held now; the peak counts from here (Linux: writing 5 to clear_refs resets VmHWM)
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        return memory("VmRSS")

    what, root, fixture = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    import torch
    torch.set_num_threads(1)  # one replica of two on two cores
    if what.startswith("predict"):
        from raysseg.io.checkpoints import load_segmenter
        from raysseg.runtime.predict import JobPaths, label_map, predict_batch, prepare_rows

        ckpt = root / "picie.pt"
        ckpt.write_bytes(lzma.decompress(Path(fixture).read_bytes()))
        seg, _ = load_segmenter(str(ckpt))
        label_map(seg, np.zeros((300, 400, 3), np.uint8))  # the model's own working memory: in the baseline
        before = start()
        paths = JobPaths(str(root / "images"), str(root / "out"), what == "predict_overlays", seg.cfg.n_clusters)
        rows = prepare_rows({"path": np.array(["huge.jpg"], dtype=object)}, paths=paths,
                            short_side=seg.cfg.data.image_size, multiple=seg.input_multiple, overwrite=True)
        done = predict_batch(seg, paths, rows)  # what one replica does with the image
        result = {"status": str(done["status"][0]), "pixels": int(done["counts"][0].sum())}
    else:
        import functools
        from raysseg.io.decode_large import decode_bounded
        from raysseg.io.images import read_plan

        items, decode = read_plan(str(root), image_size=64, train=False, with_labels=True, n_classes=5,
                                  image_decoder=functools.partial(decode_bounded, max_pixels=250_000_000))
        before = start()
        rows = decode({"path": np.array([items[0]["path"]], dtype=object),
                       "label_path": np.array([items[0]["label_path"]], dtype=object)})  # as evaluate reads it
        result = {"status": "valid" if rows["valid"][0] else str(rows["error"][0])}
    print(json.dumps({**result, "before": before, "peak": memory("VmHWM")}))
""")


@pytest.fixture(scope="module")
def huge_split(tmp_path_factory) -> Path:
    """A split with one 12000 x 9000 JPEG (images/huge.jpg) and its label PNG."""
    root = tmp_path_factory.mktemp("huge")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    (root / "images" / "huge.jpg").write_bytes(jpeg(HUGE, quality=85))
    classes = np.random.default_rng(1).integers(0, 5, (9, 12), dtype=np.uint8)
    Image.fromarray(classes).resize(HUGE[::-1], Image.NEAREST).save(root / "labels" / "huge.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("what", ["predict", "predict_overlays", "evaluate"])
def test_a_108_megapixel_jpeg_in_bounded_memory(huge_split, what):
    """The peak resident memory of one replica's work on the image, in a fresh process, above what it holds with
    the model loaded and run once: at most BOUND bytes per pixel."""
    done = subprocess.run([sys.executable, "-c", MEASURE, what, str(huge_split), str(FIXTURES / "picie.pt.xz")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    pixels = HUGE[0] * HUGE[1]
    per_pixel = (result["peak"] - result["before"]) / pixels
    print(f"{what}: peak {result['peak'] / 2**30:.2f} GiB, {per_pixel:.1f} bytes per pixel above the model "
          f"({result['before'] / 2**20:.0f} MiB)")
    assert result["status"] in ("predicted", "valid")
    assert per_pixel <= BOUND[what]
    if what.startswith("predict"):
        assert result["pixels"] == pixels
        from raysseg.io.decode_large import own_pixel_bound

        with own_pixel_bound(), Image.open(huge_split / "out" / "labels" / "huge.png") as labels:
            assert labels.size == HUGE[::-1] and labels.mode == "L"
