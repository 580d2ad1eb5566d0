"""Index planning: pick Faiss index parameters from the catalog size, the embedding dimension, a memory
budget and a target recall, and estimate the build's memory before any work.

`plan_index` is a pure decision function (pinned by a table-driven test), so a build can print what
it will do, and how much memory it will take, before hours of work. The index is named by its Faiss
factory string everywhere (config, logs, manifest).

Rules (inner-product metric, L2-normalised embeddings, exact re-ranking of candidates from the
version's float16 vectors):

- ``n < EXACT_MAX_N`` (20,000): ``"IDMap,Flat"``, exact brute force. Below that size there is not
  enough data to train 256-centroid PQ codebooks (Faiss wants 39 points per centroid = 9,984) *and*
  a coarse quantizer with lists worth probing.
- otherwise ``"IVF{nlist},PQ{m}x8"``, or ``"OPQ{m},IVF{nlist},PQ{m}x8"`` when the codes are compressed
  beyond 4 dimensions per byte (a learned rotation then pays for itself):
  - ``nlist`` ~ 16 * sqrt(n), rounded to the nearest power of two, at most ``MAX_NLIST`` (2**18), then
    lowered (by powers of two) until every list has at least ``MIN_POINTS_PER_LIST`` (39) training
    points. Faiss's guidelines give 4 to 16 sqrt(n) below 1M vectors and 65,536 lists (64 sqrt(n)) to
    1M lists above; the finer the quantizer, the smaller the residuals the PQ codes encode: on 1M
    clustered vectors 16,384 lists raise plain recall@10 from 0.414 (4,096 lists) to 0.601 for 12 MiB more
    centroids (`benchmarks/bench_index_build.py`), and two-level k-means (`indexer.fill`) trains them in
    seconds, not minutes;
  - ``m`` (bytes per code) = the largest divisor of ``dim`` at most ``min(dim // d, MAX_PQ_M)``, where
    ``d`` = 4 dimensions per sub-quantizer for a target recall >= 0.95, 8 for >= 0.9, else 16; with a
    memory budget, the largest such ``m`` (down to dim // 32) whose estimate fits the budget;
  - ``train_size`` = min(n, max(PQ_MIN_TRAIN, TRAIN_POINTS_PER_LIST * nlist));
  - default ``nprobe`` = 2 ** ceil(log2(nlist) / 2) ~ sqrt(nlist) (on clustered data recall with
    re-ranking was limited by the PQ codes, not by nprobe: 0.98 at nprobe 16 to 128 alike);
  - ``rerank_factor`` = 4: search fetches 4 * k candidates, re-scored exactly from float16 vectors
    (the engine over-fetches 4x too).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

EXACT_MAX_N = 20_000  # below this many vectors the index is exact ("IDMap,Flat")
NBITS = 8  # bits per PQ code (256 centroids per sub-quantizer)
MIN_POINTS_PER_LIST = 39  # Faiss k-means warns below 39 training points per centroid
PQ_MIN_TRAIN = MIN_POINTS_PER_LIST * 2**NBITS  # 9,984 points to train 8-bit PQ codebooks
TRAIN_POINTS_PER_LIST = 64  # training sample size per inverted list
NLIST_PER_SQRT_N = 16  # inverted lists ~ 16 sqrt(n)
MAX_NLIST = 2**18  # 262,144 lists (256 MiB of centroids at dim 256): Faiss's size for 10M-100M vectors
MAX_PQ_M = 64  # at most 64 bytes per PQ code
EXACT_FACTORY = "IDMap,Flat"
RERANK_FACTOR = 4  # candidates fetched per wanted result, re-scored from the float16 vectors
DEFAULT_TARGET_RECALL = 0.95  # recall@10 (with re-ranking) the plan aims for
PRODUCT_BYTES = 1024  # memory of one catalog Product held in Python while the version is written
ID_BYTES = 8  # int64 id stored per vector in the inverted lists


class MemoryBudgetError(ValueError):
    """The build cannot fit the memory budget; the message names the budget and the estimate."""


@dataclass(frozen=True)
class IndexPlan:
    """The chosen Faiss index: its factory string and the numbers behind it.

    For the exact index nlist, pq_m, nbits and train_size are 0 and nprobe is 1 (unused);
    ``train_size == 0`` means the index needs no training.
    """

    factory: str  # Faiss factory string, the index's name everywhere
    nlist: int  # inverted lists (0: no IVF)
    pq_m: int  # PQ sub-quantizers = bytes per code at 8 bits (0: no PQ)
    nbits: int  # bits per PQ sub-code (0: no PQ)
    train_size: int  # vectors sampled to train the index (0: no training)
    nprobe: int  # default lists probed per query
    rerank_factor: int = 1  # candidates per result re-scored exactly from float16 vectors (1: none needed)
    opq: bool = False  # a learned OPQ rotation before IVF-PQ

    @property
    def is_exact(self) -> bool:
        """True when search is exhaustive (validation then requires recall 1.0)."""
        return self.factory.removeprefix("IDMap2,").removeprefix("IDMap,") == "Flat"

    def bytes_per_vector(self, dim: int) -> int:
        """Index memory per vector (code + 8-byte id), for the memory estimate."""
        code = self.pq_m * self.nbits // 8 if self.pq_m else 4 * dim
        return code + ID_BYTES

    def to_json(self) -> dict:
        """Plain dict for logs and the manifest."""
        return asdict(self)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of each build stage, in bytes (an upper-bound model, not a measurement)."""

    train: int  # training sample (float32, twice: vectors + residuals) + centroids + codebooks
    add: int  # one shard filled (codes + ids) + one chunk of vectors being encoded
    resident: int  # the whole index in memory (all shards), as validation and the engine hold it
    validate: int  # resident index + catalog products while the version is written and checked

    @property
    def peak(self) -> int:
        return max(self.train, self.add, self.validate)

    def to_json(self) -> dict:
        return {**asdict(self), "peak": self.peak}


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'8GB' / '8G' / '8GiB' / '512MB' / '1000000' -> bytes (K, M, G, T are powers of 1024)."""
    match = _SIZE_RE.match(str(text))
    if match is None:
        raise ValueError(f"cannot read {text!r} as a memory size: write e.g. 8GB, 512MB or 1000000 (bytes)")
    unit = match.group(2).upper().rstrip("B").rstrip("I")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(unit or " "))


def _nearest_power_of_two(x: float) -> int:
    """2**k nearest to x on a log scale (x >= 1)."""
    return 2 ** max(0, round(math.log2(max(x, 1.0))))


def plan_nlist(n: int) -> int:
    """nlist ~ 16 sqrt(n) as a power of two (<= 2**18), lowered until each list has >= 39 training points."""
    nlist = min(MAX_NLIST, _nearest_power_of_two(NLIST_PER_SQRT_N * math.sqrt(n)))
    while nlist > 1 and n // nlist < MIN_POINTS_PER_LIST:
        nlist //= 2
    return nlist


def plan_pq_m(dim: int, dims_per_code: int = 4) -> int:
    """Largest divisor of dim that is <= min(dim // dims_per_code, 64) (at least 1)."""
    target = max(1, min(dim // dims_per_code, MAX_PQ_M))
    return max(m for m in range(1, target + 1) if dim % m == 0)


def default_nprobe(nlist: int) -> int:
    """Default lists probed per query: ~sqrt(nlist) as a power of two, within [1, nlist]."""
    if nlist <= 1:
        return 1
    return min(nlist, 2 ** math.ceil(math.log2(nlist) / 2))


def dims_per_code(target_recall: float) -> int:
    """Dimensions per PQ byte the target recall allows: 4 (>= 0.95), 8 (>= 0.9), else 16."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target recall must lie in (0, 1], got {target_recall}")
    return 4 if target_recall >= 0.95 else 8 if target_recall >= 0.9 else 16


def estimate_memory(plan: IndexPlan, n: int, dim: int, *, num_shards: int = 1,
                    chunk_rows: int = 65_536) -> MemoryEstimate:
    """Memory of each build stage for `plan` on n vectors (see MemoryEstimate's fields)."""
    per_vector = plan.bytes_per_vector(dim)
    tables = plan.nlist * dim * 4 + (256 * dim * 4 if plan.pq_m else 0) + (dim * dim * 4 if plan.opq else 0)
    train = 2 * plan.train_size * dim * 4 + plan.train_size * ID_BYTES + tables
    chunk = min(chunk_rows, n) * (dim * (4 + 2) + per_vector)
    shard_rows = math.ceil(n / max(num_shards, 1))
    add = shard_rows * per_vector + chunk + tables
    resident = n * per_vector + num_shards * tables
    validate = resident + n * PRODUCT_BYTES + chunk
    return MemoryEstimate(train=int(train), add=int(add), resident=int(resident), validate=int(validate))


def _ivf_plan(n: int, dim: int, m: int, opq: bool) -> IndexPlan:
    nlist = plan_nlist(n)
    prefix = f"OPQ{m}," if opq else ""
    return IndexPlan(factory=f"{prefix}IVF{nlist},PQ{m}x{NBITS}", nlist=nlist, pq_m=m, nbits=NBITS,
                     train_size=min(n, max(PQ_MIN_TRAIN, TRAIN_POINTS_PER_LIST * nlist)),
                     nprobe=default_nprobe(nlist), rerank_factor=RERANK_FACTOR, opq=opq)


def plan_index(n: int, dim: int, *, memory_budget: int | None = None, target_recall: float = DEFAULT_TARGET_RECALL,
               num_shards: int = 1, chunk_rows: int = 65_536) -> IndexPlan:
    """Choose the index for n vectors of dimension dim (rules in the module docstring).

    Raises MemoryBudgetError when even the most compressed acceptable plan exceeds memory_budget (bytes).
    """
    if n < 0 or dim < 1:
        raise ValueError(f"plan_index needs n >= 0 and dim >= 1, got n={n}, dim={dim}")
    per_code = dims_per_code(target_recall)
    if n < EXACT_MAX_N:
        candidates = [IndexPlan(factory=EXACT_FACTORY, nlist=0, pq_m=0, nbits=0, train_size=0, nprobe=1)]
        if memory_budget is not None and n >= PQ_MIN_TRAIN:  # too big for flat: compress if the data allows
            candidates.append(_ivf_plan(n, dim, plan_pq_m(dim, per_code), per_code > 4))
    else:
        base = plan_pq_m(dim, per_code)
        smallest = plan_pq_m(dim, 32)
        ms = [m for m in range(base, smallest - 1, -1) if dim % m == 0]
        candidates = [_ivf_plan(n, dim, m, m < plan_pq_m(dim, 4)) for m in ms]
    if memory_budget is None:
        return candidates[0]
    for plan in candidates:
        if estimate_memory(plan, n, dim, num_shards=num_shards, chunk_rows=chunk_rows).peak <= memory_budget:
            return plan
    last = candidates[-1]
    estimate = estimate_memory(last, n, dim, num_shards=num_shards, chunk_rows=chunk_rows)
    raise MemoryBudgetError(
        f"the memory budget {format_bytes(memory_budget)} cannot be met for {n:,} vectors of dim {dim}: the "
        f"smallest acceptable index {last.factory} needs about {format_bytes(estimate.peak)} "
        f"(train {format_bytes(estimate.train)}, add {format_bytes(estimate.add)}, resident "
        f"{format_bytes(estimate.resident)}, validate {format_bytes(estimate.validate)}); raise --memory-budget, "
        f"use more --num-shards, or lower --target-recall")


def check_memory(plan: IndexPlan, n: int, dim: int, memory_budget: int | None, *, num_shards: int = 1,
                 chunk_rows: int = 65_536) -> MemoryEstimate:
    """The estimate for plan; MemoryBudgetError naming budget and estimate when it does not fit."""
    estimate = estimate_memory(plan, n, dim, num_shards=num_shards, chunk_rows=chunk_rows)
    if memory_budget is not None and estimate.peak > memory_budget:
        raise MemoryBudgetError(
            f"{plan.factory} on {n:,} vectors of dim {dim} needs about {format_bytes(estimate.peak)} (train "
            f"{format_bytes(estimate.train)}, add {format_bytes(estimate.add)}, validate "
            f"{format_bytes(estimate.validate)}), over the memory budget {format_bytes(memory_budget)}")
    return estimate


_IVF_RE = re.compile(r"(?:^|,)IVF(\d+)")


def _check_factory(factory: str, dim: int) -> None:
    """ValueError naming the factory string when Faiss cannot build it for `dim`."""
    import faiss

    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split()).rpartition(": ")[2]  # Faiss's words, without its C++ source position
        raise ValueError(f"Faiss cannot build the factory string {factory!r} for {dim}-d vectors: {detail} (see "
                         "https://github.com/facebookresearch/faiss/wiki/The-index-factory)") from None


def plan_from_factory(factory: str, n: int, dim: int, *, trains: bool = True) -> IndexPlan:
    """Plan for a factory string given by the user (config override) instead of `plan_index`.

    A non-IVF factory is wrapped in ``IDMap,`` so that shards share one internal-id space. ValueError when Faiss
    cannot build the factory for `dim` or, when the plan `trains` the index, an IVF has more lists than the `n`
    vectors that train it (both stopped the build with a Faiss RuntimeError traceback, the second after the whole
    embed stage); an update reuses a trained index (trains False).
    """
    factory = factory.strip()
    _check_factory(factory, dim)
    match = _IVF_RE.search(factory)
    if match is None:
        if not factory.startswith("IDMap"):
            factory = f"IDMap,{factory}"
        plan = IndexPlan(factory=factory, nlist=0, pq_m=0, nbits=0, train_size=0, nprobe=1)
        return plan if plan.is_exact else replace(plan, train_size=n, rerank_factor=RERANK_FACTOR)
    nlist = int(match.group(1))
    if trains and nlist > n:
        raise ValueError(f"factory {factory!r} has {nlist} inverted lists, more than the {n} vectors that would "
                         "train them: choose fewer lists (IVF<nlist> with nlist <= n, e.g. about 16 * sqrt(n)) or "
                         "leave --factory unset for the planned index")
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    pq_m = int(pq.group(1)) if pq else 0
    nbits = int(pq.group(2) or NBITS) if pq else 0
    train_size = min(n, max(PQ_MIN_TRAIN if pq else 0, TRAIN_POINTS_PER_LIST * nlist, MIN_POINTS_PER_LIST * nlist))
    return IndexPlan(factory=factory, nlist=nlist, pq_m=pq_m, nbits=nbits, train_size=train_size,
                     nprobe=default_nprobe(nlist), rerank_factor=RERANK_FACTOR if pq else 1,
                     opq=factory.startswith("OPQ"))
