"""Pictures of a :class:`SegmentIndex`: segment thumbnails, the concept gallery, the t-SNE map
and query results. Images are read as the index saw them (centre square resized to the
index's image size), so segment maps line up with the decoded pictures."""
from __future__ import annotations

import numpy as np

from raysseg.apps.browse.index import BrowseError, SegmentIndex, _log
from raysseg.apps.browse.query import QueryResult

COLOUR_A = (255, 140, 0)  # first concept of a query: orange
COLOUR_B = (0, 190, 255)  # second concept: sky blue


def load_view(path: str, size: int) -> np.ndarray:
    """An image as the index saw it: the centre square resized to size x size, uint8 (size, size, 3)."""
    from PIL import Image

    from raysseg.io.images import center_square_box, decode_image
    from raysseg.io.storage import read_bytes

    image = decode_image(read_bytes(path))
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=center_square_box(*image.size)))


class _Views:
    """Decoded images by index row, each read once; unreadable ones come back grey."""

    def __init__(self, index: SegmentIndex):
        self.index, self.cache = index, {}

    def __call__(self, image: int) -> np.ndarray:
        if image not in self.cache:
            s = self.index.image_size
            try:
                self.cache[image] = load_view(self.index.paths[image], s)
            except Exception as e:  # noqa: BLE001 - a picture must not fail on one unreadable file
                _log(f"warning: could not read {self.index.paths[image]} for a picture: {type(e).__name__}: {e}")
                self.cache[image] = np.full((s, s, 3), 128, np.uint8)
        return self.cache[image]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def segment_thumbnail(index: SegmentIndex, row: int, view: np.ndarray, size: int, dim: float = 0.3,
                      margin: float = 0.15, outline: tuple[int, int, int] | None = (255, 215, 0)) -> np.ndarray:
    """The segment's box (grown by ``margin`` and made square, inside the image) cropped from
    its image, pixels outside the segment dimmed to ``dim``, its border drawn in ``outline``
    (None: no border), resized to (size, size, 3)."""
    from PIL import Image

    s = index.image_size
    mask = index.segment_mask(row, s)
    y0, x0, y1, x1 = (index.box[row] * s).tolist()
    side = min(max(y1 - y0, x1 - x0) * (1 + 2 * margin), s)
    side = max(side, min(s, 8))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top = int(round(min(max(cy - side / 2, 0), s - side)))
    left = int(round(min(max(cx - side / 2, 0), s - side)))
    side = int(round(side))
    crop = view[top : top + side, left : left + side].astype(np.float32)
    m = mask[top : top + side, left : left + side]
    crop[~m] *= dim
    out = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((size, size), Image.BILINEAR)).copy()
    if outline is not None:  # the segment's border, visible on dark images too
        big = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST))
        out[_outline(big, max(1, size // 64))] = outline
    return out


def gallery(index: SegmentIndex, columns: int = 16, per_concept: int = 6, thumb: int = 96,
            seed: int = 0) -> np.ndarray:
    """Segments per concept: the ``columns`` most frequent concepts left to right, up to
    ``per_concept`` randomly sampled segments of each (seeded) top to bottom. A cell is the
    segment's box cropped from its image with the rest dimmed; the header gives the
    concept id, its segments and images. Returns uint8 (H, W, 3)."""
    from PIL import Image, ImageDraw

    counts, images = index.counts(), index.image_counts()
    order = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0][:columns]
    gap, title_h, head_h = 4, 40, 34
    width = max(max(len(order), 1) * (thumb + gap) + gap, 360)
    height = title_h + head_h + per_concept * (thumb + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    source = "learned dictionary" if index.source == "dictionary" else "k-means of the segment prototypes"
    used = int((counts > 0).sum())
    draw.text((gap, 3), f"{index.n_concepts} concepts: {source}", fill=(0, 0, 0), font=_font(13))
    draw.text((gap, 20), f"{len(order)} most frequent of {used} used; {index.n_segments} segments in "
              f"{index.n_images} images", fill=(60, 60, 60), font=_font(12))
    rng = np.random.default_rng(seed)
    views = _Views(index)
    small = _font(12)
    for col, c in enumerate(order):
        x = gap + col * (thumb + gap)
        draw.text((x + 2, title_h), f"concept {c}", fill=(0, 0, 0), font=small)
        draw.text((x + 2, title_h + 15), f"{counts[c]} seg / {images[c]} img", fill=(90, 90, 90), font=_font(10))
        rows = np.nonzero(index.concept == c)[0]
        pick = np.sort(rng.choice(rows, min(per_concept, len(rows)), replace=False))
        for r in range(per_concept):
            y = title_h + head_h + r * (thumb + gap)
            if r < len(pick):
                cell = segment_thumbnail(index, int(pick[r]), views(int(index.image[pick[r]])), thumb)
                canvas.paste(Image.fromarray(cell), (x, y))
            else:
                draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(235, 235, 235))
    return np.asarray(canvas)


def _concept_colours(k: int) -> np.ndarray:
    from raysseg.core.pictures import palette

    return palette(max(k, 1)).astype(np.float32) / 255.0


def tsne_map(index: SegmentIndex, max_points: int = 2000, thumbnails: int = 12, thumb: int = 64,
             seed: int = 0, labels: int = 24) -> np.ndarray:
    """t-SNE (scikit-learn, seeded, 500 iterations; PCA to 50 dimensions first when the
    codes are wider) of up to ``max_points`` randomly sampled segment prototypes: a scatter
    coloured by concept (colours follow the concepts' frequency rank) with the ids of the ``labels`` most frequent concepts at their median
    position, and ``thumbnails`` segment thumbnails at points spread over the map
    (farthest-point order). Returns uint8 (H, W, 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    if index.proto is None or not index.n_segments:
        raise BrowseError("t-SNE needs an index with prototypes and at least one segment")
    rng = np.random.default_rng(seed)
    n = min(max_points, index.n_segments)
    rows = np.sort(rng.choice(index.n_segments, n, replace=False))
    x = index.proto[rows].astype(np.float32)
    if n >= 5:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):  # OpenMP threads spin on a busy machine; one core does 2000 points in ~10 s
            if x.shape[1] > 50 and n > 50:
                x = PCA(50, random_state=seed).fit_transform(x)
            emb = TSNE(n_components=2, perplexity=float(min(30.0, (n - 1) / 3)), init="pca", random_state=seed,
                       learning_rate="auto", max_iter=500).fit_transform(x)
    else:  # too few points for t-SNE: a line
        emb = np.stack([np.arange(n, dtype=np.float64), np.zeros(n)], 1)
    concept = index.concept[rows]
    rank = np.empty(index.n_concepts, np.int64)  # colours by frequency rank: the largest concepts differ most
    rank[np.argsort(-index.counts(), kind="stable")] = np.arange(index.n_concepts)
    colours = _concept_colours(index.n_concepts)[rank]
    fig = Figure(figsize=(9, 9), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(emb[:, 0], emb[:, 1], c=colours[concept], s=10, alpha=0.8, linewidths=0)
    present = np.bincount(concept, minlength=index.n_concepts)
    for c in [int(c) for c in np.argsort(-present, kind="stable")[:labels] if present[c] > 0]:
        px, py = np.median(emb[concept == c], axis=0)
        ax.text(px, py, str(c), fontsize=9, ha="center", va="center", weight="bold", zorder=5,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": colours[c], "lw": 1.5, "alpha": 0.9})
    if thumbnails > 0 and index.maps is not None:
        views = _Views(index)
        for j in _spread(emb, min(thumbnails, n), rng):
            row = int(rows[j])
            cell = segment_thumbnail(index, row, views(int(index.image[row])), thumb)
            box = AnnotationBbox(OffsetImage(cell, zoom=1.0), tuple(emb[j]), frameon=True, pad=0.1,
                                 bboxprops={"edgecolor": colours[index.concept[row]], "linewidth": 2}, zorder=3)
            ax.add_artist(box)
    ax.set_xticks([])
    ax.set_yticks([])
    source = "dictionary" if index.source == "dictionary" else "k-means"
    ax.set_title(f"t-SNE of {n} of {index.n_segments} segment prototypes, coloured by concept ({source})",
                 fontsize=11)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _spread(points: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k indices of points, greedily farthest from those already chosen (starting at random)."""
    chosen = [int(rng.integers(len(points)))]
    dist = np.linalg.norm(points - points[chosen[0]], axis=1)
    while len(chosen) < k:
        j = int(np.argmax(dist))
        if dist[j] <= 0:
            break
        chosen.append(j)
        dist = np.minimum(dist, np.linalg.norm(points - points[j], axis=1))
    return chosen


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _pairs(n: int) -> str:
    return _count(n, "pair")


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` of its border (or of the image border)."""
    inner = mask.copy()
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def query_picture(index: SegmentIndex, result: QueryResult, max_images: int = 8, size: int = 192,
                  per_row: int = 4) -> np.ndarray:
    """The first ``max_images`` matches of a query, each image with its best pair: the first
    concept's segment tinted and outlined orange, the second's blue, the rest dimmed; the
    caption gives the file name and the number of matching pairs. Returns uint8 (H, W, 3)."""
    from PIL import Image, ImageDraw

    shown = result.matches[:max_images]
    gap, title_h, caption_h = 6, 48, 18
    cols = max(1, min(per_row, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    width = max(cols * (size + gap) + gap, 460)
    height = title_h + rows * (size + caption_h + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), f'"{result.text}": {_count(len(result.matches), "image")}'
              + (f", first {len(shown)} shown" if len(result.matches) > len(shown) else ""),
              fill=(0, 0, 0), font=_font(15))
    draw.rectangle([gap, 28, gap + 12, 40], fill=COLOUR_A)
    draw.text((gap + 18, 26), f"concept {result.a}", fill=(0, 0, 0), font=_font(12))
    draw.rectangle([gap + 120, 28, gap + 132, 40], fill=COLOUR_B)
    draw.text((gap + 138, 26), f"concept {result.b}", fill=(0, 0, 0), font=_font(12))
    draw.text((gap + 240, 26), "best pair of each image", fill=(90, 90, 90), font=_font(12))
    views = _Views(index)
    for i, m in enumerate(shown):
        s, t = m.pairs[0]
        view = views(m.image).astype(np.float32)
        mask_a, mask_b = index.segment_mask(s), index.segment_mask(t)
        out = view * 0.45
        for mask, colour in ((mask_a, COLOUR_A), (mask_b, COLOUR_B)):
            out[mask] = 0.7 * view[mask] + 0.3 * np.asarray(colour, np.float32)
        big = np.asarray(Image.fromarray(out.astype(np.uint8)).resize((size, size), Image.NEAREST)).copy()
        for mask, colour in ((mask_a, COLOUR_A), (mask_b, COLOUR_B)):
            big_mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
            big[_outline(big_mask, max(2, size // 96))] = colour
        x = gap + (i % cols) * (size + gap)
        y = title_h + (i // cols) * (size + caption_h + gap)
        canvas.paste(Image.fromarray(big), (x, y))
        name = m.path.rstrip("/").rsplit("/", 1)[-1]
        name = name if len(name) <= size // 7 else "..." + name[-(size // 7 - 3):]
        draw.text((x, y + size + 2), f"{name}  ({_pairs(len(m.pairs))})", fill=(0, 0, 0), font=_font(11))
    if not shown:
        draw.text((gap, title_h + 4), "no matching images", fill=(120, 0, 0), font=_font(13))
    return np.asarray(canvas)
