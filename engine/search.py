"""Search over one loaded index version: query -> embedding -> candidates -> filter -> exact re-rank.

The Searcher holds the version and the embedder read-only: search parameters (top_k, nprobe,
filter) travel with each request, so one Searcher serves many threads. Filtering (foundation):
over-fetch candidates from the Faiss index (top_k * 4, growing 4x until enough pass the filter),
then apply the version's filter columns; when the index runs out (IVF probes too few lists, or a
very selective filter), the products passing the filter are scored exactly. A later version can
push filters into Faiss with ID selectors behind the same interface.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
from collections.abc import Sequence
from typing import cast

import numpy as np

from engine.errors import InvalidQuery, ProductNotFound
from engine.types import MAX_TOP_K, IndexInfo, SearchFilter, SearchHit, SearchRequest, SearchResult
from indexer.version import Filters, IndexVersion
from model.catalog import Product
from model.embedder import Embedder
from model.images import decode_image

OVERFETCH = 4  # candidates fetched per wanted hit, and the growth factor when too few pass the filter
EXACT_FALLBACK_MAX = 200_000  # most filter-passing products scored exactly when the index runs out of candidates


@dataclasses.dataclass(frozen=True)
class QueryVector:
    """A resolved query: the L2-normalised embedding and the product id to leave out (if any)."""

    vector: np.ndarray  # (dim,) float32, unit norm
    exclude_product_id: str | None = None


def filter_mask(filters: Filters, ids: np.ndarray | None, search_filter: SearchFilter) -> np.ndarray:
    """Boolean mask of the internal ids `ids` (None: every row) that pass `search_filter`.

    Prices compare as float32 (the column's precision), so a bound equal to a stored price matches;
    products with an unknown price (NaN) never pass a set price bound.
    """
    def column(values: np.ndarray) -> np.ndarray:
        return values if ids is None else values[ids]

    mask = np.ones(len(filters) if ids is None else len(ids), dtype=bool)
    if search_filter.categories:
        codes = [c for c in map(filters.category_code, search_filter.categories) if c is not None]
        mask &= np.isin(column(filters.category), np.asarray(codes, dtype=np.int32))
    if search_filter.min_price is not None:
        mask &= column(filters.price) >= np.float32(search_filter.min_price)
    if search_filter.max_price is not None:
        mask &= column(filters.price) <= np.float32(search_filter.max_price)
    if search_filter.in_stock_only:
        mask &= column(filters.in_stock)
    return mask


def normalize(vector: np.ndarray, what: str) -> np.ndarray:
    """`vector` scaled to unit L2 norm; InvalidQuery when it is zero or not finite."""
    vector = np.asarray(vector, dtype=np.float32)
    if not np.isfinite(vector).all():
        raise InvalidQuery(f"the {what} contains NaN or infinite values")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise InvalidQuery(f"the {what} is all zeros; it has no direction to search along")
    return vector / norm


class Searcher:
    """Answers SearchRequests over one IndexVersion with one Embedder (both shared, never mutated)."""

    def __init__(self, version: IndexVersion, embedder: Embedder, *, default_top_k: int = 10,
                 max_top_k: int = MAX_TOP_K) -> None:
        if embedder.dim != version.dim:
            raise ValueError(f"the model embeds into {embedder.dim} dimensions but index version {version.name} "
                             f"holds {version.dim}-dimensional vectors")
        self.version = version
        self.embedder = embedder
        self.default_top_k = default_top_k
        self.max_top_k = max_top_k

    def search(self, request: SearchRequest) -> SearchResult:
        """The top_k hits for `request`, best first; raises InvalidQuery / ProductNotFound / ImageDecodeError."""
        start = time.perf_counter()
        top_k = self._check_request(request)
        query = self.query_vector(request)
        ids, scores = self._candidates(query.vector, top_k, request)
        hits = self._hits(ids, scores, top_k, query.exclude_product_id)
        took_us = int((time.perf_counter() - start) * 1e6)
        return SearchResult(hits=tuple(hits), index_version=self.version.name, took_us=took_us)

    def _check_request(self, request: SearchRequest) -> int:
        """Validate top_k, nprobe and the price range; returns the effective top_k."""
        top_k = self.default_top_k if request.top_k is None else request.top_k
        if not 1 <= top_k <= self.max_top_k:
            raise InvalidQuery(f"top_k must be between 1 and {self.max_top_k} (0 means {self.default_top_k}), "
                               f"got {top_k}")
        if request.options.nprobe is not None and request.options.nprobe < 0:
            raise InvalidQuery(f"nprobe must be >= 0 (0 means the index default), got {request.options.nprobe}")
        low, high = request.filter.min_price, request.filter.max_price
        for bound in (low, high):
            if bound is not None and math.isnan(bound):
                raise InvalidQuery("a price bound is NaN; leave the bound unset for an open range")
        if low is not None and high is not None and low > high:
            raise InvalidQuery(f"the price range is empty: min {low} > max {high}")
        return top_k

    def query_vector(self, request: SearchRequest) -> QueryVector:
        """Resolve the query to a unit embedding: embed the image, check the vector, or look up the product."""
        query = request.query
        kind = query.kind
        if kind == "image":
            assert query.image is not None
            image = decode_image(query.image)
            return QueryVector(normalize(self.embedder.embed_images([image])[0], "image embedding"))
        if kind == "vector":
            assert query.vector is not None
            vector = np.asarray(query.vector, dtype=np.float32).ravel()
            if vector.shape[0] != self.version.dim:
                raise InvalidQuery(f"the query vector has {vector.shape[0]} dimensions, but index version "
                                   f"{self.version.name} expects {self.version.dim}")
            return QueryVector(normalize(vector, "query vector"))
        if kind == "product_id":
            assert query.product_id is not None
            return self._product_query(query.product_id, request.options.exclude_query_product)
        if kind == "ambiguous":
            raise InvalidQuery("the query sets more than one of image, vector and product_id; set exactly one")
        raise InvalidQuery("the query is empty: set one of image, vector or product_id")

    def _product_query(self, product_id: str, exclude: bool | None) -> QueryVector:
        internal_id = self._internal_id(product_id, "; search by image or vector instead, or check the id")
        vector = normalize(self.version.vector(internal_id), f"stored vector of product {product_id!r}")
        return QueryVector(vector, product_id if exclude is None or exclude else None)

    def _candidates(self, xq: np.ndarray, top_k: int, request: SearchRequest) -> tuple[np.ndarray, np.ndarray]:
        """Internal ids passing the filter and their exact scores, best first (enough for top_k hits)."""
        search_filter, count = request.filter, self.version.count
        # One spare per possible excluded or duplicate image; grown 4x while too few pass.
        want = top_k + 1
        k = min(count, max(want * OVERFETCH, 16))
        while True:
            _, I = self.version.search(xq[None, :], k, request.options.nprobe)  # noqa: E741
            ids = I[0][I[0] >= 0]
            returned = len(ids)
            ids = ids[filter_mask(self.version.filters, ids, search_filter)]
            if len(ids) >= want or returned == count:  # enough, or the whole index was seen
                break
            if returned < k or k >= count:  # the index ran out of candidates (IVF probed too few lists)
                passing = np.flatnonzero(filter_mask(self.version.filters, None, search_filter))
                ids = passing if len(passing) <= EXACT_FALLBACK_MAX else ids
                break
            k = min(count, k * OVERFETCH)
        return self.rerank(xq, ids)

    def rerank(self, xq: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of `ids`' stored float16 vectors with `xq`; (ids, scores) sorted best first."""
        if len(ids) == 0:
            return ids.astype(np.int64), np.zeros(0, dtype=np.float32)
        scores = self.version.vectors_of(cast(Sequence[int], ids)) @ xq  # an int64 array indexes directly
        order = np.argsort(-scores, kind="stable")
        return ids[order].astype(np.int64), scores[order].astype(np.float32)

    def _hits(self, ids: np.ndarray, scores: np.ndarray, top_k: int, exclude: str | None) -> list[SearchHit]:
        """The first top_k distinct products (one hit per product: its best image), without `exclude`."""
        hits: list[SearchHit] = []
        seen = {exclude} if exclude is not None else set()
        batch = top_k + 8
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            for product, score in zip(self.version.products(chunk.tolist()), scores[start:start + batch],
                                      strict=True):
                if product.product_id in seen:
                    continue
                seen.add(product.product_id)
                hits.append(SearchHit(product_id=product.product_id, score=float(score), product=product))
                if len(hits) == top_k:
                    return hits
        return hits

    def get_product(self, product_id: str) -> Product:
        """The catalog record of `product_id` in the served version; InvalidQuery / ProductNotFound."""
        if not product_id:
            raise InvalidQuery("product_id is empty; give the id of a catalog product")
        return self.version.product(self._internal_id(product_id))

    def _internal_id(self, product_id: str, hint: str = "") -> int:
        """The served version's internal id of `product_id`; ProductNotFound (message + hint) when absent."""
        internal_id = self.version.internal_id(product_id) if product_id else None
        if internal_id is None:
            raise ProductNotFound(f"product id {product_id!r} is not in index version {self.version.name}{hint}")
        return internal_id

    def index_info(self) -> IndexInfo:
        """Description of the served version, from its manifest."""
        manifest = self.version.manifest
        created = None
        try:
            created = dt.datetime.fromisoformat(str(manifest["created_utc"])).astimezone(dt.timezone.utc)
        except (KeyError, ValueError):
            pass
        return IndexInfo(version=self.version.name, count=self.version.count, dim=self.version.dim,
                         factory=self.version.factory, model_fingerprint=self.version.model_fingerprint,
                         metric=str(manifest.get("metric", "inner_product")), created_utc=created,
                         shard_count=len(manifest["shards"]), default_nprobe=self.version.default_nprobe)
