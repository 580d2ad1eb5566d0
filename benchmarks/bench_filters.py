"""Do filters keep recall? Recall@10 of filtered search against exact filtered search, by selectivity.

Index: clustered synthetic unit vectors (dim 128 by default) in an IVF-PQ version built with
indexer.build (default "IVF512,PQ32", nprobe 16, 2 shards), searched in-process by engine.Searcher
with exact re-rank. Filters pass 50%, 10% and 1% of the vectors, either at random ("random": a
filter uncorrelated with the embedding) or whole clusters ("clustered": the passing products sit
in a few regions, usually far from the query: the hard case for IVF). Modes:

- "selector, nprobe fixed": Faiss IDSelectorBitmap with the request's nprobe (doubled only while
  fewer than the wanted candidates pass),
- "selector, nprobe / sqrt(s)": the same with nprobe grown as 1/sqrt(selectivity) (the fallback for
  shards that do not allow list probing),
- "selector, list probing": each query probes lists until it saw enough passing vectors (engine.probing),
- "default": the engine's default: exact search over the passing ids when they are <= 20,000, else
  list probing.

Run: `python benchmarks/bench_filters.py` (about 2 minutes on 2 cores). Writes
benchmarks/results/bench_filters.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, write_result  # noqa: E402
from engine import candidates  # noqa: E402
from engine.search import Searcher  # noqa: E402
from engine.types import SearchFilter, SearchOptions, SearchQuery, SearchRequest  # noqa: E402
from indexer.build import build_index_from_vectors  # noqa: E402
from indexer.version import open_version  # noqa: E402
from model.catalog import Product  # noqa: E402

SELECTIVITIES = (0.5, 0.1, 0.01)


def clustered_data(n: int, dim: int, clusters: int, nq: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xb unit vectors, their cluster labels, xq unit queries) around `clusters` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    sizes = rng.dirichlet(np.full(clusters, 2.0))
    labels = rng.choice(clusters, size=n + nq, p=sizes)
    x = centres[labels] + 0.6 * rng.normal(size=(n + nq, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:n], labels[:n], x[n:]


def categories(labels: np.ndarray, seed: int = 1) -> list[str]:
    """Per vector a category string encoding, for each selectivity, membership in a random and a clustered set."""
    rng = np.random.default_rng(seed)
    u = rng.random(len(labels))
    counts = np.bincount(labels)
    order = rng.permutation(len(counts))
    names = []
    member = {}
    for s in SELECTIVITIES:
        chosen, total = [], 0
        for cluster in order:  # whole clusters until about s of the vectors
            if total >= s * len(labels):
                break
            chosen.append(cluster)
            total += counts[cluster]
        member[s] = np.isin(labels, chosen)
    for i in range(len(labels)):
        names.append("|".join([f"r{s}" for s in SELECTIVITIES if u[i] < s] + [f"c{s}" for s in SELECTIVITIES
                                                                            if member[s][i]]))
    return names


def build_version(root: Path, args: argparse.Namespace) -> tuple[Path, np.ndarray, list[str], np.ndarray]:
    xb, labels, xq = clustered_data(args.n, args.dim, args.clusters, args.queries)
    cats = categories(labels)
    products = [Product(product_id=str(i), title="", category=c, brand="", price=None, currency="", in_stock=True,
                        image_url="", attributes={}, split=None) for i, c in enumerate(cats)]
    start = time.perf_counter()
    path = build_index_from_vectors(xb, products, root, "0" * 64, root / "no-model", args.factory,
                                    nprobe=args.nprobe, num_shards=2, min_recall_at_10=0.0, validation_queries=64)
    print(f"built {args.factory} over {args.n} x {args.dim} in {time.perf_counter() - start:.0f} s", flush=True)
    return path, xb, cats, xq


def no_embed(images, deadline):  # noqa: ANN001, ANN201
    raise AssertionError("no image queries")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=150_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--factory", default="IVF512,PQ32")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)  # as the server runs it (ServerConfig.faiss_threads): requests run in parallel
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-filters-") as tmp:
        path, xb, cats, xq = build_version(Path(tmp), args)
        with open_version(path) as version:
            modes = {"selector, nprobe fixed": (0, 0.0, False), "selector, nprobe / sqrt(s)": (0, 0.5, False),
                     "selector, list probing": (0, 0.5, True), "default": (candidates.EXACT_MAX, 0.5, True)}
            rows.append({"filter": "none", "selectivity": 1.0, "mode": "default",
                         **measure_none(Searcher(version, no_embed), xb, xq)})
            for kind in ("random", "clustered"):
                for s in SELECTIVITIES:
                    category = f"{kind[0]}{s}"
                    passing = np.array([category in c.split("|") for c in cats])
                    for mode, (exact_max, exponent, list_probing) in modes.items():
                        candidates.NPROBE_EXPONENT = exponent
                        searcher = Searcher(version, no_embed, exact_max=exact_max)
                        if not list_probing:
                            searcher.shards._prober = None
                        row = {"filter": kind, "selectivity": round(float(passing.mean()), 4), "mode": mode,
                               **measure_filtered(searcher, xb, passing, xq, cats, category)}
                        rows.append(row)
                        print(row, flush=True)
    write(args, rows)
    return 0


def measure_none(searcher: Searcher, xb: np.ndarray, xq: np.ndarray) -> dict:
    truth_ids = np.argsort(-(xq @ xb.T), axis=1)[:, :10]
    found, times = 0, []
    for q, expected in zip(xq, truth_ids, strict=True):
        start = time.perf_counter()
        result = searcher.search(SearchRequest(SearchQuery(vector=q), top_k=10,
                                               options=SearchOptions(one_per_product=False)))
        times.append(time.perf_counter() - start)
        found += len({int(h.product_id) for h in result.hits} & set(expected.tolist()))
    return {"recall_at_10": found / (10 * len(xq)), "p50_ms": statistics.median(times) * 1e3,
            "qps": len(xq) / sum(times), "plan": "none", "passing": len(xb)}


def measure_filtered(searcher: Searcher, xb: np.ndarray, passing: np.ndarray, xq: np.ndarray, cats: list[str],
                     category: str) -> dict:
    # Product categories hold several tags ("r0.5|c0.1"); the filter matches the exact category string,
    # so filter on every distinct string that contains the tag.
    names = tuple(sorted({c for c in cats if category in c.split("|")}))
    original = SearchFilter(categories=names)
    ids = np.flatnonzero(passing)
    truth = [set(ids[np.argsort(-row)[:10]].tolist()) for row in xq @ xb[ids].T]
    found, times = 0, []
    for q, expected in zip(xq, truth, strict=True):
        start = time.perf_counter()
        result = searcher.search(SearchRequest(SearchQuery(vector=q), top_k=10, filter=original,
                                               options=SearchOptions(one_per_product=False)))
        times.append(time.perf_counter() - start)
        found += len({int(h.product_id) for h in result.hits} & expected)
    plan = searcher.shards.plan(original)
    return {"recall_at_10": found / (10 * len(xq)), "p50_ms": statistics.median(times) * 1e3,
            "qps": len(xq) / sum(times), "plan": "exact" if plan.exact else "selector", "passing": plan.passing}


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    lines = [f"Recall@10 vs exact filtered search; {args.factory}, {args.n} x {args.dim} clustered, nprobe "
             f"{args.nprobe}, exact re-rank on, {args.queries} queries, 2 shards, in-process.", "",
             "| filter | selectivity | mode | plan | recall@10 | p50 ms | QPS |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['filter']} | {r['selectivity']:.3f} | {r['mode']} | {r['plan']} | {r['recall_at_10']:.3f} "
                     f"| {r['p50_ms']:.2f} | {r['qps']:.0f} |")
    markdown = "\n".join(lines)
    write_result("bench_filters", vars(args), {"rows": rows}, markdown)
    plot(rows)
    print(markdown)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("random", "clustered"), strict=True):
        for mode in ("selector, nprobe fixed", "selector, nprobe / sqrt(s)", "selector, list probing", "default"):
            points = [(r["selectivity"], r["recall_at_10"]) for r in rows if r["filter"] == kind and r["mode"] == mode]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
        ax.axhline(0.9, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("filter selectivity (share passing)")
        ax.set_title(f"{kind} filter")
    axes[0].set_ylabel("recall@10 vs exact filtered")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "bench_filters.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())

