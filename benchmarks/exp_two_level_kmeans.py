"""Experiment (session 15): is a fine coarse quantizer trained by two-level k-means as good as one-level?

Builds IVF-PQ indexes by hand on the clustered synthetic vectors of `bench_autofaiss` and prints build time
per step, index MiB and plain recall@10 (no re-rank) at nprobe 32-256. Each variant is
"<OPQ m or 0>,<nlist>,<PQ m>,<mode>": mode ``km`` one-level spherical k-means (Faiss's IVF default for inner
product), ``2l`` two-level spherical, ``2lf`` two-level with mean (not normalised) centroids. The coarse
quantizer here is an HNSW graph over the centroids (as autofaiss's), the PQ is trained on 65,536 residuals.

    python benchmarks/exp_two_level_kmeans.py 100000 "0,4096,64,2l;0,4096,64,km"
    python benchmarks/exp_two_level_kmeans.py 100000 "0,2048,64,2lf;0,2048,64,2l"
    python benchmarks/exp_two_level_kmeans.py 1000000 "0,16384,64,2l;64,16384,64,2l"

What its first, unrefactored version (the same steps) printed (2 threads): 100k, 4,096 lists: two-level 0.600
(k-means 2 s) vs one-level 0.597 (43 s); 100k, 2,048 lists: mean centroids 0.609 vs normalised 0.599; 100k, 1,024
lists two-level 0.544; 1M, 16,384 lists: two-level 0.570 (k-means 27 s, add 35 s), with OPQ64 0.574 (OPQ training
142 s). Recall did not change with nprobe in any of them (the PQ codes are the limit).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    import faiss
    import numpy as np
    from faiss.contrib.clustering import two_level_clustering

    from benchmarks.bench_autofaiss import K, load_vectors
    from indexer.validate import exact_topk, recall_from_truth

    faiss.omp_set_num_threads(2)
    n, variants = int(argv[0]), argv[1].split(";")
    xb, xq, _ = load_vectors(n, None)
    D_true, _ = exact_topk(xb, xq, K)
    rng = np.random.default_rng(0)
    for variant in variants:
        opq_text, nlist_text, m_text, mode = variant.split(",")
        opq_m, nlist, m = int(opq_text), int(nlist_text), int(m_text)
        t0 = time.perf_counter()
        train = xb[np.sort(rng.choice(len(xb), size=min(len(xb), 64 * nlist), replace=False))]
        chain, xt = None, train
        if opq_m:
            chain = faiss.OPQMatrix(xb.shape[1], opq_m)
            chain.train(np.ascontiguousarray(train[:65536]))
            xt = chain.apply(train)
        t1 = time.perf_counter()
        if mode in ("2l", "2lf"):
            centroids = two_level_clustering(xt, int(np.sqrt(nlist)), nlist, clustering_niter=10,
                                             spherical=(mode == "2l"), seed=0)[0]
        else:
            km = faiss.Kmeans(xt.shape[1], nlist, niter=10, spherical=True, seed=0)
            km.train(xt)
            centroids = km.centroids
        t2 = time.perf_counter()
        quantizer = faiss.IndexHNSWFlat(xb.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        quantizer.add(centroids)
        ivf = faiss.IndexIVFPQ(quantizer, xb.shape[1], nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        ivf.do_polysemous_training = False
        ivf.pq.cp.seed = 0
        ivf.train(xt[: max(65536, 39 * 256)])
        index = faiss.IndexPreTransform(chain, ivf) if chain else ivf
        index.is_trained = True
        t3 = time.perf_counter()
        for start in range(0, len(xb), 65536):
            index.add(xb[start : start + 65536])
        t4 = time.perf_counter()
        with tempfile.NamedTemporaryFile() as f:
            faiss.write_index(index, f.name)
            mib = os.path.getsize(f.name) / 2**20
        print(f"{variant}: opq {t1 - t0:.0f}s kmeans {t2 - t1:.0f}s pq {t3 - t2:.0f}s add {t4 - t3:.0f}s "
              f"total {t4 - t0:.0f}s {mib:.1f} MiB", flush=True)
        quantizer.hnsw.efSearch = 128
        for nprobe in (32, 64, 128, 256):
            ivf.nprobe = nprobe
            start = time.perf_counter()
            _, found = index.search(xq, K)
            ms = 1000 * (time.perf_counter() - start) / len(xq)
            print(f"   nprobe {nprobe}: recall@10 {recall_from_truth(D_true, xq, xb, found):.3f}, {ms:.2f} ms/query",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
