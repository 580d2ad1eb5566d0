"""Benchmark: shoppers' phone photos -- decoding a 12-megapixel JPEG at reduced scale against in full.

A phone photo is ~12 megapixels; the default model looks at 128x96. Decoding all of it costs more than the
model's forward pass, so `Embedder.decode` asks libjpeg for the smallest DCT scale (1/2, 1/4, 1/8) that keeps
three times the model's input (`model.images.DECODE_MARGIN`), for the server's queries, the index build and
`index update` alike. This measures, on phone-sized versions of the relevance harness's queries, what that
buys and what it costs:

- time per photo: decode + preprocess, full against reduced scale (medians over the photos, the two
  alternating per photo in one process), and the model's batch-1 forward pass for scale;
- the embedding's cosine with the full decode's;
- top-1 relevance (type, strict) of the queries against the harness's gallery (the whole catalog as cached by
  `benchmarks.bench_relevance`; embedded here if not cached), for the original small JPEGs, the phone
  photos decoded in full and at reduced scale, and the phone photos shrunk on the client before upload
  (`engine.client.shrink_image` to GetIndexInfo's query image size, `Embedder.decode_size()`): their bytes,
  the client's time to shrink, the server's time to decode them.

The phone photos are made from the catalog's own photos (no phone photos of catalog products exist here):
each test-split query image upscaled to 3024x4032 (bicubic), sensor-like noise added (Gaussian, sigma 4
grey levels), stored landscape 4032x3024 with EXIF orientation 6 as phones store portrait shots, JPEG
quality 90 (about 2 MB each). Real photos have more detail than an upscaled 60x80 image; the decode time
is that of a real 12 MP JPEG of this size and quality within about 2x (it depends on the entropy-coded
bytes), the quality numbers are for this kind of image only.

    python -m benchmarks.bench_phone_photos --queries 300
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_relevance import (  # noqa: E402
    DEFAULT_CATALOG,
    embed_gallery,
    load_gallery,
    paired_comparison,
    relevance_metrics,
)
from benchmarks.common import write_result  # noqa: E402

PHONE_SIZE = (3024, 4032)  # (width, height) as displayed: a 12 MP portrait photo


def phone_jpeg(photo: Any, rng: np.random.Generator, size: tuple[int, int] = PHONE_SIZE) -> bytes:
    """A phone-like JPEG of `photo`: upscaled to `size`, noise added, stored landscape with EXIF orientation 6."""
    from PIL import Image

    big = photo.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    noisy = np.asarray(big, dtype=np.int16) + rng.normal(0, 4, (size[1], size[0], 3)).astype(np.int16)
    stored = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the portrait photo again
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    import faiss
    from PIL import Image

    from engine.client import shrink_image
    from model.catalog import CatalogConfig
    from model.checkpoint import default_model_path
    from model.embedder import Embedder
    from model.images import DECODE_MARGIN, decode_image

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the default model)")
    parser.add_argument("--queries", type=int, default=300, help="test-split queries (the harness's seeded sample)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a server request uses one)")
    parser.add_argument("--name", default="phone_photos", help="results/<name>.{json,md}")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "work" / "relevance-cache",
                        help="the relevance harness's embedding cache")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    checkpoint = args.model or default_model_path()
    config = CatalogConfig(split_column=None, split_file="splits.csv")
    gallery = load_gallery(DEFAULT_CATALOG / "styles.csv", DEFAULT_CATALOG / "images", config, "articleType",
                           ["baseColour"], "test", max_queries=args.queries)
    vectors = embed_gallery("gallery", str(checkpoint), gallery, args.cache_dir).astype(np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    embedder = Embedder.load(checkpoint, precision="fp32")  # as the harness embedded the gallery
    rng = np.random.default_rng(0)

    def timed(fn: Any) -> tuple[Any, float]:
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    queries: dict[str, list[np.ndarray]] = {"original": [], "full": [], "reduced": [], "shrunk": []}
    seconds: dict[str, list[float]] = {"full": [], "reduced": [], "forward": [], "shrink": [], "shrunk": []}
    sizes, nbytes, shrunk_bytes = [], [], []
    for number, row in enumerate(gallery.queries):
        data = phone_jpeg(Image.open(gallery.paths[row]), rng)
        nbytes.append(len(data))
        order = ("full", "reduced") if number % 2 == 0 else ("reduced", "full")
        for how in order:
            decode = (lambda d=data: decode_image(d)) if how == "full" else (lambda d=data: embedder.decode(d))
            (size, pixels), took = timed(lambda decode=decode: _decoded(decode(), embedder))
            seconds[how].append(took)
            if how == "reduced":
                sizes.append(size)
            vector, forward = timed(lambda p=pixels: embedder.embed_pixels(p[None])[0])
            seconds["forward"].append(forward)
            queries[how].append(vector)
        small, took = timed(lambda d=data: shrink_image(d, embedder.decode_size()))  # on the shopper's phone
        seconds["shrink"].append(took)
        shrunk_bytes.append(len(small))
        pixels, took = timed(lambda s=small: embedder.preprocess(embedder.decode(s)))  # on the server
        seconds["shrunk"].append(took)
        queries["shrunk"].append(embedder.embed_pixels(pixels[None])[0])
        queries["original"].append(embedder.embed_images([decode_image(gallery.paths[row].read_bytes())])[0])
        if (number + 1) % 50 == 0:
            print(f"{number + 1}/{len(gallery.queries)} photos: decode + preprocess median "
                  f"{statistics.median(seconds['full']) * 1e3:.0f} ms full, "
                  f"{statistics.median(seconds['reduced']) * 1e3:.0f} ms reduced", flush=True)

    relevance: dict[str, dict[str, Any]] = {}
    top1: dict[str, dict[str, np.ndarray]] = {}  # per-query 0/1 top-1 hits, for the paired comparisons
    for how, rows in queries.items():
        _, found = index.search(np.stack(rows).astype(np.float32), 11)
        hits = np.array([[h for h in row if h != q][:10] for q, row in zip(gallery.queries, found, strict=True)])
        t = relevance_metrics(hits, gallery.queries, gallery.type_labels)
        s = relevance_metrics(hits, gallery.queries, gallery.strict_labels)
        relevance[how] = {"type_top1": t["top1"], "strict_top1": s["top1"], "strict_recall@10": s["recall@10"]}
        top1[how] = {rule: labels[hits[:, 0]] == labels[gallery.queries]
                     for rule, labels in (("type", gallery.type_labels), ("strict", gallery.strict_labels))}
    for how in ("reduced", "shrunk"):  # against the full decode, paired on the same queries (95% bootstrap)
        relevance[how]["vs_full"] = {rule: paired_comparison(top1[how][rule], top1["full"][rule])
                                     for rule in ("type", "strict")}
    cosines = np.sum(np.stack(queries["full"]) * np.stack(queries["reduced"]), axis=1)
    shrunk_cosines = np.sum(np.stack(queries["reduced"]) * np.stack(queries["shrunk"]), axis=1)
    shrink_ms = statistics.median(seconds["shrink"]) * 1e3
    shrunk_ms = statistics.median(seconds["shrunk"]) * 1e3
    full_ms = statistics.median(seconds["full"]) * 1e3
    reduced_ms = statistics.median(seconds["reduced"]) * 1e3
    forward_ms = statistics.median(seconds["forward"]) * 1e3
    result = {
        "photos": len(gallery.queries), "photo_size": list(PHONE_SIZE), "median_jpeg_bytes": int(np.median(nbytes)),
        "reduced_decode_size": list(sizes[0]), "decode_margin": DECODE_MARGIN,
        "decode_preprocess_ms_full": round(full_ms, 1), "decode_preprocess_ms_reduced": round(reduced_ms, 1),
        "speedup": round(full_ms / reduced_ms, 2), "forward_ms_batch1": round(forward_ms, 1),
        "cosine_min": round(float(cosines.min()), 4), "cosine_median": round(float(np.median(cosines)), 4),
        "cosine_p01": round(float(np.quantile(cosines, 0.01)), 4), "relevance": relevance,
        "shrunk": {"median_bytes": int(np.median(shrunk_bytes)), "client_shrink_ms": round(shrink_ms, 1),
                   "server_decode_preprocess_ms": round(shrunk_ms, 1),
                   "cosine_to_reduced_median": round(float(np.median(shrunk_cosines)), 4),
                   "cosine_to_reduced_min": round(float(shrunk_cosines.min()), 4)},
    }
    lines = [
        f"{len(gallery.queries)} test-split queries as 12 MP phone JPEGs ({PHONE_SIZE[0]}x{PHONE_SIZE[1]} shown, "
        f"stored landscape with EXIF orientation 6, quality 90, median {result['median_jpeg_bytes']:,} bytes); "
        f"model {checkpoint}, fp32, {args.threads} torch thread(s); gallery: the whole catalog (harness cache).",
        "",
        "| decode | decoded size | decode + preprocess ms (median) | + batch-1 forward ms | type top-1 | strict "
        "top-1 | strict R@10 |",
        "|---|---|---|---|---|---|---|",
        f"| original catalog JPEG (60x80) | 60x80 | | | {relevance['original']['type_top1']:.3f} | "
        f"{relevance['original']['strict_top1']:.3f} | {relevance['original']['strict_recall@10']:.3f} |",
        f"| phone photo, full | {PHONE_SIZE[0]}x{PHONE_SIZE[1]} | {full_ms:.1f} | {forward_ms:.1f} | "
        f"{relevance['full']['type_top1']:.3f} | {relevance['full']['strict_top1']:.3f} | "
        f"{relevance['full']['strict_recall@10']:.3f} |",
        f"| phone photo, reduced scale (`Embedder.decode`) | {sizes[0][0]}x{sizes[0][1]} | {reduced_ms:.1f} | "
        f"{forward_ms:.1f} | {relevance['reduced']['type_top1']:.3f} | {relevance['reduced']['strict_top1']:.3f} | "
        f"{relevance['reduced']['strict_recall@10']:.3f} |",
        f"| phone photo shrunk on the client ({int(np.median(shrunk_bytes)):,} bytes uploaded; shrinking "
        f"{shrink_ms:.1f} ms there) | {embedder.decode_size()[0]}x{embedder.decode_size()[1]} | {shrunk_ms:.1f} | "
        f"{forward_ms:.1f} | {relevance['shrunk']['type_top1']:.3f} | {relevance['shrunk']['strict_top1']:.3f} | "
        f"{relevance['shrunk']['strict_recall@10']:.3f} |",
        "",
        f"Reduced-scale decoding is {result['speedup']:.1f}x faster; the embedding's cosine with the full "
        f"decode's: median {result['cosine_median']:.4f}, 1st percentile {result['cosine_p01']:.4f}, "
        f"min {result['cosine_min']:.4f}. Top-1 against the full decode, paired (95% bootstrap): reduced type "
        f"{_diff(relevance['reduced']['vs_full']['type'])}, strict {_diff(relevance['reduced']['vs_full']['strict'])}; "
        f"shrunk type {_diff(relevance['shrunk']['vs_full']['type'])}, strict "
        f"{_diff(relevance['shrunk']['vs_full']['strict'])}. A photo shrunk on the client uploads "
        f"{result['median_jpeg_bytes'] / max(1, result['shrunk']['median_bytes']):.0f}x fewer bytes; its embedding's "
        f"cosine with the reduced-scale decode's: median {result['shrunk']['cosine_to_reduced_median']:.4f}, "
        f"min {result['shrunk']['cosine_to_reduced_min']:.4f}.",
    ]
    write_result(args.name, {"model": str(checkpoint), "queries": args.queries, "threads": args.threads},
                 result, "\n".join(lines))
    print("\n".join(lines))
    return 0


def _decoded(image: Any, embedder: Any) -> tuple[tuple[int, int], np.ndarray]:
    """(decoded size, preprocessed pixels) of a decoded image."""
    return image.size, embedder.preprocess(image)


def _diff(comparison: dict[str, Any]) -> str:
    low, high = comparison["difference_95"]
    return f"{comparison['difference'] * 100:+.1f} pts [{low * 100:+.1f}, {high * 100:+.1f}]"


if __name__ == "__main__":
    sys.exit(main())
