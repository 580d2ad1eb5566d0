"""Candidate generation over one index version: filters pushed into Faiss, shard fan-out and merge.

A filter becomes a `FilterPlan` once per (version, filter) and is cached: the boolean mask over
internal ids from the version's filter columns (filters.npz), and then either

- the passing ids themselves when they are few (at most `exact_max`): the query is scored exactly
  against their stored float16 vectors, which is both cheaper and exact for very selective filters;
- or a Faiss `IDSelectorBitmap` handed to every shard in `SearchParametersIVF(sel=...)`, so Faiss
  only returns passing vectors (pre-filtering: no candidates wasted on products that fail).

With a selector, the nearest passing vectors lie farther out than the nearest vectors overall, so
each query probes lists until it has seen enough *passing* vectors (engine.probing: per-query probe
counts from the passing vectors per list). Shards that do not allow that (IVF inside an IDMap)
use a uniform nprobe grown with the selectivity (`nprobe_for`), doubled while the probed lists hold
fewer than k passing vectors, up to every list (then the result is complete).

Threads: a request thread runs its Faiss calls on `faiss_threads` OpenMP threads (1 in a server:
concurrent requests use the cores). A call for at least BATCH_PARALLEL_MIN queries at once (a
BatchSearch, or concurrent requests grouped) uses `batch_threads`, so one big batch is not held
to one core. OpenMP's thread count is per calling thread, so this never changes another request's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence

import faiss
import numpy as np

from engine.probing import ListProber
from engine.types import SearchFilter, ShardPart
from indexer.version import Filters, IndexVersion

EXACT_MAX = 20_000  # passing products at or below which a filtered query is scored exactly (no Faiss)
NPROBE_EXPONENT = 0.5  # nprobe grows as selectivity ** -NPROBE_EXPONENT under a filter
PLAN_CACHE_SIZE = 16  # filter plans kept per version (a bitmap: 1 bit per vector; exact: <= exact_max vectors)
BATCH_PARALLEL_MIN = 8  # queries in one Faiss call from which it runs on batch_threads OpenMP threads


@contextlib.contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """Faiss calls made by this thread inside the block use `n` OpenMP threads (a per-thread setting)."""
    before = faiss.omp_get_max_threads()
    if n <= 0 or n == before:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def filter_mask(filters: Filters, ids: np.ndarray | None, search_filter: SearchFilter) -> np.ndarray:
    """Boolean mask of the internal ids `ids` (None: every row) that pass `search_filter`.

    Prices compare as float32 (the column's precision), so a bound equal to a stored price matches;
    products with an unknown price (NaN) never pass a set price bound. Unknown categories or brands
    match nothing.
    """
    def column(values: np.ndarray) -> np.ndarray:
        return values if ids is None else values[ids]

    mask = np.ones(len(filters) if ids is None else len(ids), dtype=bool)
    if search_filter.categories:
        codes = [c for c in map(filters.category_code, search_filter.categories) if c is not None]
        mask &= np.isin(column(filters.category), np.asarray(codes, dtype=np.int32))
    if search_filter.brands:
        codes = [c for c in map(filters.brand_code, search_filter.brands) if c is not None]
        mask &= np.isin(column(filters.brand), np.asarray(codes, dtype=np.int32))
    if search_filter.min_price is not None:
        mask &= column(filters.price) >= np.float32(search_filter.min_price)
    if search_filter.max_price is not None:
        mask &= column(filters.price) <= np.float32(search_filter.max_price)
    if search_filter.in_stock_only:
        mask &= column(filters.in_stock)
    return mask


def nprobe_for(nprobe: int, selectivity: float, nlist: int) -> int:
    """nprobe for a filter passing `selectivity` (0..1] of the vectors: nprobe * selectivity**-0.5, <= nlist."""
    if selectivity >= 1.0:
        return min(nprobe, nlist)
    grown = math.ceil(nprobe * max(selectivity, 1e-9) ** -NPROBE_EXPONENT)
    return max(1, min(nlist, grown))


@dataclasses.dataclass(frozen=True, eq=False)
class FilterPlan:
    """How a filter is applied to one version: nothing, exact over `ids`, or a Faiss selector."""

    passing: int  # number of internal ids that pass
    count: int  # number of internal ids in the version
    ids: np.ndarray | None = None  # passing ids (int64, ascending) when scored exactly
    flat: faiss.IndexFlatIP | None = None  # their stored vectors, row i = ids[i] (Faiss: threads as configured)
    selector: faiss.IDSelector | None = None  # IDSelectorBitmap over the passing ids
    bitmap: np.ndarray | None = None  # the selector's bits (kept alive while the selector is used)
    list_passing: np.ndarray | None = None  # passing vectors per IVF list (engine.probing), when known
    filter: SearchFilter = SearchFilter()  # the filter the plan applies (sent on to remote shard servers)

    @property
    def selectivity(self) -> float:
        """Share of the version's vectors that pass (1.0 for no filter)."""
        return self.passing / self.count if self.count else 1.0

    @property
    def exact(self) -> bool:
        """True when queries are scored exactly against the passing ids."""
        return self.ids is not None


def create_filter_plan(version: IndexVersion, search_filter: SearchFilter, exact_max: int = EXACT_MAX) -> FilterPlan:
    """The FilterPlan of `search_filter` over `version` (see the module docstring)."""
    count = version.count
    if search_filter.is_empty:
        return FilterPlan(passing=count, count=count, filter=search_filter)
    mask = filter_mask(version.filters, None, search_filter)
    passing = int(mask.sum())
    if passing <= exact_max:
        ids = np.flatnonzero(mask).astype(np.int64)
        flat = faiss.IndexFlatIP(version.dim)
        if passing:
            flat.add(version.vectors_of(ids))
        return FilterPlan(passing=passing, count=count, ids=ids, flat=flat, filter=search_filter)
    bitmap = np.packbits(mask, bitorder="little")
    selector = faiss.IDSelectorBitmap(count, faiss.swig_ptr(bitmap))
    return FilterPlan(passing=passing, count=count, selector=selector, bitmap=bitmap, filter=search_filter)


@dataclasses.dataclass(frozen=True)
class Candidates:
    """The merged top k of a batch of queries, and the shards whose candidates are missing (remote mode)."""

    scores: np.ndarray  # (nq, k) float32, best first; -inf where there is no candidate
    ids: np.ndarray  # (nq, k) int64 internal ids; -1 where there is no candidate
    missing_shards: tuple[int, ...] = ()  # shards that did not answer (down, too slow, other version)


def merge_parts(parts: Sequence[ShardPart], nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard parts in shard order (ties keep shard order); no parts: (nq, 0) empty results."""
    if not parts:
        return np.full((nq, 0), -np.inf, np.float32), np.full((nq, 0), -1, np.int64)
    ordered = sorted(parts, key=lambda part: part.shard)
    return merge_topk([p.scores for p in ordered], [p.ids for p in ordered], k)


class ShardSearch:
    """Searches the Faiss shards of one version and merges their top k (the in-process fan-out).

    Shared by all request threads: per-call parameters (nprobe, selector) travel in
    SearchParametersIVF, the shards are never mutated. Filter plans are cached per filter.
    `other_shards` (a shard server holding part of the version) yields the version's other shards,
    read only to learn which inverted list every internal id is in, so filter-aware probing counts
    passing vectors over the whole version and probes exactly the lists one process holding every
    shard would.
    """

    def __init__(self, version: IndexVersion, exact_max: int = EXACT_MAX,
                 other_shards: Callable[[], Iterable[faiss.Index]] | None = None, batch_threads: int = 0) -> None:
        self.version = version
        self.batch_threads = batch_threads or os.cpu_count() or 1  # OpenMP threads of a call for many queries
        self.shards = list(version.shards)
        self.shard_ids = list(version.shard_ids)
        self.exact_max = exact_max
        self.other_shards = other_shards
        nlists = [ivf.nlist for ivf in map(faiss.try_extract_index_ivf, self.shards) if ivf is not None]
        self.nlist: int | None = max(nlists) if nlists else None  # None: flat shards (exact, no nprobe)
        self._plans: OrderedDict[SearchFilter, FilterPlan] = OrderedDict()
        self._lock = threading.Lock()
        self._prober: ListProber | None | bool = False  # False: not built yet (built on the first filter)

    def prober(self) -> ListProber | None:
        """The filter-aware list prober of these shards (None when they do not allow one)."""
        if self._prober is False:
            others = self.other_shards() if self.other_shards is not None else ()
            self._prober = ListProber.create(self.shards, self.version.count, others)
        return self._prober if isinstance(self._prober, ListProber) else None

    def plan(self, search_filter: SearchFilter) -> FilterPlan:
        """The cached FilterPlan of `search_filter` (built on first use)."""
        with self._lock:
            plan = self._plans.get(search_filter)
            if plan is not None:
                self._plans.move_to_end(search_filter)
                return plan
        plan = create_filter_plan(self.version, search_filter, self.exact_max)
        prober = self.prober() if plan.bitmap is not None else None
        if prober is not None and plan.bitmap is not None:
            mask = np.unpackbits(plan.bitmap, bitorder="little")[:plan.count].astype(bool)
            plan = dataclasses.replace(plan, list_passing=prober.passing_per_list(mask))
        with self._lock:
            self._plans[search_filter] = plan
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    def search(self, xq: np.ndarray, k: int, nprobe: int | None, plan: FilterPlan) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32, internal ids int64; -1 = none) of queries xq (nq, dim) passing `plan`."""
        found = self.candidates(xq, k, nprobe, plan)
        return found.scores, found.ids

    def candidates(self, xq: np.ndarray, k: int, nprobe: int | None, plan: FilterPlan,
                   deadline: float | None = None) -> Candidates:
        """Like `search`, with the shards that did not answer (only a remote fan-out misses any)."""
        nq = xq.shape[0]
        k = max(1, min(k, plan.passing))
        if plan.passing == 0:
            return Candidates(np.full((nq, 0), -np.inf, np.float32), np.full((nq, 0), -1, np.int64))
        if plan.exact:
            with self.threads_for(nq):
                return Candidates(*self._exact(xq, k, plan))
        return self.fan_out(xq, k, nprobe, plan, deadline)

    def threads_for(self, nq: int) -> contextlib.AbstractContextManager[None]:
        """The OpenMP setting of a Faiss call for `nq` queries: batch_threads from BATCH_PARALLEL_MIN queries."""
        return omp_threads(self.batch_threads) if nq >= BATCH_PARALLEL_MIN else contextlib.nullcontext()

    def fan_out(self, xq: np.ndarray, k: int, nprobe: int | None, plan: FilterPlan,
                deadline: float | None) -> Candidates:
        """The merged top k over the version's Faiss shards (here: in this process; engine.remote: over gRPC)."""
        return Candidates(*merge_parts(self.search_parts(xq, k, nprobe, plan), xq.shape[0], k))

    def search_parts(self, xq: np.ndarray, k: int, nprobe: int | None, plan: FilterPlan) -> list[ShardPart]:
        """Per held shard, the top k of xq passing the plan's selector (never the exact path)."""
        with self.threads_for(xq.shape[0]):
            return self._search_parts(xq, k, nprobe, plan)

    def _search_parts(self, xq: np.ndarray, k: int, nprobe: int | None, plan: FilterPlan) -> list[ShardPart]:
        probe = self.version.default_nprobe if nprobe is None else nprobe
        if self.nlist is None or probe is None:
            return self._fan_out(xq, k, None, plan.selector)
        prober = self.prober() if plan.list_passing is not None else None
        if prober is not None and plan.list_passing is not None:
            found = prober.search(xq, k, probe, plan.list_passing, plan.selectivity, plan.selector)
            return [ShardPart(shard, scores, ids) for shard, (scores, ids) in zip(self.shard_ids, found, strict=True)]
        probe = nprobe_for(probe, plan.selectivity, self.nlist)
        while True:
            parts = self._fan_out(xq, k, probe, plan.selector)
            valid = np.zeros(xq.shape[0], np.int64)
            for part in parts:
                valid += (part.ids >= 0).sum(axis=1)
            if probe >= self.nlist or valid.min() >= k:  # every query's merged top k is full
                return parts
            probe = min(self.nlist, probe * 2)  # the probed lists hold too few passing vectors

    def _exact(self, xq: np.ndarray, k: int, plan: FilterPlan) -> tuple[np.ndarray, np.ndarray]:
        assert plan.ids is not None and plan.flat is not None
        D, rows = plan.flat.search(np.ascontiguousarray(xq, dtype=np.float32), k)
        return D, np.where(rows >= 0, plan.ids[np.maximum(rows, 0)], -1)

    def _fan_out(self, xq: np.ndarray, k: int, nprobe: int | None,
                 selector: faiss.IDSelector | None) -> list[ShardPart]:
        parts = []
        for shard_id, shard in zip(self.shard_ids, self.shards, strict=True):
            if shard.ntotal == 0:
                continue
            D, I = shard.search(xq, k, params=search_params(shard, nprobe, selector))  # noqa: E741
            parts.append(ShardPart(shard_id, D, I))
        return parts


def search_params(index: faiss.Index, nprobe: int | None,
                  selector: faiss.IDSelector | None) -> faiss.SearchParameters | None:
    """Per-call parameters: nprobe (clamped to [1, nlist]) for IVF shards and the selector, if any."""
    ivf = faiss.try_extract_index_ivf(index)
    params: faiss.SearchParameters
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = int(min(max(1, nprobe or ivf.nprobe), ivf.nlist))
    elif selector is not None:
        params = faiss.SearchParameters()
    else:
        return None
    if selector is not None:
        params.sel = selector
    return params


def merge_topk(D_parts: Sequence[np.ndarray], I_parts: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (nq, k_i) results into the overall top k by score (missing: -inf, id -1)."""
    if not D_parts:
        raise ValueError("merge_topk needs the results of at least one shard")
    D = np.concatenate([np.asarray(d, dtype=np.float32) for d in D_parts], axis=1)
    I = np.concatenate([np.asarray(i, dtype=np.int64) for i in I_parts], axis=1)  # noqa: E741
    D = np.where(I < 0, np.float32(-np.inf), D)
    if len(D_parts) == 1:
        return D[:, :k], I[:, :k]
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    rows = np.arange(D.shape[0])[:, None]
    return D[rows, order], I[rows, order]
