"""Top-1 relevance harness: how often is the first visually similar product a relevant one?

Protocol (shared/datasets README): queries are the catalog's `test` split (or `--query-split`), the gallery
is every catalog image except the query itself, search is exact (inner product on L2-normalised
embeddings). Reported per model: top-1 relevance "type" (first result has the query's type column value),
"strict" (type and every `--strict-columns` value), Recall@1/5/10 and mAP@10 under both relevance rules, a
per-type breakdown, and the same top-1 numbers with binary codes (sign bits, after the
model's ITQ rotation when `vitrine binarize` fitted one; Hamming distance). Top-1 numbers carry 95%
bootstrap intervals over the queries, and every model is compared with `--baseline` (default: the last
model) on the same queries: the difference and the ratio with 95% paired-bootstrap intervals, so a
difference smaller than its noise is called so.
Any catalog CSV with label columns works: the column mapping is a `--catalog-config` JSON.

Outputs (in `--out`, default benchmarks/results): relevance.json, relevance.md, relevance.png (bar chart)
and relevance_examples.png (queries with their top results). Embeddings are cached per model fingerprint
and catalog in `--cache-dir`, so rerunning with one more model only embeds that model.

    python -m benchmarks.bench_relevance --model vit=model/default --model cnn=frozen-cnn
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import hardware, write_result  # noqa: E402

DEFAULT_CATALOG = REPO.parent / "shared" / "datasets" / "fashion-product-images-small"
ANY_SPLIT = "*"  # --query-split value: every product with a type value may be a query
FROZEN_CNN = "frozen-cnn"  # --model value naming the ImageNet EfficientNet-Lite0 baseline


@dataclass
class Gallery:
    """The catalog images with their labels (row i = image i)."""

    ids: list[str]
    paths: list[Path]
    type_labels: np.ndarray  # (n,) object: value of the type column
    strict_labels: np.ndarray  # (n,) object: type plus strict columns joined
    queries: np.ndarray  # (q,) int row numbers of the query images


def load_gallery(csv_path: Path, images_dir: Path, catalog_config: Any, type_column: str,
                 strict_columns: list[str], query_split: str, max_queries: int | None = None) -> Gallery:
    """Every product with an image file; queries are those in `query_split` with a non-empty type.

    Images are found as the catalog config says (image_pattern in `images_dir`, or the image_column's
    paths; its URLs are downloaded into `images_dir`/.image-cache first).
    """
    from model.catalog import read_catalog
    from model.data.ingest import local_sources
    from model.data.shards import label_columns, product_label, unknown_label_columns

    table = read_catalog(csv_path, catalog_config)
    known = label_columns(table.products)
    unknown = unknown_label_columns([type_column, *strict_columns], known)
    if unknown:  # an unknown column read as "" for every product: no query, or strict silently equal to type
        raise ValueError(f"column {', '.join(map(repr, unknown))} is not a label column of {csv_path} (known: "
                         f"{', '.join(sorted(known))}; a CSV column must be in the catalog config's "
                         "attribute_columns); --strict-columns '' compares the type only")
    sources = local_sources(table.images, images_dir, images_dir / ".image-cache", None, progress=True)
    ids, paths, types, stricts, queries = [], [], [], [], []
    for product, source in zip(table.products, sources.paths, strict=True):
        path = Path(source)
        if not source or not path.is_file():
            continue
        value = product_label(product, type_column)
        strict = "|".join([value] + [product_label(product, c) for c in strict_columns])
        if (query_split == ANY_SPLIT or product.split == query_split) and value:
            queries.append(len(ids))
        ids.append(product.product_id)
        paths.append(path)
        types.append(value)
        stricts.append(strict)
    if not queries:
        splits = sorted({str(p.split) for p in table.products if p.split is not None})
        raise ValueError(f"no query images: no product of {csv_path} has split {query_split!r} and a "
                         f"{type_column!r} value (splits there: {', '.join(splits) or 'none'}; set split_column "
                         "or split_file in the catalog config, or --query-split; --query-split '*' --max-queries "
                         "1000 draws the queries from every product, fair for a model that never trained on them)")
    chosen = np.array(queries)
    if max_queries is not None and len(chosen) > max_queries:
        chosen = np.sort(np.random.default_rng(0).choice(chosen, max_queries, replace=False))
    return Gallery(ids, paths, np.array(types, dtype=object), np.array(stricts, dtype=object), chosen)


def _embedder(spec: str, cache_dir: Path, precision: str = "fp32") -> Any:
    from model.baselines import save_frozen_cnn
    from model.embedder import Embedder

    path = save_frozen_cnn(cache_dir / "frozen-cnn") if spec == FROZEN_CNN else Path(spec)
    return Embedder.load(path, precision=precision)


def embed_gallery(name: str, spec: str, gallery: Gallery, cache_dir: Path, batch_size: int = 32,
                  precision: str = "fp32") -> np.ndarray:
    """(n, dim) float32 embeddings of the gallery with one model, cached by model fingerprint, catalog and the
    arithmetic (fp32 by default, so the numbers do not depend on the machine's bf16 support)."""
    from tqdm import tqdm

    embedder = _embedder(spec, cache_dir, precision)
    catalog_key = hashlib.sha256("\n".join(map(str, gallery.paths)).encode()).hexdigest()[:16]
    arithmetic = "" if embedder.precision == "fp32" else f"-{embedder.precision}"
    cache = cache_dir / f"emb-{embedder.fingerprint[:16]}-{catalog_key}{arithmetic}.npy"
    if cache.is_file():
        return np.load(cache)
    parts = []
    start = time.perf_counter()
    for begin in tqdm(range(0, len(gallery.paths), batch_size), desc=f"embed {name}", unit="batch"):
        images = [embedder.decode(p.read_bytes()) for p in gallery.paths[begin:begin + batch_size]]  # as an index
        parts.append(embedder.embed_images(images, batch_size=batch_size))
    vectors = np.concatenate(parts).astype(np.float32)
    print(f"{name}: embedded {len(vectors)} images in {time.perf_counter() - start:.1f} s", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache.with_suffix(".tmp.npy"), vectors)
    cache.with_suffix(".tmp.npy").replace(cache)
    return vectors


def neighbours(vectors: np.ndarray, queries: np.ndarray, k: int = 10, binary: bool = False,
               codes: np.ndarray | None = None) -> np.ndarray:
    """(q, k) gallery rows nearest to each query row, the query itself excluded (exact search).

    binary: Hamming search over `codes` (packed bits; default: plain sign bits of the vectors).
    """
    import faiss

    if binary:
        codes = np.packbits(vectors > 0, axis=1) if codes is None else codes
        index: Any = faiss.IndexBinaryFlat(codes.shape[1] * 8)
        index.add(codes)
        _, found = index.search(codes[queries], k + 1)
    else:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        _, found = index.search(vectors[queries], k + 1)
    rows = []
    for query, hits in zip(queries, found, strict=True):
        rows.append([h for h in hits if h != query and h >= 0][:k])
    return np.array(rows, dtype=np.int64)


def relevance_metrics(found: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 relevance, Recall@1/5/10 and mAP@10 of the found rows under one relevance rule (equal labels)."""
    relevant = labels[found] == labels[queries][:, None]  # (q, k) bool
    out = {"top1": float(relevant[:, 0].mean())}
    for k in (1, 5, 10):
        out[f"recall@{k}"] = float(relevant[:, :k].any(axis=1).mean())
    precision_at = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
    hits = relevant.sum(axis=1)
    ap = (precision_at * relevant).sum(axis=1) / np.maximum(hits, 1)
    out["map@10"] = float(ap.mean())
    return {k: round(v, 4) for k, v in out.items()}


BOOTSTRAP_SAMPLES = 2000  # resamples of the queries for the 95% intervals


def bootstrap_interval(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of per-query values (queries resampled with replacement)."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=np.float64)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return round(float(low), 4), round(float(high), 4)


def paired_comparison(a: np.ndarray, b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> dict[str, Any]:
    """Model a against model b on the same queries (per-query 0/1 hits): the difference of means and the ratio,
    each with a 95% paired-bootstrap interval (the same resampled queries for both models)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    picks = rng.integers(0, len(a), size=(samples, len(a)))
    mean_a, mean_b = a[picks].mean(axis=1), b[picks].mean(axis=1)
    diff = np.percentile(mean_a - mean_b, [2.5, 97.5])
    ratio = np.percentile(mean_a / np.maximum(mean_b, 1e-12), [2.5, 97.5])
    return {"difference": round(float(a.mean() - b.mean()), 4),
            "difference_95": [round(float(diff[0]), 4), round(float(diff[1]), 4)],
            "ratio": round(float(a.mean() / max(b.mean(), 1e-12)), 4),
            "ratio_95": [round(float(ratio[0]), 4), round(float(ratio[1]), 4)],
            "significant": bool(diff[0] > 0 or diff[1] < 0)}


def evaluate(vectors: np.ndarray, gallery: Gallery, codes: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics of one model's gallery embeddings (binary: `codes`, default plain sign bits)."""
    found = neighbours(vectors, gallery.queries)
    found_binary = neighbours(vectors, gallery.queries, binary=True, codes=codes)
    result: dict[str, Any] = {"type": relevance_metrics(found, gallery.queries, gallery.type_labels),
                              "strict": relevance_metrics(found, gallery.queries, gallery.strict_labels),
                              "binary_type": relevance_metrics(found_binary, gallery.queries, gallery.type_labels),
                              "binary_strict": relevance_metrics(found_binary, gallery.queries,
                                                                 gallery.strict_labels),
                              "dim": int(vectors.shape[1])}
    first_ok = gallery.type_labels[found[:, 0]] == gallery.type_labels[gallery.queries]
    first_strict = gallery.strict_labels[found[:, 0]] == gallery.strict_labels[gallery.queries]
    result["type"]["top1_95"] = list(bootstrap_interval(first_ok))
    result["strict"]["top1_95"] = list(bootstrap_interval(first_strict))
    result["hits"] = {"type": first_ok, "strict": first_strict}  # per query, for paired comparisons (not saved)
    per_type: dict[str, dict[str, float]] = {}
    for value in sorted(set(gallery.type_labels[gallery.queries])):
        mask = gallery.type_labels[gallery.queries] == value
        per_type[value] = {"queries": int(mask.sum()), "top1": round(float(first_ok[mask].mean()), 4)}
    result["per_type"] = per_type
    result["examples"] = found[:, :5].tolist()
    return result


def chance(gallery: Gallery) -> dict[str, float]:
    """Top-1 relevance of a random gallery image (the floor every model must beat)."""
    out = {}
    for name, labels in (("type", gallery.type_labels), ("strict", gallery.strict_labels)):
        values, counts = np.unique(labels, return_counts=True)
        share = dict(zip(values, counts / len(labels), strict=True))
        out[name] = round(float(np.mean([share[labels[q]] for q in gallery.queries])), 4)
    return out


def compare(results: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """Every other model against `baseline`, paired on the same queries, for type and strict top-1."""
    base = results[baseline]["hits"]
    return {name: {kind: paired_comparison(r["hits"][kind], base[kind]) for kind in ("type", "strict")}
            for name, r in results.items() if name != baseline}


def _interval(low_high: list[float]) -> str:
    return f"[{low_high[0]:.3f}, {low_high[1]:.3f}]"


def markdown_table(results: dict[str, dict[str, Any]], chance_level: dict[str, float], n_queries: int,
                   n_gallery: int, comparisons: dict[str, dict[str, Any]] | None = None,
                   baseline: str | None = None, query_split: str = "test") -> str:
    """The models side by side (Markdown), 95% bootstrap intervals of top-1, paired comparisons to `baseline`."""
    queries = "images of any split" if query_split == ANY_SPLIT else f"{query_split}-split images"
    lines = [f"Queries: {n_queries} {queries}; gallery: {n_gallery} catalog images (query excluded); "
             f"exact inner-product search. Chance top-1: type {chance_level['type']:.3f}, strict "
             f"{chance_level['strict']:.3f}. Brackets: 95% intervals, bootstrap over the queries "
             f"({BOOTSTRAP_SAMPLES} resamples).", "",
             "| model | dim | top-1 type | top-1 strict | R@1 | R@5 | R@10 (strict) | mAP@10 (strict) | "
             "binary top-1 type | binary top-1 strict | strict: binary - float |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s, t, bs, bt = r["strict"], r["type"], r["binary_strict"], r["binary_type"]
        lines.append(f"| {name} | {r['dim']} | {t['top1']:.3f} {_interval(t['top1_95'])} | {s['top1']:.3f} "
                     f"{_interval(s['top1_95'])} | {s['recall@1']:.3f} | "
                     f"{s['recall@5']:.3f} | {s['recall@10']:.3f} | {s['map@10']:.3f} | {bt['top1']:.3f} | "
                     f"{bs['top1']:.3f} | {100 * (bs['top1'] - s['top1']):+.1f} pts |")
    if comparisons:
        lines += ["", f"Paired against {baseline} on the same queries (95% paired-bootstrap intervals; "
                      "'yes': the difference's interval excludes 0):", "",
                  "| model | type: difference | significant | strict: difference | significant | strict: ratio |",
                  "|---|---|---|---|---|---|"]
        for name, c in comparisons.items():
            t, s = c["type"], c["strict"]
            lines.append(f"| {name} | {100 * t['difference']:+.1f} pts [{100 * t['difference_95'][0]:+.1f}, "
                         f"{100 * t['difference_95'][1]:+.1f}] | {'yes' if t['significant'] else 'no'} | "
                         f"{100 * s['difference']:+.1f} pts [{100 * s['difference_95'][0]:+.1f}, "
                         f"{100 * s['difference_95'][1]:+.1f}] | {'yes' if s['significant'] else 'no'} | "
                         f"{s['ratio']:.2f}x {_interval(s['ratio_95'])} |")
    names = list(results)
    types = sorted(next(iter(results.values()))["per_type"].items(), key=lambda kv: -kv[1]["queries"])[:25]
    lines += ["", "Top-1 relevance (type) per articleType, the 25 most queried types:", "",
              "| type | queries | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for value, info in types:
        cells = " | ".join(f"{results[n]['per_type'][value]['top1']:.2f}" for n in names)
        lines.append(f"| {value} | {info['queries']} | {cells} |")
    return "\n".join(lines)


def plot_bars(results: dict[str, dict[str, Any]], chance_level: dict[str, float], path: Path) -> None:
    """Bar chart: top-1 type / strict / binary strict per model, chance as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    series = [("top-1 type", [results[n]["type"]["top1"] for n in names]),
              ("top-1 strict", [results[n]["strict"]["top1"] for n in names]),
              ("top-1 strict, binary codes", [results[n]["binary_strict"]["top1"] for n in names])]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) + 2), 4.2))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series):
        xs = [i + (k - 1) * width for i in range(len(names))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(chance_level["type"], color="grey", ls="--", lw=0.8, label="chance (type)")
    ax.axhline(chance_level["strict"], color="grey", ls=":", lw=0.8, label="chance (strict)")
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1 relevance")
    ax.set_title("Top-1 relevance by model (test-split queries, whole-catalog gallery)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_examples(gallery: Gallery, result: dict[str, Any], model_name: str, path: Path, rows: int = 8) -> None:
    """Grid: query image then its top-5 results; green frame = strict match, orange = type only, red = miss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    picks = np.linspace(0, len(gallery.queries) - 1, rows).astype(int)
    fig, axes = plt.subplots(rows, 6, figsize=(7.5, 1.55 * rows))
    for row, pick in enumerate(picks):
        query = int(gallery.queries[pick])
        cells = [query] + list(result["examples"][pick])
        for col, item in enumerate(cells):
            ax = axes[row, col]
            ax.imshow(Image.open(gallery.paths[item]).convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                color, title = "black", "query"
            elif gallery.strict_labels[item] == gallery.strict_labels[query]:
                color, title = "green", f"#{col}"
            elif gallery.type_labels[item] == gallery.type_labels[query]:
                color, title = "orange", f"#{col}"
            else:
                color, title = "red", f"#{col}"
            for spine in ax.spines.values():
                spine.set_color(color)
                spine.set_linewidth(2.5)
            ax.set_title(f"{title}: {gallery.strict_labels[item][:22]}", fontsize=5)
    fig.suptitle(f"{model_name}: queries and top-5 (green strict, orange type, red miss)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT",
                   help=f"a model to evaluate (repeatable); CHECKPOINT a vitrine checkpoint folder or {FROZEN_CNN}")
    p.add_argument("--csv", type=Path, default=DEFAULT_CATALOG / "styles.csv", help="catalog CSV")
    p.add_argument("--images", type=Path, default=DEFAULT_CATALOG / "images", help="images folder")
    p.add_argument("--catalog-config", type=Path, default=None,
                   help="column mapping JSON (model.catalog.CatalogConfig); default: the fashion dataset with "
                        "splits.csv beside the CSV")
    p.add_argument("--type-column", default="articleType", help="relevance 'type': same value of this column")
    p.add_argument("--strict-columns", default="baseColour",
                   help="comma-separated columns that must also match for 'strict' relevance")
    p.add_argument("--query-split", default="test",
                   help="split whose images are the queries; '*': every product (a catalog without splits; with "
                        "--max-queries a seeded sample; fair for a model that did not train on this catalog)")
    p.add_argument("--max-queries", type=int, default=None, help="evaluate a seeded sample of the queries")
    p.add_argument("--name", default="relevance", help="result file name (JSON, Markdown, PNGs)")
    p.add_argument("--baseline", default=None,
                   help="model NAME the others are compared with, paired on the same queries (default: the last "
                        "--model, when there are several)")
    p.add_argument("--out", type=Path, default=None, help="result folder (default benchmarks/results)")
    p.add_argument("--cache-dir", type=Path, default=REPO / "work" / "relevance-cache", help="embedding cache")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="arithmetic of the models' forward passes (default fp32: the same numbers on every machine)")
    args = p.parse_args(argv)
    if args.max_queries is not None and args.max_queries < 1:
        p.error(f"--max-queries must be >= 1, got {args.max_queries}")  # 0 was an IndexError traceback
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import RESULTS_DIR
    from model.catalog import CatalogConfig, load_catalog_config

    args = parse_args(argv)
    if args.catalog_config is not None:
        catalog_config = load_catalog_config(args.catalog_config)
    elif (args.csv.parent / "splits.csv").is_file():
        catalog_config = CatalogConfig(split_column=None, split_file="splits.csv")
    else:
        catalog_config = CatalogConfig()
    strict_columns = [c.strip() for c in args.strict_columns.split(",") if c.strip()]
    models = dict(spec.split("=", 1) if "=" in spec else (Path(spec).name, spec) for spec in args.model)
    if args.baseline is not None and args.baseline not in models:  # said before embedding, not after
        raise SystemExit(f"--baseline {args.baseline!r} is not one of the models: {', '.join(models)}")
    try:
        gallery = load_gallery(args.csv, args.images, catalog_config, args.type_column, strict_columns,
                               args.query_split, args.max_queries)
    except ValueError as exc:
        raise SystemExit(f"bench_relevance: error: {exc}") from None
    print(f"gallery {len(gallery.ids)} images, {len(gallery.queries)} queries", flush=True)
    results, timings = {}, {}
    for name, spec in models.items():
        start = time.perf_counter()
        vectors = embed_gallery(name, spec, gallery, args.cache_dir, precision=args.precision)
        # its binary codes: ITQ-rotated sign bits when fitted
        embedder = _embedder(spec, args.cache_dir, args.precision)
        results[name] = evaluate(vectors, gallery, embedder.binary_codes(vectors))
        results[name]["binary_codes"] = "itq" if embedder.binary is not None else "sign"
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: type {results[name]['type']['top1']:.3f} strict {results[name]['strict']['top1']:.3f} "
              f"binary strict {results[name]['binary_strict']['top1']:.3f}", flush=True)
    level = chance(gallery)
    baseline = args.baseline or (list(models)[-1] if len(models) > 1 else None)
    if baseline is not None and baseline not in results:
        raise SystemExit(f"--baseline {baseline!r} is not one of the models: {', '.join(results)}")
    comparisons = compare(results, baseline) if baseline is not None else {}
    table = markdown_table(results, level, len(gallery.queries), len(gallery.ids), comparisons, baseline,
                           args.query_split)
    out = args.out or RESULTS_DIR
    config = {"models": models, "csv": str(args.csv), "type_column": args.type_column,
              "strict_columns": strict_columns, "query_split": args.query_split, "max_queries": args.max_queries,
              "queries": int(len(gallery.queries)), "gallery": len(gallery.ids)}
    summary = {n: {k: v for k, v in r.items() if k not in ("examples", "hits")} for n, r in results.items()}
    path = write_result(args.name, config, {"models": summary, "chance": level, "seconds": timings,
                                            "baseline": baseline, "paired": comparisons}, table, out)
    plot_bars(results, level, out / f"{args.name}.png")
    first = next(iter(results))
    plot_examples(gallery, results[first], first, out / f"{args.name}_examples.png")
    print(table)
    print(f"results: {path}, {args.name}.md, {args.name}.png, {args.name}_examples.png (hardware: "
          f"{hardware()['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
