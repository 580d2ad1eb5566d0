"""Experiment (session 15): where does a CPU add to a 16,384-list index spend its time, and what is faster?

On the 1M clustered synthetic vectors of `bench_autofaiss`: trains the planned index (two-level k-means + PQ,
`indexer.fill.train_index`), then assigns the first 65,536 vectors to their nearest list four ways and prints
seconds and the share of exact lists: Faiss's exact flat search (its wheel's bundled OpenBLAS), numpy products
(`indexer.fill.CoarseAssigner`, what the add uses), and an HNSW graph over the centroids at efSearch 16/32/64;
then the time of a whole 1M-vector CPU add through `fill_shard`. It also prints which BLAS each library loaded.
Run it a second time with ``OPENBLAS_CORETYPE=SkylakeX`` (AVX-512 CPUs only) to see Faiss's BLAS with the right
kernels.

    python benchmarks/exp_coarse_assign.py
    OPENBLAS_CORETYPE=SkylakeX python benchmarks/exp_coarse_assign.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import faiss
    import numpy as np
    import threadpoolctl

    from benchmarks.bench_autofaiss import load_vectors
    from indexer import fill
    from indexer.plan import plan_index

    faiss.omp_set_num_threads(2)
    for info in threadpoolctl.threadpool_info():
        if info["user_api"] == "blas":
            print(f"BLAS {info['filepath'].split('/')[-1]}: {info['version']}, {info['architecture']}")
    xb, _, _ = load_vectors(1_000_000, None)
    plan = plan_index(len(xb), xb.shape[1])
    start = time.perf_counter()
    trained = fill.train_index(xb, plan, 0, use_gpu=False)
    print(f"train {plan.factory} on {plan.train_size:,} vectors: {time.perf_counter() - start:.1f} s")
    x = np.ascontiguousarray(xb[:65536])
    quantizer = faiss.extract_index_ivf(trained).quantizer
    start = time.perf_counter()
    exact = quantizer.search(x, 1)[1].ravel()
    print(f"assign 65,536 x {plan.nlist:,}: Faiss exact {time.perf_counter() - start:.2f} s")
    assigner = fill.CoarseAssigner(trained)
    start = time.perf_counter()
    lists = assigner.lists(x)
    print(f"assign 65,536 x {plan.nlist:,}: numpy {time.perf_counter() - start:.2f} s, "
          f"{np.mean(lists == exact):.4f} of Faiss's lists")
    graph = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 64
    graph.add(quantizer.reconstruct_n(0, plan.nlist))
    for ef in (16, 32, 64):
        graph.hnsw.efSearch = ef
        start = time.perf_counter()
        found = graph.search(x, 1)[1].ravel()
        print(f"assign 65,536 x {plan.nlist:,}: HNSW efSearch {ef} {time.perf_counter() - start:.2f} s, "
              f"{np.mean(found == exact):.4f} of the exact lists")
    start = time.perf_counter()
    shard = fill.fill_shard(trained, xb, np.arange(len(xb)), use_gpu=False, assigner=assigner)
    print(f"add {shard.ntotal:,} vectors (numpy assignment): {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
