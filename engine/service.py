"""The VisualSearch servicer: convert, lease the live Searcher, answer, map errors, count metrics.

Protobuf types stop here (engine.convert). Each RPC body runs inside `_handle`, which computes the
request's deadline, records latency and status metrics, logs one structured line and maps any
exception to its status code (engine.errors.status_for: the one place that does).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc
import numpy as np
from PIL import Image

from engine import convert
from engine.errors import AnswerTooLarge, InvalidQuery, status_for
from engine.metrics import Metrics
from engine.search import DecodeSizeFn, Searcher, check_deadline, decode_query, normalize
from engine.swap import SearcherSlot
from engine.types import BatchItem, Embedding
from protos.vitrine.v1 import search_pb2, search_pb2_grpc

logger = logging.getLogger("vitrine.engine")
_T = TypeVar("_T")
EmbedFn = Callable[[Sequence[Image.Image], "float | None"], np.ndarray]


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on the time.monotonic() clock; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def handle_rpc(metrics: Metrics, method: str, context: grpc.ServicerContext, call: Callable[[], _T]) -> _T:
    """Run one RPC body: metrics, one log line (method, status, latency), errors -> status codes."""
    start = time.perf_counter()
    metrics.inflight.inc()
    try:
        response = call()
    except Exception as exc:  # noqa: BLE001 - every error becomes a status; status_for picks the code
        code, message = status_for(exc)
        seconds = time.perf_counter() - start
        metrics.observe_request(method, code.name, seconds)
        log = logger.exception if code == grpc.StatusCode.INTERNAL else logger.info
        log("%s %s %.1fms: %s", method, code.name, seconds * 1e3, message,
            extra={"rpc": method, "code": code.name, "latency_ms": round(seconds * 1e3, 3)})
        context.abort(code, message)
    finally:
        metrics.inflight.dec()
    seconds = time.perf_counter() - start
    metrics.observe_request(method, "OK", seconds)
    logger.info("%s OK %.1fms", method, seconds * 1e3,
                extra={"rpc": method, "code": "OK", "latency_ms": round(seconds * 1e3, 3)})
    return response


class VisualSearchServicer(search_pb2_grpc.VisualSearchServicer):
    """The VisualSearch RPCs over the Searcher in `slot` (swapped whole, never mutated)."""

    def __init__(self, slot: SearcherSlot[Searcher], embed: EmbedFn, model_fingerprint: str, metrics: Metrics, *,
                 max_batch_queries: int = 1024, max_image_bytes: int = 16 << 20,
                 max_image_pixels: int = 40_000_000, max_answer_bytes: int | None = None) -> None:
        self.slot = slot
        self.embed = embed
        self.model_fingerprint = model_fingerprint
        self.metrics = metrics
        self.max_batch_queries = max_batch_queries
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_answer_bytes = max_answer_bytes  # the gRPC server's send limit (None: none, as over HTTP)
        self.decode_size: DecodeSizeFn | None = None  # the model's Embedder.decode_size, set once it is loaded

    def Search(self, request: search_pb2.SearchRequest, context: grpc.ServicerContext) -> search_pb2.SearchResponse:
        """Search by image, vector or product id (status codes: see search.proto)."""

        def answer() -> search_pb2.SearchResponse:
            query = convert.request_from_proto(request)
            with self.slot.lease() as searcher:
                result = searcher.search(query, deadline_of(context))
            if result.partial:
                self.metrics.partial.labels("Search").inc()
            return convert.result_to_proto(result)

        return self._handle("Search", context, answer)

    def BatchSearch(self, request: search_pb2.BatchSearchRequest,
                    context: grpc.ServicerContext) -> search_pb2.BatchSearchResponse:
        """Many searches in one call, each with its own status (see search.proto)."""

        def answer() -> search_pb2.BatchSearchResponse:
            requests = convert.batch_request_from_proto(request)
            if not 1 <= len(requests) <= self.max_batch_queries:
                raise InvalidQuery(f"a BatchSearch needs 1 to {self.max_batch_queries} requests, got {len(requests)}")
            start = time.perf_counter()
            with self.slot.lease() as searcher:
                outcomes = searcher.search_batch(requests, deadline_of(context))
                version = searcher.version.name
            items = []
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    code, message = status_for(outcome)
                    items.append(BatchItem(result=None, code=code.name, message=message))
                else:
                    items.append(BatchItem(result=outcome))
                    if outcome.partial:
                        self.metrics.partial.labels("BatchSearch").inc()
            response = convert.batch_response_to_proto(items, version, int((time.perf_counter() - start) * 1e6))
            # gRPC would refuse to send it ("Sent message larger than max") after this call was logged and
            # counted OK; say so here, with what to do (the HTTP gateway has no such limit: its context says None)
            limit = getattr(context, "max_answer_bytes", self.max_answer_bytes)
            if limit is not None and response.ByteSize() > limit:
                raise AnswerTooLarge(f"the answer to these {len(requests)} searches would be {response.ByteSize():,} "
                                     f"bytes, over the server's {limit:,}-byte message limit: split the batch or "
                                     "ask for a smaller top_k")
            return response

        return self._handle("BatchSearch", context, answer)

    def Embed(self, request: search_pb2.EmbedRequest, context: grpc.ServicerContext) -> search_pb2.EmbedResponse:
        """The model's embedding of one image (status codes: see search.proto)."""

        def answer() -> search_pb2.EmbedResponse:
            start = time.perf_counter()
            deadline = deadline_of(context)
            image = decode_query(request.image, convert.region_from_proto(request), max_bytes=self.max_image_bytes,
                                 max_pixels=self.max_image_pixels, decode_size=self.decode_size)
            self.metrics.observe_stage("decode", time.perf_counter() - start)
            check_deadline(deadline, "embedding the image")
            began = time.perf_counter()
            vector = normalize(self.embed([image], deadline)[0], "image embedding")
            self.metrics.observe_stage("embed", time.perf_counter() - began)
            return convert.embedding_to_proto(Embedding(vector, self.model_fingerprint,
                                                        int((time.perf_counter() - start) * 1e6)))

        return self._handle("Embed", context, answer)

    def GetIndexInfo(self, request: search_pb2.GetIndexInfoRequest,
                     context: grpc.ServicerContext) -> search_pb2.GetIndexInfoResponse:
        """Describe the served index version."""

        def answer() -> search_pb2.GetIndexInfoResponse:
            with self.slot.lease() as searcher:
                return convert.index_info_to_proto(searcher.index_info())

        return self._handle("GetIndexInfo", context, answer)

    def GetProduct(self, request: search_pb2.GetProductRequest,
                   context: grpc.ServicerContext) -> search_pb2.GetProductResponse:
        """One product's catalog record (status codes: see search.proto)."""

        def answer() -> search_pb2.GetProductResponse:
            with self.slot.lease() as searcher:
                return search_pb2.GetProductResponse(product=convert.product_to_proto(
                    searcher.get_product(request.product_id)), index_version=searcher.version.name)

        return self._handle("GetProduct", context, answer)

    def _handle(self, method: str, context: grpc.ServicerContext, call: Callable[[], _T]) -> _T:
        """Run one RPC body through `handle_rpc` (metrics, log line, status codes)."""
        return handle_rpc(self.metrics, method, context, call)
