"""Index planning: pick Faiss index parameters from the catalog size and the embedding dimension.

`plan_index` is a pure decision function (pinned by a table-driven test), so a build can print
what it will do, and how much memory the index will take, before hours of work. The index is
named by its Faiss factory string everywhere (config, logs, manifest).

Rules (inner-product metric, L2-normalised embeddings):

- ``n < EXACT_MAX_N`` (20,000): ``"IDMap,Flat"``, exact brute force. A flat scan of 20k x 768
  float32 takes about a millisecond per query, and below that size there is not enough data
  to train 256-centroid PQ codebooks (Faiss wants 39 points per centroid = 9,984) *and*
  a coarse quantizer with lists worth probing.
- otherwise ``"IVF{nlist},PQ{m}x8"``:
  - ``nlist`` ~ 4 * sqrt(n), rounded to the nearest power of two, then lowered (by powers of
    two) until every list has at least ``MIN_POINTS_PER_LIST`` (39) training points;
  - ``m`` (bytes per vector) = the largest divisor of ``dim`` that is at most
    ``min(dim // 4, MAX_PQ_M)``: about 4 dimensions per sub-quantizer, at most 64 bytes;
  - ``train_size`` = min(n, max(PQ_MIN_TRAIN, TRAIN_POINTS_PER_LIST * nlist)): a sample, not
    the whole catalog (k-means cost grows with it);
  - default ``nprobe`` = 2 ** ceil(log2(nlist) / 2) ~ sqrt(nlist), at most nlist.
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
MAX_PQ_M = 64  # at most 64 bytes per PQ code
EXACT_FACTORY = "IDMap,Flat"


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

    @property
    def is_exact(self) -> bool:
        """True when search is exhaustive (validation then requires recall 1.0)."""
        return self.factory.removeprefix("IDMap2,").removeprefix("IDMap,") == "Flat"

    def bytes_per_vector(self, dim: int) -> int:
        """Index memory per vector (codes + 8-byte id), for the pre-build memory estimate."""
        code = self.pq_m * self.nbits // 8 if self.pq_m else 4 * dim
        return code + 8

    def to_json(self) -> dict:
        """Plain dict for logs and the manifest."""
        return asdict(self)


def _nearest_power_of_two(x: float) -> int:
    """2**k nearest to x on a log scale (x >= 1)."""
    return 2 ** max(0, round(math.log2(max(x, 1.0))))


def plan_nlist(n: int) -> int:
    """nlist ~ 4 sqrt(n) as a power of two, lowered until each list has >= 39 training points."""
    nlist = _nearest_power_of_two(4.0 * math.sqrt(n))
    while nlist > 1 and n // nlist < MIN_POINTS_PER_LIST:
        nlist //= 2
    return nlist


def plan_pq_m(dim: int) -> int:
    """Largest divisor of dim that is <= min(dim // 4, 64): ~4 dims per sub-quantizer, <= 64 bytes."""
    target = max(1, min(dim // 4, MAX_PQ_M))
    return max(m for m in range(1, target + 1) if dim % m == 0)


def default_nprobe(nlist: int) -> int:
    """Default lists probed per query: ~sqrt(nlist) as a power of two, within [1, nlist]."""
    if nlist <= 1:
        return 1
    return min(nlist, 2 ** math.ceil(math.log2(nlist) / 2))


def plan_index(n: int, dim: int) -> IndexPlan:
    """Choose the index for n vectors of dimension dim (see the module docstring for the rules)."""
    if n < 0 or dim < 1:
        raise ValueError(f"plan_index needs n >= 0 and dim >= 1, got n={n}, dim={dim}")
    if n < EXACT_MAX_N:
        return IndexPlan(factory=EXACT_FACTORY, nlist=0, pq_m=0, nbits=0, train_size=0, nprobe=1)
    nlist = plan_nlist(n)
    pq_m = plan_pq_m(dim)
    train_size = min(n, max(PQ_MIN_TRAIN, TRAIN_POINTS_PER_LIST * nlist))
    return IndexPlan(
        factory=f"IVF{nlist},PQ{pq_m}x{NBITS}",
        nlist=nlist,
        pq_m=pq_m,
        nbits=NBITS,
        train_size=train_size,
        nprobe=default_nprobe(nlist),
    )


_IVF_RE = re.compile(r"(?:^|,)IVF(\d+)")


def plan_from_factory(factory: str, n: int, dim: int) -> IndexPlan:
    """Plan for a factory string given by the user (config override) instead of `plan_index`.

    A non-IVF factory is wrapped in ``IDMap,`` so that shards share one internal-id space.
    """
    factory = factory.strip()
    match = _IVF_RE.search(factory)
    if match is None:
        if not factory.startswith("IDMap"):
            factory = f"IDMap,{factory}"
        plan = IndexPlan(factory=factory, nlist=0, pq_m=0, nbits=0, train_size=0, nprobe=1)
        return plan if plan.is_exact else replace(plan, train_size=n)
    nlist = int(match.group(1))
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    pq_m = int(pq.group(1)) if pq else 0
    nbits = int(pq.group(2) or NBITS) if pq else 0
    train_size = min(n, max(PQ_MIN_TRAIN if pq else 0, TRAIN_POINTS_PER_LIST * nlist, MIN_POINTS_PER_LIST * nlist))
    return IndexPlan(factory=factory, nlist=nlist, pq_m=pq_m, nbits=nbits, train_size=train_size,
                     nprobe=default_nprobe(nlist))
