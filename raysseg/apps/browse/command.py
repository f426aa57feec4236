"""The ``raysseg concepts`` command (:func:`browse`): index a split, or reuse its saved index, then
write the gallery, t-SNE map, concept summary and query pictures and log them to MLflow."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from raysseg.apps.browse.build import _check_args, _dictionary_of, build_index
from raysseg.apps.browse.index import INDEX_ARRAYS, SegmentIndex, _log, checkpoint_fingerprint, saved_key
from raysseg.apps.browse.pictures import _count, _pairs, gallery, query_picture, tsne_map
from raysseg.apps.browse.query import parse_query, query


def concepts_summary(index: SegmentIndex, examples: int = 5) -> dict:
    """Per used concept (most frequent first): segments, images, mean area and example paths
    (the images with its largest segments)."""
    counts, images = index.counts(), index.image_counts()
    concepts = []
    for c in [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]:
        rows = np.nonzero(index.concept == c)[0]
        rows = rows[np.argsort(-index.area[rows], kind="stable")]
        ex, seen = [], set()
        for r in rows:
            img = int(index.image[r])
            if img not in seen:
                seen.add(img)
                ex.append(index.paths[img])
            if len(ex) == examples:
                break
        concepts.append({"id": c, "segments": int(counts[c]), "images": int(images[c]),
                         "mean_area": round(float(index.area[rows].mean()), 5), "examples": ex})
    return {
        "checkpoint": index.meta.get("checkpoint"), "split": index.meta.get("split"), "source": index.source,
        "note": index.meta.get("note", ""), "n_concepts": index.n_concepts,
        "used_concepts": len(concepts), "n_images": index.n_images, "n_segments": index.n_segments,
        "skipped_files": len(index.meta.get("skipped", [])), "concepts": concepts,
    }


def browse(checkpoint: str, split: str | None = None, limit: int | None = None, out: str = "outputs/concepts",
           queries=(), n_concepts: int = 64, log_to_mlflow: bool = True, rebuild: bool = False,
           seed: int = 0) -> dict:
    """Index ``split`` with the checkpoint's concepts (or reuse the index saved in ``out`` for
    the same checkpoint weights, split, limit and concept setting), then write ``gallery.png``,
    ``tsne.png``, ``concepts.json``, and for each query ``query_<i>.png`` (1-based) and
    ``queries.json``; log them into the checkpoint's MLflow run under ``concepts/<split name>/``.
    Returns a summary dict (paths of the outputs, counts, query results)."""
    from raysseg.io import tracking
    from raysseg.config import config_from_dict
    from raysseg.io.checkpoints import read_checkpoint
    from raysseg.core.pictures import save_png

    _check_args(limit, n_concepts)
    queries = [str(q) for q in queries]
    for q in queries:
        parse_query(q)  # syntax errors before anything is read
    ckpt = read_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"])
    split = split or cfg.data.train
    dictionary, _ = _dictionary_of(ckpt)
    for q in queries:
        parse_query(q, len(dictionary) if dictionary is not None else n_concepts)
    key = {"checkpoint": checkpoint_fingerprint(ckpt), "split": split, "limit": limit,
           "concepts": "dictionary" if dictionary is not None else f"kmeans-{n_concepts}-seed{seed}"}
    out_dir = Path(out)
    t0 = time.time()
    reused = not rebuild and saved_key(out_dir) == key
    if reused:
        index = SegmentIndex.load(out_dir)
        _log(f"reusing the index in {out_dir}: {index.n_segments} segments in {index.n_images} images "
             f"(--rebuild to index again)")
    else:
        index = build_index(ckpt, split=split, limit=limit, n_concepts=n_concepts, seed=seed)
        index.meta.update({"checkpoint": checkpoint, "key": key})
        index.save(out_dir)
        _log(f"index written to {out_dir / INDEX_ARRAYS}")
    if reused and index.source == "kmeans":
        _log(f"note: {index.meta.get('note')}; concepts are a spherical k-means of the segment prototypes "
             f"({index.n_concepts} clusters, numbered by frequency)")
    results = [query(index, q) for q in queries]  # ids checked against the built index

    summary = concepts_summary(index)
    (out_dir / "concepts.json").write_text(json.dumps(summary, indent=1))
    pictures = {}
    _log("drawing the gallery")
    pictures["gallery.png"] = gallery(index, seed=seed)
    _log("t-SNE of the segment prototypes")
    pictures["tsne.png"] = tsne_map(index, seed=seed)
    query_out = []
    for i, r in enumerate(results, 1):
        entry = r.to_dict()
        _log(f'query {i} "{r.text}": {_count(len(r.matches), "image")}')
        for m in r.matches[:20]:
            print(f"  {m.path}  ({_pairs(len(m.pairs))})")
        if len(r.matches) > 20:
            print(f"  ... and {len(r.matches) - 20} more (queries.json)")
        if r.matches:
            name = f"query_{i}.png"
            pictures[name] = query_picture(index, r)
            entry["picture"] = str(out_dir / name)
        query_out.append(entry)
    for name, image in pictures.items():
        save_png(image, out_dir / name)
    if results:
        (out_dir / "queries.json").write_text(json.dumps(query_out, indent=1))
    top = summary["concepts"][:8]
    _log("most frequent concepts: " + ", ".join(f"{c['id']} ({c['segments']} seg, {c['images']} img)" for c in top))
    _log(f"wrote {', '.join(pictures)} and concepts.json to {out_dir}")

    logged = None
    run_id = ckpt.get("run_id")
    if log_to_mlflow and run_id:
        uri = ckpt.get("tracking_uri") or tracking.tracking_uri(cfg.mlflow.tracking_uri)
        folder = f"concepts/{Path(split.rstrip('/')).name}"
        try:
            logger = tracking.RunLogger(uri, run_id)
            for name, image in pictures.items():
                logger.log_image(image, f"{folder}/{name}")
            logger.log_bytes(json.dumps(summary, indent=1).encode(), f"{folder}/concepts.json")
            if results:
                logger.log_bytes(json.dumps(query_out, indent=1).encode(), f"{folder}/queries.json")
            logger.close(seconds=10)  # sent, or the warning below
            logged = folder
            _log(f"logged to MLflow run {run_id} at {uri} under {folder}/")
        except Exception as e:  # noqa: BLE001 - the files are written; a tracking problem must not lose them
            print(f"warning: could not log to MLflow run {run_id} at {uri}: {e}")
    return {
        "out": str(out_dir), "index": str(out_dir / INDEX_ARRAYS), "reused": reused, "source": index.source,
        "n_concepts": index.n_concepts, "n_images": index.n_images, "n_segments": index.n_segments,
        "gallery": str(out_dir / "gallery.png"), "tsne": str(out_dir / "tsne.png"),
        "concepts_json": str(out_dir / "concepts.json"), "queries": query_out, "mlflow_folder": logged,
        "seconds": round(time.time() - t0, 1),
    }
