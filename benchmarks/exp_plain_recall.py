"""Experiment: vitrine's index *without* re-ranking at 1M vectors -- what does nprobe (and OPQ) buy?

`bench_autofaiss` compares vitrine's plain IVF-PQ search at its default nprobe against autofaiss at the same
index bytes. At 1M (session 14, 4 sqrt(N) lists) autofaiss's recall was higher (it probes many more lists,
with an OPQ rotation, and takes ~6x longer per query). This builds vitrine's 1M index of that benchmark again
(same synthetic vectors, same planner and budget) plus the same plan with an OPQ rotation, and measures plain
recall@10 and ms/query over a range of nprobe, so the two tools can be compared at equal query time too.

    python benchmarks/exp_plain_recall.py --n 1000000
    python benchmarks/exp_plain_recall.py --n 1000000 --factories "IVF16384_HNSW32,PQ64x8" --name plain_recall_ivf16k
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_autofaiss import K, load_vectors, placeholder_products  # noqa: E402
from benchmarks.common import write_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import faiss

    from indexer.build import build_index_from_vectors
    from indexer.plan import parse_bytes, plan_index
    from indexer.validate import exact_topk, recall_from_truth
    from indexer.version import open_version

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--memory-budget", default="4GB")
    parser.add_argument("--nprobes", default="16,32,64,128,256,512,1024")
    parser.add_argument("--factories", default="planned;planned+opq",
                        help="';'-separated indices to build: planned (the planner's choice under the budget), "
                             "planned+opq (the same with an OPQ rotation) or a Faiss factory string")
    parser.add_argument("--name", default="plain_recall", help="results/<name>.{json,md}")
    parser.add_argument("--work-dir", default=str(REPO / "work" / "exp_plain_recall"))
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(2)
    xb, xq, data = load_vectors(args.n, None)
    D_true, _ = exact_topk(xb, xq, K)
    products = placeholder_products(len(xb))
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    planned = plan_index(len(xb), xb.shape[1], memory_budget=parse_bytes(args.memory_budget))  # as the build plans
    for number, label in enumerate(f.strip() for f in args.factories.split(";") if f.strip()):
        factory = {"planned": None, "planned+opq": f"OPQ{planned.pq_m},{planned.factory}"}.get(label, label)
        start = time.perf_counter()
        path = build_index_from_vectors(xb, products, work / f"v{number}", "0" * 64, work, factory,
                                        memory_budget=parse_bytes(args.memory_budget), min_recall_at_10=0.0,
                                        validation_queries=256, publish=False)
        seconds = time.perf_counter() - start
        with open_version(path) as version:
            index_bytes = sum((path / s["path"]).stat().st_size for s in version.manifest["shards"])
            for nprobe in (int(v) for v in args.nprobes.split(",")):
                version.search(xq[:50], K, nprobe)  # warm-up
                start = time.perf_counter()
                _, found = version.search(xq, K, nprobe)
                ms = 1000 * (time.perf_counter() - start) / len(xq)
                recall = recall_from_truth(D_true, xq, xb, found)
                rows.append({"index": label, "factory": version.factory, "build_s": round(seconds, 1),
                             "index_mib": round(index_bytes / 2**20, 1), "nprobe": nprobe,
                             "recall_at_10": round(recall, 4), "ms_per_query": round(ms, 3)})
                print(f"{version.factory} (build {seconds:.0f} s, {index_bytes / 2**20:.1f} MiB) nprobe {nprobe}: "
                      f"recall@10 {recall:.3f}, {ms:.3f} ms/query", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    lines = [f"{args.n:,} vectors ({data}), {len(xq)} held-out queries, plain search (no re-rank), 2 threads.", "",
             "| index | build s | index MiB | nprobe | recall@10 | ms/query |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['factory']} | {r['build_s']} | {r['index_mib']} | {r['nprobe']} | {r['recall_at_10']:.3f} | "
              f"{r['ms_per_query']:.3f} |" for r in rows]
    write_result(args.name, vars(args), {"rows": rows}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
