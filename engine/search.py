"""Search over one loaded index version: queries -> embeddings -> filtered candidates -> re-rank -> hits.

The Searcher holds the version read-only: search parameters (top_k, nprobe, filter, options) travel
with each request, so one Searcher serves many threads. `search_batch` answers many requests at
once: image queries are embedded together, and queries sharing a filter and nprobe go to Faiss as
one (nq, dim) batch (engine.candidates: filters pushed into Faiss, shard fan-out and merge). Then,
per request, candidates are re-scored exactly with the stored float16 vectors (unless switched
off) and grouped to one hit per product; when grouping leaves fewer than top_k hits while the
index has more, the request is searched again with 4x the candidates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
from PIL import Image

from engine.candidates import EXACT_MAX, Candidates, ShardSearch, filter_mask
from engine.errors import DeadlineExceeded, EngineError, InvalidQuery, ProductNotFound
from engine.types import MAX_TOP_K, IndexInfo, SearchHit, SearchQuery, SearchRequest, SearchResult
from indexer.validate import RERANK_MIN_CANDIDATES, rerank_candidates
from indexer.version import IndexVersion
from model.catalog import Product
from model.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, check_region, crop_fraction, decode_image

__all__ = ["Searcher", "QueryVector", "filter_mask", "normalize", "OVERFETCH"]

OVERFETCH = 4  # candidates fetched per wanted hit for exact re-rank, and the growth factor when short
RERANK_DEPTH = RERANK_MIN_CANDIDATES  # fewest candidates re-ranked exactly (PQ orders near neighbours coarsely)
EmbedFn = Callable[[Sequence[Image.Image], "float | None"], np.ndarray]  # (images, deadline) -> (n, dim)
ObserveFn = Callable[[str, float], None]  # (stage, seconds)
# (crop region or None) -> the smallest (width, height) a query image may be decoded at (Embedder.decode_size)
DecodeSizeFn = Callable[["tuple[float, float, float, float] | None"], "tuple[int, int]"]


@dataclasses.dataclass(frozen=True)
class QueryVector:
    """A resolved query: the L2-normalised embedding and the product id to leave out (if any)."""

    vector: np.ndarray  # (dim,) float32, unit norm
    exclude_product_id: str | None = None


def normalize(vector: np.ndarray, what: str) -> np.ndarray:
    """`vector` scaled to unit L2 norm; InvalidQuery when it is zero or not finite.

    The norm is taken in float64: float32 squares overflow above ~1e19 (norm inf, the vector became zeros)
    and underflow below ~1e-23 (norm 0, refused as all zeros), though any non-zero scale is a valid query.
    """
    vector = np.asarray(vector, dtype=np.float32)
    if not np.isfinite(vector).all():
        raise InvalidQuery(f"the {what} contains NaN or infinite values")
    wide = vector.astype(np.float64)
    norm = float(np.linalg.norm(wide))
    if norm == 0.0:
        raise InvalidQuery(f"the {what} is all zeros; it has no direction to search along")
    return (wide / norm).astype(np.float32)


def check_deadline(deadline: float | None, stage: str) -> None:
    """DeadlineExceeded when the monotonic `deadline` has passed (checked between stages)."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"the deadline passed before {stage}; give the call more time")


@dataclasses.dataclass
class _Job:
    """One request of a batch while it is being answered."""

    request: SearchRequest
    top_k: int = 0
    query: QueryVector | None = None
    image: Image.Image | None = None
    outcome: SearchResult | Exception | None = None


def crop_query(image: Image.Image, crop: tuple[float, float, float, float]) -> Image.Image:
    """The crop region of a query image; InvalidQuery (INVALID_ARGUMENT) when the region is not inside it."""
    try:
        return crop_fraction(image, *crop)
    except ValueError as exc:
        raise InvalidQuery(str(exc)) from None


def decode_query(data: bytes, crop: tuple[float, float, float, float] | None, *, max_bytes: int, max_pixels: int,
                 decode_size: DecodeSizeFn | None) -> Image.Image:
    """A query image decoded within the size limits, at the reduced JPEG scale `decode_size` allows for its crop
    region, and cut to that region when it has one (InvalidQuery when the region is not inside it)."""
    if crop is not None:  # before decode_size uses it (a NaN fraction was an INTERNAL ValueError there)
        try:
            check_region(*crop)
        except ValueError as exc:
            raise InvalidQuery(str(exc)) from None
    image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels,
                         min_size=None if decode_size is None else decode_size(crop))
    return image if crop is None else crop_query(image, crop)


class Searcher:
    """Answers SearchRequests over one IndexVersion (shared by threads, never mutated per request).

    `embed` turns decoded images into unit embeddings (the server passes its micro-batcher);
    `decode_size` (the model's `Embedder.decode_size`) lets a large JPEG query decode at reduced scale;
    `observe(stage, seconds)` receives stage timings (decode, embed, search, rerank, fetch).
    `shards` finds the candidates: by default the version's Faiss shards in this process; a root
    passes an engine.remote.RemoteShardSearch that asks the shard servers.
    """

    def __init__(self, version: IndexVersion, embed: EmbedFn, *, default_top_k: int = 10,
                 max_top_k: int = MAX_TOP_K, exact_max: int = EXACT_MAX, max_image_bytes: int = DEFAULT_MAX_BYTES,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, rerank_depth: int = RERANK_DEPTH,
                 observe: ObserveFn | None = None, shards: ShardSearch | None = None, batch_threads: int = 0,
                 decode_size: DecodeSizeFn | None = None) -> None:
        self.version = version
        self.decode_size = decode_size
        self.embed = embed
        self.default_top_k = default_top_k
        self.max_top_k = max_top_k
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.rerank_depth = rerank_depth
        self.shards = ShardSearch(version, exact_max, batch_threads=batch_threads) if shards is None else shards
        self.observe: ObserveFn = observe or (lambda stage, seconds: None)

    def search(self, request: SearchRequest, deadline: float | None = None) -> SearchResult:
        """The top_k hits for `request`, best first; raises InvalidQuery / ProductNotFound / ImageDecodeError."""
        outcome = self.search_batch([request], deadline)[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def search_batch(self, requests: Sequence[SearchRequest],
                     deadline: float | None = None) -> list[SearchResult | Exception]:
        """Answer many requests: one result or domain error per request, in order.

        Errors of single requests (bad input) are returned in place; a passed deadline raises.
        """
        start = time.perf_counter()
        jobs = [_Job(request) for request in requests]
        for job in jobs:
            self._prepare(job)
        self._embed_images([job for job in jobs if job.image is not None], deadline)
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            if job.outcome is None:
                groups.setdefault((job.request.filter, job.request.options.nprobe), []).append(job)
        for group in groups.values():
            check_deadline(deadline, "the index search")
            self._answer_group(group, deadline)
        took_us = int((time.perf_counter() - start) * 1e6)
        return [_with_time(job.outcome, took_us) for job in jobs]

    def _prepare(self, job: _Job) -> None:
        """Validate the request and resolve vector/product queries; decode image queries (errors kept)."""
        try:
            job.top_k = self._check_request(job.request)
            query = job.request.query
            if query.kind == "image":
                began = time.perf_counter()
                job.image = self.decode_query_image(query)
                self.observe("decode", time.perf_counter() - began)
            else:
                job.query = self.query_vector(job.request)
        except (EngineError, ValueError) as exc:  # ImageDecodeError is a ValueError
            job.outcome = exc

    def _embed_images(self, jobs: list[_Job], deadline: float | None) -> None:
        if not jobs:
            return
        check_deadline(deadline, "embedding the query image")
        began = time.perf_counter()
        vectors = self.embed([cast(Image.Image, job.image) for job in jobs], deadline)
        self.observe("embed", time.perf_counter() - began)
        for job, vector in zip(jobs, vectors, strict=True):
            try:
                job.query = QueryVector(normalize(vector, "image embedding"))
            except InvalidQuery as exc:
                job.outcome = exc

    def _answer_group(self, jobs: list[_Job], deadline: float | None) -> None:
        """One Faiss call (or one fan-out) for all jobs sharing a filter and nprobe, then re-rank and group each."""
        request = jobs[0].request
        plan = self.shards.plan(request.filter)
        k = max(self._fetch_k(job.top_k, job.request) for job in jobs)
        xq = np.stack([cast(QueryVector, job.query).vector for job in jobs])
        began = time.perf_counter()
        found = self.shards.candidates(xq, k, request.options.nprobe, plan, deadline)
        self.observe("search", time.perf_counter() - began)
        scores, ids = found.scores, found.ids
        exact = [job.request.options.exact_rerank for job in jobs]
        if any(exact):  # every row at once: one gather of the stored vectors, one batched product
            began = time.perf_counter()
            ranked_ids, ranked_scores = self.rerank_rows(xq, ids)
            self.observe("rerank", time.perf_counter() - began)
            rows = np.asarray(exact)[:, None]
            ids, scores = np.where(rows, ranked_ids, ids), np.where(rows, ranked_scores, scores)
        for row, job in enumerate(jobs):
            row_found = Candidates(scores[row], ids[row], found.missing_shards)
            job.outcome = self._finish(job, row_found, k, plan.passing, deadline, ranked=True)

    def _fetch_k(self, top_k: int, request: SearchRequest) -> int:
        """Candidates to fetch: over-fetch for exact re-rank, one spare for an excluded or duplicate image."""
        if request.options.exact_rerank:  # as many as the validation gate measured recall with
            return max(rerank_candidates(top_k, self.version.rerank_factor, self.version.count),
                       min(self.version.count, self.rerank_depth))
        return min(self.version.count, top_k + 1)

    def _finish(self, job: _Job, found: Candidates, k: int, passing: int, deadline: float | None,
                ranked: bool = False) -> SearchResult:
        """Re-rank and group one request's candidates; search again with more candidates when short.

        ranked: the candidates are already re-ranked (when the request asks for it).
        """
        query = cast(QueryVector, job.query)
        options = job.request.options
        scores, ids, missing = found.scores, found.ids, set(found.missing_shards)
        while True:
            valid = ids >= 0
            ids, scores = ids[valid], scores[valid]
            if options.exact_rerank and not ranked:
                began = time.perf_counter()
                ids, scores = self.rerank(query.vector, ids)
                self.observe("rerank", time.perf_counter() - began)
            ranked = False
            began = time.perf_counter()
            hits = self._hits(ids, scores, job.top_k, query.exclude_product_id, options.one_per_product)
            self.observe("fetch", time.perf_counter() - began)
            if len(hits) >= job.top_k or len(ids) < k or k >= passing:
                return SearchResult(hits=tuple(hits), index_version=self.version.name,
                                    missing_shards=tuple(sorted(missing)))
            k = min(passing, k * OVERFETCH)  # duplicates or the excluded product used up the candidates
            plan = self.shards.plan(job.request.filter)
            check_deadline(deadline, "searching again for more candidates")
            again = self.shards.candidates(query.vector[None, :], k, options.nprobe, plan, deadline)
            scores, ids = again.scores[0], again.ids[0]
            missing.update(again.missing_shards)

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
        if request.query.crop is not None and request.query.kind != "image":
            raise InvalidQuery("crop applies to image queries only (it marks part of the query image)")
        return top_k

    def decode_query_image(self, query: SearchQuery) -> Image.Image:
        """The query's image, decoded within the size limits and cut to its crop region when it has one."""
        assert query.image is not None
        return decode_query(query.image, query.crop, max_bytes=self.max_image_bytes,
                            max_pixels=self.max_image_pixels, decode_size=self.decode_size)

    def query_vector(self, request: SearchRequest) -> QueryVector:
        """Resolve a vector or product-id query to a unit embedding (image queries: see search_batch)."""
        query = request.query
        kind = query.kind
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
        if kind == "image":
            image = self.decode_query_image(query)
            return QueryVector(normalize(self.embed([image], None)[0], "image embedding"))
        if kind == "ambiguous":
            raise InvalidQuery("the query sets more than one of image, vector and product_id; set exactly one")
        raise InvalidQuery("the query is empty: set one of image, vector or product_id")

    def _product_query(self, product_id: str, exclude: bool | None) -> QueryVector:
        if not product_id:  # as GetProduct answers: a malformed request, not a product that is missing
            raise InvalidQuery("the query's product_id is empty; give the id of a catalog product")
        internal_id = self._internal_id(product_id, "; search by image or vector instead, or check the id")
        vector = normalize(self.version.vector(internal_id), f"stored vector of product {product_id!r}")
        return QueryVector(vector, product_id if exclude is None or exclude else None)

    def rerank(self, xq: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of `ids`' stored float16 vectors with `xq`; (ids, scores) sorted best first."""
        if len(ids) == 0:
            return ids.astype(np.int64), np.zeros(0, dtype=np.float32)
        ranked_ids, ranked_scores = self.rerank_rows(xq[None, :], ids[None, :])
        return ranked_ids[0], ranked_scores[0]

    def rerank_rows(self, xq: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Re-rank every row of candidates (nq, k) (-1: none) of queries xq (nq, dim) exactly at once.

        Rows come back sorted best first (ties keep the candidates' order), -1 ids last with score
        -inf. Each row's scores are one matrix-vector product, the same whatever the batch size, so
        a BatchSearch answers exactly what single Searches answer.
        """
        nq, k = ids.shape
        if ids.size == 0:
            return ids.astype(np.int64), np.full((nq, k), -np.inf, np.float32)
        valid = ids >= 0
        vectors = self.version.vectors_of(np.where(valid, ids, 0).ravel()).reshape(nq, k, -1)
        scores = np.matmul(vectors, np.ascontiguousarray(xq, dtype=np.float32)[:, :, None])[:, :, 0]
        scores = np.where(valid, scores, np.float32(-np.inf)).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")
        rows = np.arange(nq)[:, None]
        return ids[rows, order].astype(np.int64, copy=False), scores[rows, order]

    def _hits(self, ids: np.ndarray, scores: np.ndarray, top_k: int, exclude: str | None,
              one_per_product: bool) -> list[SearchHit]:
        """The first top_k hits without `exclude` (and, when asked, one per product: its best image)."""
        hits: list[SearchHit] = []
        seen: set[str] = set()
        start = 0
        while start < len(ids):
            # Read just the products still needed (catalog reads dominate the per-query cost).
            end = start + top_k - len(hits) + (1 if exclude is not None and exclude not in seen else 0)
            chunk = ids[start:end]
            for product, score in zip(self.version.products(chunk.tolist()), scores[start:end], strict=True):
                if product.product_id == exclude or (one_per_product and product.product_id in seen):
                    continue
                seen.add(product.product_id)
                # cosine of the float16-rounded stored vector: within ~1e-3 of the float32 one, so clipped to the
                # -1..1 the API promises (a product's own photo scored 1.0001)
                hits.append(SearchHit(product_id=product.product_id, score=min(1.0, max(-1.0, float(score))),
                                      product=product))
                if len(hits) == top_k:
                    return hits
            start = end
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
            raise ProductNotFound(f"product id {_quoted(product_id)} is not in index version "
                                  f"{self.version.name}{hint}")
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
                         shard_count=len(manifest["shards"]), default_nprobe=self.version.default_nprobe,
                         query_image_size=None if self.decode_size is None else self.decode_size(None))


def _quoted(product_id: str, limit: int = 100) -> str:
    """`product_id` quoted for a status message, shortened when long (gRPC status details must stay well
    under the 8-16 KiB metadata limit of clients, or they get RESOURCE_EXHAUSTED instead of the status)."""
    if len(product_id) <= limit:
        return repr(product_id)
    return f"{product_id[:limit]!r}... ({len(product_id)} characters)"


def _with_time(outcome: SearchResult | Exception | None, took_us: int) -> SearchResult | Exception:
    assert outcome is not None, "every job of a batch ends with a result or an error"
    return dataclasses.replace(outcome, took_us=took_us) if isinstance(outcome, SearchResult) else outcome
