"""The single-process prediction loop: one image at a time, label PNGs and colour overlays at each
image's own size. ``raysseg predict`` runs the distributed job (:mod:`raysseg.runtime.predict`); this loop
stays as its reference (``raysseg bench predict`` and the equality test), with the same decoding
(:func:`raysseg.io.decode_large.decode_for_model`) and label maps (:func:`raysseg.runtime.predict.image_label_maps`)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image


def predict(checkpoint: str, images: str, out: str) -> dict:
    """Segment every image directly under ``images`` (folder or s3:// prefix) into ``out``/{labels,overlays}."""
    from raysseg.io.checkpoints import load_segmenter
    from raysseg.io.decode_large import decode_for_model
    from raysseg.io.storage import IMAGE_SUFFIXES, StorageError, list_files, read_bytes
    from raysseg.runtime.predict import image_label_maps, overlay_png

    seg, _ = load_segmenter(checkpoint)
    files = list_files(images)
    if not files:
        raise StorageError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) under {images}; point --images at a folder of images")
    out_dir = Path(out)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    done, skipped = 0, []
    for i, uri in enumerate(files):
        try:
            decoded = decode_for_model(read_bytes(uri), seg.cfg.data.image_size, seg.input_multiple,
                                       seg.cfg.data.max_pixels, full=True)
        except (ValueError, StorageError) as e:
            skipped.append((uri, str(e)))
            continue
        [(labels, _)] = image_label_maps(seg, decoded.input[None], [decoded.size])
        stem = Path(uri).stem
        Image.fromarray(labels).save(out_dir / "labels" / f"{stem}.png")
        (out_dir / "overlays" / f"{stem}.png").write_bytes(overlay_png(decoded.full, labels))
        done += 1
        print(f"[predict] {i + 1}/{len(files)} {stem}", flush=True)
    for uri, error in skipped:
        print(f"skipped {uri}: {error}")
    print(f"wrote {done} label maps and overlays to {out_dir} ({len(skipped)} skipped)")
    return {"written": done, "skipped": skipped}
