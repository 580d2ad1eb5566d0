"""Training the index on a sample and filling its shards, on Faiss GPU when present, else on the CPU.

- `train_index`: an empty index for a plan's factory string, trained on a seeded sample of rows (k-means
  of the coarse quantizer on the GPU when Faiss has GPUs; the CPU otherwise). From `TWO_LEVEL_MIN_NLIST`
  lists the coarse k-means is two-level (`two_level_centroids`): sqrt(nlist) clusters first, then each
  cluster split into its share of the lists, which costs ~2 sqrt(nlist) distance computations per training
  vector and iteration instead of nlist (16,384 lists on 1M vectors: 27 s of k-means on 2 cores, where the whole
  build with one-level k-means took 640 s, and no lower recall: `benchmarks/exp_two_level_kmeans.py`).
- `CoarseAssigner`: on the CPU, the add's nearest-list search for fine quantizers by numpy's BLAS.
- `assign_shards`: shard of every row = sha1(product id) mod S, so a product stays in the same shard
  from build to build (stable under catalog growth and reordering; a shard server owns a fixed slice).
- `fill_shard`: one shard = a clone of the trained empty index (every shard shares the quantizer and
  codebooks), filled in chunks of rows read from a (memory-mapped) float16 or float32 matrix, so the
  add holds one shard plus one chunk in memory.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from indexer.plan import IndexPlan

logger = logging.getLogger("vitrine.indexer")

TWO_LEVEL_MIN_NLIST = 2048  # coarse quantizers with at least this many lists are trained two-level
KMEANS_NITER = 10  # k-means iterations of a coarse quantizer (Faiss's own default for IVF training)
FAST_ASSIGN_MIN_NLIST = 4096  # CPU adds to flat quantizers with this many lists assign by numpy (CoarseAssigner)


def faiss_gpu_count() -> int:
    """GPUs Faiss can use: 0 when this Faiss is a CPU build (no get_num_gpus / GPU classes) or sees none."""
    get = getattr(faiss, "get_num_gpus", None)
    if get is None or not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "index_cpu_to_gpu"):
        return 0
    try:
        return int(get())
    except RuntimeError:
        return 0


def shard_of(product_id: str, num_shards: int) -> int:
    """Stable shard of a product id: the first 8 bytes of sha1(utf-8 id), big-endian, mod num_shards."""
    return int.from_bytes(hashlib.sha1(product_id.encode("utf-8")).digest()[:8], "big") % num_shards


def assign_shards(product_ids: Sequence[str], num_shards: int) -> np.ndarray:
    """int32 shard number of every row (see shard_of)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return np.fromiter((shard_of(pid, num_shards) for pid in product_ids), dtype=np.int32, count=len(product_ids))


def _prepare(index: faiss.Index, seed: int) -> Any:
    """Seed k-means and PQ training, switch polysemous training off; returns the IVF part (or None)."""
    base_ivf = faiss.try_extract_index_ivf(index)
    ivf: Any = None if base_ivf is None else faiss.downcast_index(base_ivf)  # IndexIVFPQ, not IndexIVF: reach .pq
    if ivf is not None:
        ivf.cp.seed = seed
    for part in (ivf, index):
        if part is not None and hasattr(part, "do_polysemous_training"):
            # Polysemous codes only help Hamming-filtered search, which we do not use; its training is
            # simulated annealing that costs far more than the PQ k-means itself.
            part.do_polysemous_training = False
        if part is not None and hasattr(part, "pq"):
            part.pq.cp.seed = seed
    return ivf


def sample_rows(n: int, size: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Sorted seeded sample of `size` row numbers in 0..n-1, avoiding `exclude` (e.g. validation queries)."""
    pool = np.arange(n, dtype=np.int64) if exclude is None else np.setdiff1d(np.arange(n, dtype=np.int64), exclude)
    size = min(size, len(pool))
    return np.sort(np.random.default_rng(seed).choice(pool, size=size, replace=False))


def read_rows(vectors: np.ndarray, rows: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """float32 copy of vectors[rows] (rows sorted), read in chunks from a memory map."""
    out = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        out[start : start + chunk] = vectors[rows[start : start + chunk]]
    return out


def _kmeans(x: np.ndarray, k: int, seed: int, gpu: bool, *, max_points_per_centroid: int = 256,
            min_points_per_centroid: int = 39) -> np.ndarray:
    """float32 (k, d) k-means centroids of x, not normalised (Faiss's IVF default is spherical for inner product;
    on 100k clustered unit vectors with 2,048 lists plain PQ recall@10 was 0.609 with mean centroids, 0.599
    with normalised ones: the mean leaves the PQ codes smaller residuals)."""
    if k >= len(x):  # as many lists as points (possible with a user's factory string): the points are the centroids
        return np.ascontiguousarray(x[:k], dtype=np.float32)
    params = faiss.ClusteringParameters()
    params.niter, params.seed = KMEANS_NITER, seed
    params.max_points_per_centroid, params.min_points_per_centroid = max_points_per_centroid, min_points_per_centroid
    clustering = faiss.Clustering(x.shape[1], k, params)
    index = faiss.IndexFlatL2(x.shape[1])
    clustering.train(np.ascontiguousarray(x, dtype=np.float32), faiss.index_cpu_to_all_gpus(index) if gpu else index)
    return faiss.vector_float_to_array(clustering.centroids).reshape(k, x.shape[1])


def split_lists(counts: np.ndarray, nlist: int) -> np.ndarray:
    """Lists per first-level cluster: proportional to its points (largest remainders), at most its points."""
    share = counts * (nlist / max(int(counts.sum()), 1))
    lists = np.minimum(np.floor(share).astype(np.int64), counts)
    while lists.sum() < nlist:  # hand the rest out by the largest remainder among clusters with spare points
        spare = np.where(lists < counts, share - lists, -np.inf)
        lists[int(np.argmax(spare))] += 1
    return lists


def two_level_centroids(x: np.ndarray, nlist: int, seed: int = 0, *, gpu: bool = False) -> np.ndarray:
    """nlist k-means centroids of x (float32, n >= nlist) by two-level clustering (Faiss contrib's scheme).

    First round(sqrt(nlist)) centroids on x, then each first-level cluster clustered into its share of
    the nlist lists (`split_lists`). Cost per iteration ~ n * 2 sqrt(nlist) distances instead of n * nlist.
    """
    if nlist > len(x):
        raise ValueError(f"{nlist} lists need at least as many training vectors, got {len(x)}")
    top_k = max(1, round(math.sqrt(nlist)))
    top = _kmeans(x, top_k, seed, gpu, max_points_per_centroid=2000)
    assign = _assign(x, top)
    counts = np.bincount(assign, minlength=top_k)
    lists = split_lists(counts, nlist)
    order = np.argsort(assign, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    parts = [_kmeans(x[order[bounds[g]:bounds[g + 1]]], int(lists[g]), seed + 1 + g, gpu, min_points_per_centroid=1)
             for g in range(top_k) if lists[g]]
    return np.ascontiguousarray(np.vstack(parts), dtype=np.float32)


def _assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (L2, as the k-means that made them) of every row of x, by a Faiss flat search."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    return index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1].ravel()


def _train_two_level(index: faiss.Index, ivf: Any, sample: np.ndarray, seed: int, gpus: int) -> str | None:
    """Train index with a two-level coarse k-means; None (untouched) when its quantizer is not a flat one."""
    quantizer = faiss.downcast_index(ivf.quantizer)
    if not isinstance(quantizer, (faiss.IndexFlat, faiss.IndexHNSWFlat)) or quantizer.ntotal:
        return None
    x = sample
    if isinstance(index, faiss.IndexPreTransform):  # e.g. an OPQ rotation: trained first, the lists live after it
        chain: Any = index.chain  # a C++ vector of transforms (typed as a list by the stubs)
        for i in range(chain.size()):
            transform = chain.at(i)
            transform.train(x)
            x = transform.apply(x)
    device = "cpu"
    centroids = None
    if gpus:
        try:
            centroids = two_level_centroids(x, ivf.nlist, seed, gpu=True)
            device = f"{gpus} GPU(s)"
        except (RuntimeError, AttributeError, TypeError) as exc:
            logger.warning("Faiss GPU clustering unavailable (%s); training on the CPU", exc)
    if centroids is None:
        centroids = two_level_centroids(x, ivf.nlist, seed)
    quantizer.add(centroids)
    ivf.train(x)  # the quantizer is full: Faiss trains only the codes (PQ on the residuals)
    index.is_trained = True
    return f"{device}, two-level k-means"


def train_index(vectors: np.ndarray, plan: IndexPlan, seed: int = 0, *, exclude: np.ndarray | None = None,
                use_gpu: bool | None = None) -> faiss.Index:
    """An empty index for `plan.factory` trained on a seeded sample of plan.train_size rows of `vectors`.

    `vectors` may be a float16 memory map: only the sample is read. With use_gpu (default: when Faiss
    has GPUs) the coarse k-means runs on all GPUs; any GPU failure falls back to the CPU, logged.
    """
    dim = vectors.shape[1]
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = _prepare(index, seed)
    if index.is_trained:
        return index
    sample = read_rows(vectors, sample_rows(len(vectors), plan.train_size or len(vectors), seed, exclude))
    gpus = faiss_gpu_count() if use_gpu is None else (faiss_gpu_count() if use_gpu else 0)
    start = time.perf_counter()
    if ivf is not None and ivf.nlist >= TWO_LEVEL_MIN_NLIST:
        how = _train_two_level(index, ivf, sample, seed, gpus)
        if how is not None:
            logger.info("trained %s on %d vectors (%s) in %.1f s", plan.factory, len(sample), how,
                        time.perf_counter() - start)
            return index
    device = "cpu"
    if gpus and ivf is not None:
        try:
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
            device = f"{gpus} GPU(s)"
        except (RuntimeError, AttributeError) as exc:  # a CPU-only build or an unusable device
            logger.warning("Faiss GPU clustering unavailable (%s); training on the CPU", exc)
    index.train(sample)
    if ivf is not None and device != "cpu":
        ivf.clustering_index = None  # never serialise the GPU helper
    logger.info("trained %s on %d vectors (%s) in %.1f s", plan.factory, len(sample), device,
                time.perf_counter() - start)
    return index


def _to_gpu(index: faiss.Index) -> tuple[faiss.Index, Any] | None:
    """(GPU copy of index, its resources), or None (logged) when this index or Faiss cannot go to the GPU."""
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), resources
    except (RuntimeError, AttributeError) as exc:
        logger.warning("adding on the CPU: %s cannot move to the GPU (%s)", type(index).__name__, exc)
        return None


class CoarseAssigner:
    """Assigns vectors to the inverted lists of a fine flat quantizer by numpy matrix products, in blocks.

    Adding to an IVF index first finds each vector's nearest centroid: nlist * dim multiply-adds per vector,
    which at 16,384 lists is most of a CPU add. Faiss computes it with the OpenBLAS its wheel bundles (0.3.15),
    which does not recognise recent Xeons and falls back to generic kernels ("Prescott"); numpy's OpenBLAS
    runs the same products 3.6x faster there (65,536 vectors against 16,384 centroids: 19.7 s in Faiss, 5.4 s
    here, on 2 cores; `benchmarks/exp_coarse_assign.py`). The lists are the exact nearest centroids (as Faiss's,
    up to float rounding), so the index and its searches are unchanged; the GPU path does not use this.
    """

    def __init__(self, trained: faiss.Index) -> None:
        ivf = faiss.extract_index_ivf(trained)
        quantizer = faiss.downcast_index(ivf.quantizer)
        self.centroids_t = np.ascontiguousarray(quantizer.reconstruct_n(0, ivf.nlist).T)  # (dim, nlist)
        # inner product: the largest x.c; L2: the smallest |x - c|^2, i.e. the largest x.c - |c|^2 / 2
        self.bias = (np.zeros(ivf.nlist, dtype=np.float32) if quantizer.metric_type == faiss.METRIC_INNER_PRODUCT
                     else -0.5 * (self.centroids_t**2).sum(axis=0))
        self.block = max(1, 2**24 // ivf.nlist)  # rows per product: a 64 MiB score block
        chain: Any = trained.chain if isinstance(trained, faiss.IndexPreTransform) else None
        self.transforms = [chain.at(i) for i in range(chain.size())] if chain is not None else []

    def lists(self, x: np.ndarray) -> np.ndarray:
        """int64 nearest list of every row of x (already transformed)."""
        out = np.empty(len(x), dtype=np.int64)
        for start in range(0, len(x), self.block):
            scores = x[start : start + self.block] @ self.centroids_t
            scores += self.bias
            out[start : start + self.block] = np.argmax(scores, axis=1)
        return out

    @classmethod
    def for_index(cls, trained: faiss.Index) -> CoarseAssigner | None:
        """The assigner of `trained` when a CPU add to it assigns by numpy (see `applies`), else None."""
        return cls(trained) if cls.applies(trained) else None

    @staticmethod
    def applies(trained: faiss.Index) -> bool:
        """A CPU add to this index assigns by numpy (a flat quantizer of at least FAST_ASSIGN_MIN_NLIST lists)."""
        ivf = faiss.try_extract_index_ivf(trained)
        if ivf is None or ivf.nlist < FAST_ASSIGN_MIN_NLIST:
            return False
        return type(faiss.downcast_index(ivf.quantizer)) in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2)

    def add(self, shard: faiss.Index, x: np.ndarray, ids: np.ndarray) -> None:
        """shard.add_with_ids(x, ids), with the lists chosen here."""
        for transform in self.transforms:  # e.g. an OPQ rotation: the lists live after it
            x = transform.apply(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        lists = self.lists(x)
        ivf = faiss.extract_index_ivf(shard)
        ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        shard.ntotal = ivf.ntotal  # an IndexPreTransform counts what its inner index holds


def fill_shard(trained: faiss.Index, vectors: np.ndarray, rows: np.ndarray, *, chunk: int = 65_536,
               use_gpu: bool | None = None, assigner: CoarseAssigner | None = None) -> faiss.Index:
    """A clone of the trained index holding vectors[rows] under ids = rows, added `chunk` rows at a time.

    On the CPU a fine flat quantizer's lists are chosen by a `CoarseAssigner` (built here unless one for
    `trained` is given, e.g. shared by the shards of one build).
    """
    shard = faiss.clone_index(trained)
    gpu = _to_gpu(shard) if (faiss_gpu_count() if use_gpu is None else use_gpu) else None
    target = gpu[0] if gpu else shard
    if gpu is None and assigner is None:
        assigner = CoarseAssigner.for_index(trained)
    for start in range(0, len(rows), chunk):
        part = np.ascontiguousarray(rows[start : start + chunk], dtype=np.int64)
        if gpu is None and assigner is not None:
            assigner.add(shard, read_rows(vectors, part), part)
        else:
            target.add_with_ids(read_rows(vectors, part), part)
    return faiss.index_gpu_to_cpu(target) if gpu else shard


def fill_shards(trained: faiss.Index, vectors: np.ndarray, shard_numbers: np.ndarray, num_shards: int, *,
                chunk: int = 65_536, use_gpu: bool | None = None) -> list[faiss.Index]:
    """All shards in memory (small catalogs, incremental updates); the job fills and writes one at a time."""
    assigner = CoarseAssigner.for_index(trained)
    return [fill_shard(trained, vectors, np.flatnonzero(shard_numbers == s), chunk=chunk, use_gpu=use_gpu,
                       assigner=assigner) for s in range(num_shards)]
