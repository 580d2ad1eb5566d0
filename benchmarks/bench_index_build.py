"""How long does an index build take, how much memory, what recall, and how does autofaiss compare?

For each size N (default 10k, 100k, 1M) of dimension 256, **clustered synthetic vectors** (N/100
Gaussian clusters, L2-normalised; no real embeddings exist at these sizes yet), each build runs in its
own process (so peak RSS is its own):

- vitrine: `build_index_from_vectors` (plan under --memory-budget, train, add to shards, write the
  version, validate with re-ranking at the default 0.95 gate, which tunes nprobe / re-rank when the
  plan misses it); build wall time (tuning included), peak RSS, recall@10 on 1,000 held-out queries
  at the version's (tuned) search defaults, plain and re-ranked from the float16 vectors, and the
  re-ranked search time per query; index bytes;
- autofaiss (`pip install autofaiss`, in its own virtualenv --autofaiss-python, since it pins
  numpy<2): `autofaiss.build_index` on the same vectors with max_index_memory_usage = vitrine's index
  bytes and current_memory_available = --memory-budget; its own search parameters; same metrics.

Usage: python benchmarks/bench_index_build.py [--sizes 10000,100000] [--memory-budget 4GB]
Writes results/bench_index_build.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 256
QUERIES = 1000


def make_vectors(n: int, seed: int = 0) -> tuple:
    """(base (n, DIM), queries (QUERIES, DIM)) float32, clustered, L2-normalised, from one distribution."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = 4.0 * rng.standard_normal((max(10, n // 100), DIM)).astype(np.float32) / np.sqrt(DIM)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, DIM), dtype=np.float32)
        for start in range(0, count, 100_000):
            size = min(100_000, count - start)
            noise = rng.standard_normal((size, DIM), dtype=np.float32)
            x = centers[rng.integers(len(centers), size=size)] + 2.0 * noise / np.sqrt(DIM)
            out[start : start + size] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(QUERIES)


def child_vitrine(vectors_path: Path, out: Path, budget: int) -> dict:
    import numpy as np

    from indexer.build import build_index_from_vectors
    from indexer.version import open_version
    from model.catalog import Product

    xb = np.load(vectors_path, mmap_mode="r")
    products = [Product(product_id=str(i), title="", category="c", brand="", price=None, currency="", in_stock=True,
                        image_url="", attributes={}, split=None) for i in range(len(xb))]
    start = time.perf_counter()
    path = build_index_from_vectors(xb, products, out / "index", "0" * 64, out, memory_budget=budget,
                                    min_recall_at_10=0.95, validation_queries=256)  # the default gate, tuning on
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open_version(path) as version:
        index_bytes = sum((path / s["path"]).stat().st_size for s in version.manifest["shards"])
        return {"seconds": seconds, "peak_rss_bytes": peak, "factory": version.factory,
                "search_defaults": version.manifest["search_defaults"], "index_bytes": index_bytes,
                "vectors_f16_bytes": (path / "vectors.f16.npy").stat().st_size, "version": str(path),
                "validation": version.manifest.get("validation"),
                "memory_estimate": version.manifest.get("plan")}


AUTOFAISS_CHILD = """
import json, resource, sys, time
from autofaiss import build_index
src, out, max_mem, avail = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
start = time.perf_counter()
index, infos = build_index(embeddings=src, index_path=out + "/knn.index", index_infos_path=out + "/infos.json",
                           max_index_memory_usage=max_mem, current_memory_available=avail, metric_type="ip",
                           nb_cores=2, verbose=30)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "infos": infos}))
"""


def child_autofaiss(python: str, vectors_dir: Path, out: Path, max_index_bytes: int, budget: int) -> dict:
    sizes = [f"{max_index_bytes / 2**20:.0f}MB", f"{budget / 2**20:.0f}MB"]
    proc = subprocess.run([python, "-c", AUTOFAISS_CHILD, str(vectors_dir), str(out), *sizes], capture_output=True,
                          text=True, timeout=7200)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["index_bytes"] = (out / "knn.index").stat().st_size
    result["index_path"] = str(out / "knn.index")
    return result


def recalls(xb_path: Path, xq: object, vitrine: dict, autofaiss: dict) -> dict:
    import faiss
    import numpy as np

    from indexer.validate import exact_topk, recall_from_truth, rerank, search_reranked
    from indexer.version import open_version

    xb = np.load(xb_path, mmap_mode="r")
    xq = np.asarray(xq, dtype=np.float32)
    D_true, _ = exact_topk(xb, xq, 10)
    out = {}
    with open_version(vitrine["version"]) as version:
        _, I = version.search(xq, 10)  # noqa: E741
        out["vitrine_plain"] = recall_from_truth(D_true, xq, xb, I)
        start = time.perf_counter()
        _, I = search_reranked(version, xq, 10)  # noqa: E741
        out["vitrine_reranked_ms_per_query"] = 1000 * (time.perf_counter() - start) / len(xq)
        out["vitrine_reranked"] = recall_from_truth(D_true, xq, xb, I)
    if "index_path" in autofaiss:
        index = faiss.read_index(autofaiss["index_path"])
        params = autofaiss.get("infos", {}).get("index_param", "")
        if params:
            faiss.ParameterSpace().set_index_parameters(index, params)
        start = time.perf_counter()
        _, I = index.search(xq, 10)  # noqa: E741
        out["autofaiss_ms_per_query"] = 1000 * (time.perf_counter() - start) / len(xq)
        out["autofaiss"] = recall_from_truth(D_true, xq, xb, I)
        _, I = index.search(xq, 40)  # noqa: E741
        out["autofaiss_reranked"] = recall_from_truth(D_true, xq, xb, rerank(xb, xq, I, 10)[1])
    return out


def run_size(n: int, budget: int, autofaiss_python: str | None, work: Path) -> dict:
    import numpy as np

    xb, xq = make_vectors(n)
    (work / "emb").mkdir(parents=True)
    np.save(work / "emb" / "part0.npy", xb)
    del xb
    result: dict = {"n": n, "dim": DIM, "data": "clustered synthetic (n/100 Gaussian clusters)"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(work / "emb" / "part0.npy"), str(work / "v"),
                           str(budget)], capture_output=True, text=True, timeout=7200, env={**os.environ})
    if proc.returncode != 0:
        raise RuntimeError(f"vitrine build of {n} failed: {proc.stderr[-2000:]}")
    result["vitrine"] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["autofaiss"] = {"skipped": "no --autofaiss-python"}
    if autofaiss_python:
        (work / "a").mkdir()
        result["autofaiss"] = child_autofaiss(autofaiss_python, work / "emb", work / "a",
                                              result["vitrine"]["index_bytes"], budget)
    result["recall_at_10"] = recalls(work / "emb" / "part0.npy", xq, result["vitrine"], result["autofaiss"])
    print(json.dumps(result, default=str), flush=True)
    return result


def markdown_table(rows: list[dict], budget: int) -> str:
    mib = 2**20
    lines = [f"Clustered synthetic vectors, dim {DIM}, memory budget {budget / 2**30:.1f} GiB, 1,000 held-out "
             "queries, recall@10 vs exact search.", "",
             "| N | builder | index (search defaults) | build s | peak RSS MiB | index MiB | recall@10 "
             "| re-ranked recall@10 | ms/query |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v, a, rc = r["vitrine"], r["autofaiss"], r["recall_at_10"]
        sd = v["search_defaults"]
        tuned = " tuned" if (v.get("validation") or {}).get("tuning") else ""
        lines.append(f"| {r['n']:,} | vitrine | {v['factory']} (nprobe {sd.get('nprobe')}, re-rank "
                     f"x{sd.get('rerank_factor')}{tuned}) | {v['seconds']:.1f} | "
                     f"{v['peak_rss_bytes'] / mib:.0f} | {v['index_bytes'] / mib:.1f} "
                     f"(+{v['vectors_f16_bytes'] / mib:.0f} f16) | "
                     f"{rc['vitrine_plain']:.3f} | {rc['vitrine_reranked']:.3f} "
                     f"| {rc['vitrine_reranked_ms_per_query']:.2f} |")
        if "seconds" in a:
            key = f"{a['infos'].get('index_key', '?')} ({a['infos'].get('index_param', '')})"
            lines.append(f"| {r['n']:,} | autofaiss | {key} "
                         f"| {a['seconds']:.1f} | {a['peak_rss_bytes'] / mib:.0f} | {a['index_bytes'] / mib:.1f} | "
                         f"{rc.get('autofaiss', float('nan')):.3f} | "
                         f"{rc.get('autofaiss_reranked', float('nan')):.3f} "
                         f"| {rc.get('autofaiss_ms_per_query', float('nan')):.2f} |")
        else:
            lines.append(f"| {r['n']:,} | autofaiss | {str(a)[:80]} | | | | | | |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ns = [r["n"] for r in rows]
    left.plot(ns, [r["vitrine"]["seconds"] for r in rows], "o-", label="vitrine")
    auto = [(r["n"], r["autofaiss"]["seconds"]) for r in rows if "seconds" in r["autofaiss"]]
    if auto:
        left.plot([a[0] for a in auto], [a[1] for a in auto], "s--", label="autofaiss")
    left.set(xscale="log", yscale="log", xlabel="vectors (dim 256)", ylabel="build seconds (2 cores)")
    left.legend()
    right.plot(ns, [r["recall_at_10"]["vitrine_reranked"] for r in rows], "o-", label="vitrine (re-ranked)")
    right.plot(ns, [r["recall_at_10"]["vitrine_plain"] for r in rows], "o:", label="vitrine (no re-rank)")
    auto_r = [(r["n"], r["recall_at_10"]["autofaiss"]) for r in rows if "autofaiss" in r["recall_at_10"]]
    if auto_r:
        right.plot([a[0] for a in auto_r], [a[1] for a in auto_r], "s--", label="autofaiss")
    right.set(xscale="log", xlabel="vectors (dim 256)", ylabel="recall@10", ylim=(0, 1.02))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated vector counts")
    parser.add_argument("--memory-budget", default="4GB", help="budget given to both builders")
    parser.add_argument("--autofaiss-python", default=None, help="python of a virtualenv with autofaiss installed")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_vitrine(Path(args.child[0]), Path(args.child[1]), int(args.child[2])), default=str))
        return 0
    from benchmarks.common import RESULTS_DIR, write_result
    from indexer.plan import parse_bytes

    budget = parse_bytes(args.memory_budget)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            rows.append(run_size(n, budget, args.autofaiss_python, Path(tmp)))
    markdown = markdown_table(rows, budget)
    write_result("bench_index_build", {**vars(args), "dim": DIM, "queries": QUERIES}, {"rows": rows}, markdown)
    plot(rows, RESULTS_DIR / "bench_index_build.png")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
