"""Experiment: phone-like queries at other aspect ratios -- stretch, pad or crop them to the model's input?

The catalog's photos are all 3:4 (60x80), as is the default model's input (128x96), so the relevance
harness never sees another aspect ratio. Shoppers' photos do: 4:3 and 16:9 from phones, square crops.
This takes a deterministic sample of the harness's queries (test split), reframes each one -- a wider
frame (the photo centred on a white 4:3, 16:9 or square canvas: the product smaller, more background) or a
tighter one (the centred square or 4:3 window: part of the product cut) -- and searches the harness's
cached gallery embeddings (the whole catalog, unchanged) after bringing the query to 3:4 in each of the
three ways of `model.images.fit_aspect` (the checkpoint's own resize_mode is overridden for the queries
only). Not part of the default path: the numbers are quoted in benchmarks/RESULTS.md. The gallery must be
cached first (`python -m benchmarks.bench_relevance --model NAME=CHECKPOINT`).

    python benchmarks/exp_aspect.py model/default --queries 2000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_relevance import load_gallery, relevance_metrics  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from model.catalog import CatalogConfig  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "fashion-product-images-small"
CACHE = REPO / "work" / "relevance-cache"


# each reframing is model.images.fit_aspect itself: pad = the photo centred on a white canvas of that
# width:height (a wider frame), crop = its centred window (a tighter frame)
FRAMES = {"original 3:4": None, "4:3 canvas (wider)": ("pad", 4, 3), "16:9 canvas (wider)": ("pad", 16, 9),
          "square canvas (wider)": ("pad", 1, 1), "square window (tighter)": ("crop", 1, 1),
          "4:3 window (tighter)": ("crop", 4, 3)}


def main(argv: list[str] | None = None) -> int:
    import faiss
    from PIL import Image

    from model.embedder import Embedder
    from model.images import fit_aspect

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="model folder whose gallery embeddings bench_relevance cached")
    parser.add_argument("--queries", type=int, default=2000, help="test-split queries (deterministic sample)")
    parser.add_argument("--name", default="aspect", help="results/<name>.{json,md}")
    args = parser.parse_args(argv)
    config = CatalogConfig(split_column=None, split_file="splits.csv")
    gallery = load_gallery(DATA / "styles.csv", DATA / "images", config, "articleType", ["baseColour"], "test",
                           max_queries=args.queries)
    embedder = Embedder.load(args.checkpoint, precision="fp32")  # as the harness embedded the gallery
    key = hashlib.sha256("\n".join(map(str, gallery.paths)).encode()).hexdigest()[:16]
    cached = CACHE / f"emb-{embedder.fingerprint[:16]}-{key}.npy"  # the gallery as the checkpoint's card embeds it
    if not cached.is_file():
        raise SystemExit(f"no cached gallery embeddings {cached}: run benchmarks.bench_relevance with "
                         f"{args.checkpoint} first")
    vectors = np.load(cached).astype(np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    photos = [Image.open(gallery.paths[q]).convert("RGB") for q in gallery.queries]
    rows = []
    for frame, how in FRAMES.items():
        framed = photos if how is None else [fit_aspect(p, how[1], how[2], how[0]) for p in photos]
        for mode in ("stretch", "pad", "crop"):
            if how is None and mode != "stretch":
                continue  # a 3:4 photo is the same under every mode
            start = time.perf_counter()
            embedder.resize_mode = mode
            queries = embedder.embed_images(framed, 64)
            _, found = index.search(queries, 11)
            hits = np.array([[h for h in row if h != q][:10] for q, row in zip(gallery.queries, found, strict=True)])
            t = relevance_metrics(hits, gallery.queries, gallery.type_labels)
            s = relevance_metrics(hits, gallery.queries, gallery.strict_labels)
            rows.append({"frame": frame, "resize_mode": mode, "type_top1": t["top1"], "strict_top1": s["top1"],
                         "strict_recall@10": s["recall@10"], "seconds": round(time.perf_counter() - start, 1)})
            print(f"{frame:26s} {mode:8s}: type top-1 {t['top1']:.4f}  strict top-1 {s['top1']:.4f}  "
                  f"strict R@10 {s['recall@10']:.4f}", flush=True)
    lines = [f"{len(gallery.queries)} test-split queries reframed; gallery: the {len(vectors):,} catalog images as "
             f"cached (3:4); model {args.checkpoint}.", "",
             "| query frame | stretch: type / strict | pad: type / strict | crop: type / strict |", "|---|---|---|---|"]
    for frame in FRAMES:
        cells = {r["resize_mode"]: f"{r['type_top1']:.3f} / {r['strict_top1']:.3f}"
                 for r in rows if r["frame"] == frame}
        lines.append(f"| {frame} | " + " | ".join(cells.get(m, "(same)") for m in ("stretch", "pad", "crop")) + " |")
    write_result(args.name, {"checkpoint": args.checkpoint, "queries": len(gallery.queries)}, {"rows": rows},
                 "\n".join(lines))
    print("\n".join(lines))
    print(json.dumps({"gallery_cache": str(cached)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
