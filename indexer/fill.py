"""Training the index on a sample and filling its shards, on Faiss GPU when present, else on the CPU.

- `train_index`: an empty index for a plan's factory string, trained on a seeded sample of rows (k-means
  of the coarse quantizer on the GPU when Faiss has GPUs; the CPU otherwise).
- `assign_shards`: shard of every row = sha1(product id) mod S, so a product stays in the same shard
  from build to build (stable under catalog growth and reordering; a shard server owns a fixed slice).
- `fill_shard`: one shard = a clone of the trained empty index (every shard shares the quantizer and
  codebooks), filled in chunks of rows read from a (memory-mapped) float16 or float32 matrix, so the
  add holds one shard plus one chunk in memory.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from indexer.plan import IndexPlan

logger = logging.getLogger("vitrine.indexer")


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


def fill_shard(trained: faiss.Index, vectors: np.ndarray, rows: np.ndarray, *, chunk: int = 65_536,
               use_gpu: bool | None = None) -> faiss.Index:
    """A clone of the trained index holding vectors[rows] under ids = rows, added `chunk` rows at a time."""
    shard = faiss.clone_index(trained)
    gpu = _to_gpu(shard) if (faiss_gpu_count() if use_gpu is None else use_gpu) else None
    target = gpu[0] if gpu else shard
    for start in range(0, len(rows), chunk):
        part = np.ascontiguousarray(rows[start : start + chunk], dtype=np.int64)
        target.add_with_ids(read_rows(vectors, part), part)
    return faiss.index_gpu_to_cpu(target) if gpu else shard


def fill_shards(trained: faiss.Index, vectors: np.ndarray, shard_numbers: np.ndarray, num_shards: int, *,
                chunk: int = 65_536, use_gpu: bool | None = None) -> list[faiss.Index]:
    """All shards in memory (small catalogs, incremental updates); the job fills and writes one at a time."""
    return [fill_shard(trained, vectors, np.flatnonzero(shard_numbers == s), chunk=chunk, use_gpu=use_gpu)
            for s in range(num_shards)]
