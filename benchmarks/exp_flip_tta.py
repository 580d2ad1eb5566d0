"""Experiment: does horizontal-flip test-time augmentation raise top-1 relevance? (bench_relevance protocol)

Embeds every catalog image mirrored with CHECKPOINT, averages with the harness's cached embeddings of
the originals (run `python -m benchmarks.bench_relevance --model NAME=CHECKPOINT` first), and prints
type / strict top-1 of the originals, the mirrored images, and their average. Not part of the default
path: the numbers are quoted in benchmarks/RESULTS.md.

    python benchmarks/exp_flip_tta.py model/default
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_relevance import load_gallery, neighbours, relevance_metrics  # noqa: E402
from model.catalog import CatalogConfig  # noqa: E402
from model.embedder import Embedder  # noqa: E402
from model.images import decode_image  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "fashion-product-images-small"
CACHE = REPO / "work" / "relevance-cache"


def main(checkpoint: str) -> int:
    from PIL import Image

    config = CatalogConfig(split_column=None, split_file="splits.csv")
    gallery = load_gallery(DATA / "styles.csv", DATA / "images", config, "articleType", ["baseColour"], "test")
    embedder = Embedder.load(checkpoint, precision="fp32")  # as the harness embedded the cached originals
    key = hashlib.sha256("\n".join(map(str, gallery.paths)).encode()).hexdigest()[:16]
    cached = CACHE / f"emb-{embedder.fingerprint[:16]}-{key}.npy"
    if not cached.is_file():
        raise SystemExit(f"no cached embeddings {cached}: run benchmarks.bench_relevance with {checkpoint} first")
    base = np.load(cached)
    mirrored_path = CACHE / f"flip-{embedder.fingerprint[:16]}-{key}.npy"
    if mirrored_path.is_file():
        mirrored = np.load(mirrored_path)
    else:
        parts, start = [], time.perf_counter()
        for begin in range(0, len(gallery.paths), 64):
            images = [decode_image(p.read_bytes()).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                      for p in gallery.paths[begin:begin + 64]]
            parts.append(embedder.embed_images(images, 64))
            print(f"{begin + len(images)} images mirrored, {time.perf_counter() - start:.0f} s", flush=True)
        mirrored = np.concatenate(parts)
        np.save(mirrored_path, mirrored)
    for name, vectors in (("originals", base), ("mirrored", mirrored), ("average (flip TTA)", base + mirrored)):
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        found = neighbours(vectors, gallery.queries)
        print(f"{name}: type top-1 {relevance_metrics(found, gallery.queries, gallery.type_labels)['top1']:.4f}, "
              f"strict top-1 {relevance_metrics(found, gallery.queries, gallery.strict_labels)['top1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "model/default"))
