"""Filter-aware probing of IVF shards: per query, probe lists until enough *passing* vectors were seen.

A fixed nprobe fails filters that are correlated with the embedding (a category lives in a few
regions of the space): the lists nearest to the query may hold no passing vector at all, while
the nearest passing vectors sit in lists ranked 50th or 100th. Here each query ranks every list by
its centroid (one small quantizer search), counts the passing vectors per list (cached per
filter), and probes lists in order until it has seen `target` passing vectors, where

    target = nprobe * (count / nlist) * sqrt(selectivity)   (at least `min_seen`)

i.e. about as many passing vectors as an unfiltered search with `nprobe` sees vectors, discounted
by sqrt(selectivity) (a random 10% filter then probes ~3.2x the lists; a clustered one goes as far
as it must). Lists beyond a query's own count are passed as -1 (Faiss skips them), so one
`search_preassigned` call serves a batch of queries with different probe counts.

Needs every shard to be a bare IVF index (ids stored in the lists, as indexer.build writes them)
sharing one coarse quantizer; otherwise `ListProber.create` returns None and callers fall back to
a uniform nprobe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import faiss
import numpy as np

MIN_SEEN_FACTOR = 8  # at least this many passing vectors seen per wanted candidate


class ListProber:
    """Per-query probe counts from the passing vectors per inverted list (see the module docstring)."""

    def __init__(self, ivfs: list[Any], list_of_id: np.ndarray) -> None:
        self.ivfs = ivfs
        self.quantizer = ivfs[0].quantizer
        self.nlist = int(ivfs[0].nlist)
        self.list_of_id = list_of_id  # int32 list number of every internal id (-1: in no list)

    @classmethod
    def create(cls, shards: Sequence[faiss.Index], count: int,
               other_shards: Iterable[faiss.Index] = ()) -> ListProber | None:
        """A prober over bare IVF shards with one shared quantizer; None when that does not hold.

        `other_shards` are the version's shards searched elsewhere (remote shard servers): they are
        read one at a time only for the list of every id, so passing vectors are counted over the
        whole version and every shard server probes the same lists for a query.
        """
        ivfs: list[Any] = [faiss.downcast_index(shard) for shard in shards]
        if not ivfs or not all(isinstance(ivf, faiss.IndexIVF) for ivf in ivfs):
            return None
        nlist = ivfs[0].nlist
        centroids = ivfs[0].quantizer.reconstruct_n(0, nlist)

        def same_lists(ivf: Any) -> bool:
            return (isinstance(ivf, faiss.IndexIVF) and ivf.nlist == nlist
                    and np.array_equal(ivf.quantizer.reconstruct_n(0, nlist), centroids))

        if not all(map(same_lists, ivfs[1:])):
            return None
        list_of_id = np.full(count, -1, dtype=np.int32)
        for ivf in ivfs:
            record_lists(ivf, list_of_id)
        for shard in other_shards:
            other = faiss.downcast_index(shard)
            if not same_lists(other):
                return None
            record_lists(other, list_of_id)
        return cls(ivfs, list_of_id)

    def passing_per_list(self, mask: np.ndarray) -> np.ndarray:
        """(nlist,) number of passing vectors in each list (over all shards)."""
        lists = self.list_of_id[mask]
        return np.bincount(lists[lists >= 0], minlength=self.nlist)

    def probe_counts(self, order: np.ndarray, list_passing: np.ndarray, target: float, nprobe: int) -> np.ndarray:
        """(nq,) lists to probe per query: the fewest (>= nprobe) whose passing vectors reach `target`."""
        seen = np.cumsum(list_passing[order], axis=1)
        needed = (seen < target).sum(axis=1) + 1
        return np.clip(needed, min(nprobe, self.nlist), self.nlist)

    def search(self, xq: np.ndarray, k: int, nprobe: int, list_passing: np.ndarray, selectivity: float,
               selector: faiss.IDSelector | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-shard (D, I) of xq, each query probing its own number of lists (filtered by `selector`)."""
        count = len(self.list_of_id)
        target = max(nprobe * count / self.nlist * math.sqrt(selectivity), MIN_SEEN_FACTOR * k)
        Dq, Iq = self.quantizer.search(xq, self.nlist)
        probes = self.probe_counts(Iq, list_passing, target, nprobe)
        width = int(probes.max())
        Iq = Iq[:, :width].copy()
        Iq[np.arange(width)[None, :] >= probes[:, None]] = -1  # lists past a query's count are skipped
        Dq = np.ascontiguousarray(Dq[:, :width])
        params = faiss.SearchParametersIVF()
        params.nprobe = width
        if selector is not None:
            params.sel = selector
        return [search_preassigned(ivf, xq, k, Iq, Dq, params) for ivf in self.ivfs]


def record_lists(ivf: Any, list_of_id: np.ndarray) -> None:
    """Write into `list_of_id` the inverted list number of every id stored in `ivf`."""
    invlists, count = ivf.invlists, len(list_of_id)
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size)
            list_of_id[ids[(ids >= 0) & (ids < count)]] = lst


def search_preassigned(ivf: Any, xq: np.ndarray, k: int, Iq: np.ndarray, Dq: np.ndarray,
                       params: faiss.SearchParametersIVF) -> tuple[np.ndarray, np.ndarray]:
    """IndexIVF.search_preassigned with search parameters (the Python wrapper refuses params)."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    Iq = np.ascontiguousarray(Iq, dtype=np.int64)
    n = xq.shape[0]
    D = np.empty((n, k), dtype=np.float32)
    I = np.empty((n, k), dtype=np.int64)  # noqa: E741
    ivf.search_preassigned_c(n, faiss.swig_ptr(xq), k, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq), faiss.swig_ptr(D),
                             faiss.swig_ptr(I), False, params)
    return D, I
