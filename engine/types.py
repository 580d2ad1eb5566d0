"""Plain Python types of search requests and results, independent of protobuf.

The servicer converts protobuf messages to these at the edge (engine.convert), so the search code,
the client's callers and the tests never handle generated classes. Products are `model.catalog.Product`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from model.catalog import Product

MAX_TOP_K = 1000  # the largest top_k a request may ask for (the proto documents the same bound)


@dataclasses.dataclass(frozen=True, eq=False)
class SearchQuery:
    """What to search for: exactly one of an encoded image, an embedding vector or a product id."""

    image: bytes | None = None  # encoded JPEG/PNG/WebP/AVIF/HEIC
    vector: np.ndarray | None = None  # (dim,) float32, any non-zero scale
    product_id: str | None = None  # a catalog product id; its stored embedding is the query
    crop: tuple[float, float, float, float] | None = None  # image queries: (x, y, width, height) in fractions

    @property
    def kind(self) -> str:
        """"image", "vector", "product_id" or "empty" (none set); "ambiguous" when several are set."""
        set_fields = [name for name in ("image", "vector", "product_id") if getattr(self, name) is not None]
        if len(set_fields) > 1:
            return "ambiguous"
        return set_fields[0] if set_fields else "empty"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SearchQuery):
            return NotImplemented
        same_vector = (self.vector is None and other.vector is None) or (
            self.vector is not None and other.vector is not None and np.array_equal(self.vector, other.vector))
        return (self.image == other.image and self.product_id == other.product_id and same_vector
                and self.crop == other.crop)


@dataclasses.dataclass(frozen=True)
class SearchFilter:
    """Which products may be returned; every set condition must hold. Defaults accept everything."""

    categories: tuple[str, ...] = ()  # accepted categories (any of them); empty: every category
    brands: tuple[str, ...] = ()  # accepted brands (any of them); empty: every brand
    min_price: float | None = None  # inclusive lower price bound; None: open
    max_price: float | None = None  # inclusive upper price bound; None: open
    in_stock_only: bool = False  # only products in stock

    @property
    def is_empty(self) -> bool:
        """True when the filter accepts every product."""
        return (not self.categories and not self.brands and self.min_price is None and self.max_price is None
                and not self.in_stock_only)


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """Per-request search parameters; they never change the server's shared state."""

    nprobe: int | None = None  # inverted lists probed; None (or 0 on the wire): the version's default
    exclude_query_product: bool | None = None  # None: True for product-id queries, else no effect
    exact_rerank: bool = True  # re-score candidates with the stored float16 vectors (else the index's scores)
    one_per_product: bool = True  # at most one hit per product (its best image)


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    """One search: the query, how many hits, the filter and the options."""

    query: SearchQuery
    top_k: int | None = None  # None: the server's default (10); at most MAX_TOP_K
    filter: SearchFilter = dataclasses.field(default_factory=SearchFilter)
    options: SearchOptions = dataclasses.field(default_factory=SearchOptions)


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One result: the product and its similarity to the query (cosine; higher is more similar)."""

    product_id: str
    score: float
    product: Product


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The hits of one search, best first, with the version that answered and the server time."""

    hits: tuple[SearchHit, ...]
    index_version: str
    took_us: int = 0  # server-side time in microseconds
    missing_shards: tuple[int, ...] = ()  # shards whose candidates are missing (a root's shard server failed)

    @property
    def partial(self) -> bool:
        """True when some shards did not answer: the hits are the best of the shards that did."""
        return bool(self.missing_shards)


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    """Description of a served index version (GetIndexInfo)."""

    version: str
    count: int  # number of indexed vectors
    dim: int  # embedding dimension
    factory: str  # Faiss factory string, e.g. "IVF64,PQ16x8"
    model_fingerprint: str  # sha256 hex of the model weights the index was built with
    metric: str  # "inner_product" or "l2"
    created_utc: dt.datetime | None  # timezone-aware UTC; None when the manifest has none
    shard_count: int
    default_nprobe: int | None = None  # None: the index has no nprobe (flat)
    # (width, height) the server's model decodes a whole query photo down to (Embedder.decode_size): a client
    # may downscale a larger photo to cover it before sending (engine.client.shrink_image); None: not said
    query_image_size: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """The outcome of one search of a BatchSearch: a result, or the status code name and message."""

    result: SearchResult | None  # set when code == "OK"
    code: str = "OK"  # grpc.StatusCode name: "OK", "INVALID_ARGUMENT", "NOT_FOUND", ...
    message: str = ""  # what was wrong, when code is not "OK"


@dataclasses.dataclass(frozen=True, eq=False)
class Embedding:
    """The embedding of one image (Embed) and the fingerprint of the model that made it."""

    vector: np.ndarray  # (dim,) float32, unit norm
    model_fingerprint: str
    took_us: int = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Embedding):
            return NotImplemented
        return (np.array_equal(self.vector, other.vector) and self.model_fingerprint == other.model_fingerprint
                and self.took_us == other.took_us)


@dataclasses.dataclass(frozen=True, eq=False)
class ShardPart:
    """The top k of one Faiss shard for a batch of queries (before the merge)."""

    shard: int  # the shard's position in the version manifest
    scores: np.ndarray  # (nq, k) float32; -inf where there is no candidate
    ids: np.ndarray  # (nq, k) int64 internal ids; -1 where there is no candidate

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardPart):
            return NotImplemented
        return (self.shard == other.shard and np.array_equal(self.scores, other.scores)
                and np.array_equal(self.ids, other.ids))


@dataclasses.dataclass(frozen=True, eq=False)
class ShardQuery:
    """What a root asks a shard server (IndexShard.Search): embedded queries, k, nprobe, filter, version."""

    vectors: np.ndarray  # (nq, dim) float32, unit norm
    k: int  # candidates per query and shard
    nprobe: int | None = None  # None (0 on the wire): the version's default
    filter: SearchFilter = dataclasses.field(default_factory=SearchFilter)
    index_version: str = ""  # the root's version; "": any

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardQuery):
            return NotImplemented
        return (np.array_equal(self.vectors, other.vectors) and self.k == other.k and self.nprobe == other.nprobe
                and self.filter == other.filter and self.index_version == other.index_version)


@dataclasses.dataclass(frozen=True)
class ShardAnswer:
    """What a shard server answers: candidates per held non-empty shard and every shard answered for."""

    parts: tuple[ShardPart, ...]
    shards: tuple[int, ...]  # manifest positions answered for, ascending (empty shards included)
    index_version: str
    took_us: int = 0

