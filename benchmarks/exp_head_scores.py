"""Experiment: does appending the task heads' class probabilities to the embedding raise top-1 relevance?

The retrieval vector becomes [embedding, sqrt(a) * p(articleType), sqrt(c) * p(baseColour)], so an inner
product scores cos(q, g) + a * P(same type) + c * P(same colour) under the heads' softmax (the heads are
normalized-softmax layers on the embedding itself, so the probabilities come from the harness's cached
embeddings and the checkpoint's class proxies, with no new forward pass). Queries and gallery as
`bench_relevance` (test split against the whole catalog, exact search). The weights are chosen on half of
the queries and reported on the other half (and the other way round), so the grid's best cell is not
reported on the queries that chose it. Not part of the default path: the numbers are quoted in
benchmarks/RESULTS.md.

    python benchmarks/exp_head_scores.py model/default
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_relevance import load_gallery, neighbours, relevance_metrics  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from model.catalog import CatalogConfig  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "fashion-product-images-small"
CACHE = REPO / "work" / "relevance-cache"
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)


def main(checkpoint: str) -> int:
    import torch
    import torch.nn.functional as F

    from model.checkpoint import load_checkpoint, model_fingerprint
    from model.networks import head_key

    config = CatalogConfig(split_column=None, split_file="splits.csv")
    gallery = load_gallery(DATA / "styles.csv", DATA / "images", config, "articleType", ["baseColour"], "test")
    key = hashlib.sha256("\n".join(map(str, gallery.paths)).encode()).hexdigest()[:16]
    cached = CACHE / f"emb-{model_fingerprint(checkpoint)[:16]}-{key}.npy"
    if not cached.is_file():
        raise SystemExit(f"no cached embeddings {cached}: run benchmarks.bench_relevance with {checkpoint} first")
    vectors = np.load(cached).astype(np.float32)
    model, card = load_checkpoint(checkpoint)
    with torch.no_grad():
        probs = {task: F.softmax(model.heads[head_key(task)](torch.from_numpy(vectors)), -1).numpy()
                 for task in ("articleType", "baseColour")}
    types = np.array(card["label_maps"]["articleType"], dtype=object)
    head_accuracy = float((types[probs["articleType"].argmax(1)][gallery.queries]
                           == gallery.type_labels[gallery.queries]).mean())
    print(f"articleType head accuracy on the {len(gallery.queries)} queries: {head_accuracy:.4f}")
    rows: dict[tuple[float, float], np.ndarray] = {}
    grid: dict[tuple[float, float], dict[str, dict[str, float]]] = {}
    for a, c in itertools.product(WEIGHTS, WEIGHTS):
        augmented = np.concatenate([vectors, np.sqrt(a) * probs["articleType"], np.sqrt(c) * probs["baseColour"]],
                                   axis=1).astype(np.float32)
        rows[(a, c)] = neighbours(augmented, gallery.queries)
        t = relevance_metrics(rows[(a, c)], gallery.queries, gallery.type_labels)
        s = relevance_metrics(rows[(a, c)], gallery.queries, gallery.strict_labels)
        grid[(a, c)] = {"type": t, "strict": s}
        print(f"type weight {a:<4} colour weight {c:<4}: type top-1 {t['top1']:.4f}  strict top-1 {s['top1']:.4f}  "
              f"strict R@10 {s['recall@10']:.4f}  strict mAP@10 {s['map@10']:.4f}", flush=True)
    # 2-fold choice of the weights by strict top-1: chosen on one half of the queries, measured on the other
    order = np.random.default_rng(0).permutation(len(gallery.queries))
    halves = [np.sort(order[::2]), np.sort(order[1::2])]
    report = []
    for choose, measure in (halves, halves[::-1]):
        def strict_top1(cell: tuple[float, float], part: np.ndarray) -> float:
            found, queries = rows[cell][part], gallery.queries[part]
            return relevance_metrics(found, queries, gallery.strict_labels)["top1"]
        best = max(rows, key=lambda cell: strict_top1(cell, choose))
        found, queries = rows[best][measure], gallery.queries[measure]
        report.append({"weights": best, "plain": {k: relevance_metrics(rows[(0.0, 0.0)][measure], queries, labels)
                                                  for k, labels in (("type", gallery.type_labels),
                                                                    ("strict", gallery.strict_labels))},
                       "chosen": {k: relevance_metrics(found, queries, labels)
                                  for k, labels in (("type", gallery.type_labels), ("strict", gallery.strict_labels))}})
    lines = [f"{len(gallery.queries)} test-split queries, gallery the whole catalog, model {checkpoint}; articleType "
             f"head accuracy on the queries {head_accuracy:.3f}.", "",
             "| weights (type, colour) | type top-1 | strict top-1 | strict R@10 | strict mAP@10 |",
             "|---|---|---|---|---|"]
    lines += [f"| {a}, {c} | {g['type']['top1']:.3f} | {g['strict']['top1']:.3f} | {g['strict']['recall@10']:.3f} | "
              f"{g['strict']['map@10']:.3f} |" for (a, c), g in grid.items()]
    lines += ["", "Weights chosen on one half of the queries (by strict top-1), measured on the other half:", "",
              "| chosen (type, colour) | half: plain type / strict / R@10 | half: chosen type / strict / R@10 |",
              "|---|---|---|"]
    lines += [f"| {r['weights'][0]}, {r['weights'][1]} | {r['plain']['type']['top1']:.3f} / "
              f"{r['plain']['strict']['top1']:.3f} / {r['plain']['strict']['recall@10']:.3f} | "
              f"{r['chosen']['type']['top1']:.3f} / {r['chosen']['strict']['top1']:.3f} / "
              f"{r['chosen']['strict']['recall@10']:.3f} |" for r in report]
    write_result("head_scores", {"checkpoint": checkpoint, "weights": WEIGHTS},
                 {"head_accuracy": head_accuracy, "grid": [{"weights": list(k), **v} for k, v in grid.items()],
                  "two_fold": report}, "\n".join(lines))
    print("\n".join(lines))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "model/default"))
