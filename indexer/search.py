"""Search across the Faiss shards of one index version and merge their results by score.

The metric is inner product (higher is better). Per-request search parameters travel with the
call as ``faiss.SearchParametersIVF(nprobe=...)``; shared index state (``index.nprobe``) is never
mutated, so concurrent requests with different nprobe values are safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np


def search_params(index: faiss.Index, nprobe: int | None) -> faiss.SearchParameters | None:
    """Per-call parameters for `index`: nprobe (clamped to [1, nlist]) for IVF indices, else None.

    Works for bare IVF indices and IVF indices wrapped in IndexIDMap (Faiss forwards the params).
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or nprobe is None:
        return None
    params = faiss.SearchParametersIVF()
    params.nprobe = int(min(max(1, nprobe), ivf.nlist))
    return params


def merge_topk(D_parts: Sequence[np.ndarray], I_parts: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (nq, k_i) results into the overall top k by score.

    Missing results (id -1) sort last and come back as (score -inf, id -1). Ties keep shard order.
    """
    D = np.concatenate([np.asarray(d, dtype=np.float32) for d in D_parts], axis=1)
    I = np.concatenate([np.asarray(i, dtype=np.int64) for i in I_parts], axis=1)  # noqa: E741
    D = np.where(I < 0, np.float32(-np.inf), D)
    if D.shape[1] < k:
        pad = k - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)  # noqa: E741
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def check_queries(xq: np.ndarray, dim: int) -> np.ndarray:
    """Queries as a C-contiguous float32 (nq, dim) array; ValueError saying what is wrong otherwise."""
    xq = np.asarray(xq)
    if xq.ndim == 1:
        xq = xq[None, :]
    if xq.ndim != 2 or xq.shape[1] != dim:
        raise ValueError(f"query vectors must have shape (nq, {dim}), got {xq.shape}")
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    if not np.isfinite(xq).all():
        raise ValueError("query vectors contain NaN or infinite values")
    return xq


def search_shards(
    shards: Sequence[faiss.Index], xq: np.ndarray, k: int, nprobe: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, internal ids) of queries `xq` over all shards; shapes (nq, k), float32 / int64."""
    if not shards:
        raise ValueError("search_shards needs at least one shard")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    xq = check_queries(xq, shards[0].d)
    D_parts, I_parts = [], []
    for index in shards:
        if index.ntotal == 0:
            continue
        D, I = index.search(xq, k, params=search_params(index, nprobe))  # noqa: E741
        D_parts.append(D)
        I_parts.append(I)
    if not D_parts:
        return np.full((xq.shape[0], k), -np.inf, dtype=np.float32), np.full((xq.shape[0], k), -1, dtype=np.int64)
    return merge_topk(D_parts, I_parts, k)
