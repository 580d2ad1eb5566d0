"""A Python client of the VisualSearch service that speaks plain types (engine.types).

Every call carries a deadline (`timeout_s`); UNAVAILABLE (server loading, restarting or briefly
unreachable) is retried a few times with exponential backoff. Other errors surface as
`grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import convert
from engine.tls import channel_credentials
from engine.types import (
    BatchItem,
    Embedding,
    IndexInfo,
    SearchFilter,
    SearchOptions,
    SearchQuery,
    SearchRequest,
    SearchResult,
)
from model.catalog import Product
from protos.vitrine.v1 import search_pb2, search_pb2_grpc

SERVICE_NAME = "vitrine.v1.VisualSearch"
_T = TypeVar("_T")


class VisualSearchClient:
    """Client of one VisualSearch server (`target` like "127.0.0.1:50051"); use as a context manager."""

    def __init__(self, target: str, timeout_s: float = 5.0, *, retries: int = 2, backoff_s: float = 0.2,
                 max_message_bytes: int = 16 << 20, tls: bool = False, tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None) -> None:
        """`tls` (or any tls_* file): connect over TLS, verifying the server against `tls_ca` (PEM; None: the
        system's CAs) and presenting `tls_cert` / `tls_key` when the server asks for a client certificate."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 (every call has a deadline), got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0 (extra attempts after an UNAVAILABLE answer), got {retries}")
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries  # extra attempts after an UNAVAILABLE answer
        self.backoff_s = backoff_s  # wait before the first retry; doubles each time
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls or tls_ca is not None or tls_cert is not None or tls_key is not None:  # a key alone: an error there
            self._channel = grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = search_pb2_grpc.VisualSearchStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._query_image_size: tuple[int, int] | None = None  # GetIndexInfo's, fetched for the first shrink

    def _call(self, rpc: Callable[[], _T]) -> _T:
        """Run `rpc`, retrying UNAVAILABLE with exponential backoff; other errors raise at once."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return rpc()
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:  # type: ignore[attr-defined]
                    raise
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def search(self, request: SearchRequest) -> SearchResult:
        """Run one SearchRequest."""
        message = convert.request_to_proto(request)
        response = self._call(lambda: self._stub.Search(message, timeout=self.timeout_s))
        return convert.result_from_proto(response)

    def search_image(self, data: bytes, top_k: int = 10, filter: SearchFilter | None = None,  # noqa: A002
                     options: SearchOptions | None = None,
                     crop: tuple[float, float, float, float] | None = None, shrink: bool = False) -> SearchResult:
        """Products visually similar to an encoded image (JPEG/PNG/WebP/AVIF/HEIC bytes), or to its `crop`
        region: (x, y, width, height) in fractions of the image's width and height.

        `shrink`: send the photo downscaled to the size the server's model uses (`shrink_image`, with the size
        from GetIndexInfo, asked once per client): a phone photo uploads as tens of kilobytes instead of
        megabytes, for nearly the same results (benchmarks/RESULTS.md, "Phone photos")."""
        if shrink:
            data = self.shrink(data, crop)
        return self.search(_request(SearchQuery(image=data, crop=crop), top_k, filter, options))

    def shrink(self, data: bytes, crop: tuple[float, float, float, float] | None = None) -> bytes:
        """`data` downscaled for this server (`shrink_image` with GetIndexInfo's query image size); unchanged when
        the server does not say its size."""
        if self._query_image_size is None:
            self._query_image_size = self.index_info().query_image_size or (0, 0)
        return data if self._query_image_size == (0, 0) else shrink_image(data, self._query_image_size, crop)

    def search_vector(self, vector: np.ndarray, top_k: int = 10, filter: SearchFilter | None = None,  # noqa: A002
                      options: SearchOptions | None = None) -> SearchResult:
        """Products nearest to an embedding vector of the index dimension."""
        return self.search(_request(SearchQuery(vector=np.asarray(vector, np.float32)), top_k, filter, options))

    def search_product(self, product_id: str, top_k: int = 10, filter: SearchFilter | None = None,  # noqa: A002
                       options: SearchOptions | None = None) -> SearchResult:
        """Products similar to a catalog product (itself left out unless options say otherwise)."""
        return self.search(_request(SearchQuery(product_id=product_id), top_k, filter, options))

    def batch_search(self, requests: list[SearchRequest]) -> list[BatchItem]:
        """Run many SearchRequests in one call; one BatchItem (result, or status code and message) per request."""
        message = convert.batch_request_to_proto(requests)
        response = self._call(lambda: self._stub.BatchSearch(message, timeout=self.timeout_s))
        return convert.batch_response_from_proto(response)

    def search_vectors(self, vectors: np.ndarray, top_k: int = 10, filter: SearchFilter | None = None,  # noqa: A002
                       options: SearchOptions | None = None) -> list[SearchResult]:
        """BatchSearch of the rows of `vectors` (n, dim); raises grpc.RpcError-like RuntimeError on a failed row."""
        requests = [_request(SearchQuery(vector=np.asarray(row, np.float32)), top_k, filter, options)
                    for row in np.atleast_2d(vectors)]
        results = []
        for row, item in enumerate(self.batch_search(requests)):
            if item.result is None:
                raise RuntimeError(f"query {row} of the batch failed with {item.code}: {item.message}")
            results.append(item.result)
        return results

    def embed(self, data: bytes, crop: tuple[float, float, float, float] | None = None) -> Embedding:
        """The server model's embedding of an encoded image (JPEG/PNG/WebP/AVIF/HEIC bytes), or of its crop region."""
        message = search_pb2.EmbedRequest(image=data)
        if crop is not None:
            message.crop.CopyFrom(convert.region_to_proto(crop))
        response = self._call(lambda: self._stub.Embed(message, timeout=self.timeout_s))
        return convert.embedding_from_proto(response)

    def get_product(self, product_id: str) -> Product:
        """The catalog record of one product of the served index version."""
        response = self._call(lambda: self._stub.GetProduct(search_pb2.GetProductRequest(product_id=product_id),
                                                            timeout=self.timeout_s))
        return convert.product_from_proto(response.product)

    def index_info(self) -> IndexInfo:
        """Description of the served index version."""
        response = self._call(lambda: self._stub.GetIndexInfo(search_pb2.GetIndexInfoRequest(),
                                                              timeout=self.timeout_s))
        return convert.index_info_from_proto(response)

    def health(self, service: str = SERVICE_NAME) -> str:
        """The health status name of `service` ("SERVING", "NOT_SERVING", ...); raises grpc.RpcError."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout_s: float = 30.0, poll_s: float = 0.2, service: str = SERVICE_NAME) -> None:
        """Block until `service` reports SERVING (a shard server: "vitrine.v1.IndexShard" or "");
        TimeoutError (with the last status seen) after timeout_s."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            try:
                last = self.health(service)
                if last == "SERVING":
                    return
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"  # type: ignore[attr-defined]
            if time.monotonic() + poll_s > deadline:
                raise TimeoutError(f"{self.target} not SERVING after {timeout_s:.1f}s (last status: {last})")
            time.sleep(poll_s)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> VisualSearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SHRINK_QUALITY = 90  # JPEG quality of a shrunk query photo


def shrink_image(data: bytes, size: tuple[int, int], crop: tuple[float, float, float, float] | None = None,
                 quality: int = SHRINK_QUALITY) -> bytes:
    """A query photo downscaled, before upload, to cover `size` (width, height: GetIndexInfo's query image size;
    divided by the `crop` region's width and height fractions when there is one, so the region keeps its
    pixels), aspect ratio and EXIF orientation kept, as a JPEG. The server decodes a large JPEG down to one to
    two times that size anyway, so its results are nearly the same (JPEG rounding; 300 phone-sized photos:
    embedding cosine 0.9992 median, 0.978 at worst, against the photo sent as is).

    Returns `data` itself when it does not decode here (the server then says what is wrong with it), when it is
    already that small, or when the JPEG would not be smaller.
    """
    from PIL import Image

    from model.images import ImageDecodeError, decode_image

    width, height = size
    if crop is not None:
        width, height = math.ceil(width / max(crop[2], 1e-4)), math.ceil(height / max(crop[3], 1e-4))
    try:
        image = decode_image(data, min_size=(width, height))  # a large JPEG decodes at reduced scale here too
    except ImageDecodeError:
        return data
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:  # smaller than the server uses already
        return data
    resized = image if scale == 1.0 else image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue() if buffer.tell() < len(data) else data


def _request(query: SearchQuery, top_k: int, search_filter: SearchFilter | None,
             options: SearchOptions | None) -> SearchRequest:
    return SearchRequest(query=query, top_k=top_k, filter=search_filter or SearchFilter(),
                         options=options or SearchOptions())


def format_results_table(result: SearchResult, title_width: int = 60) -> str:
    """A plain-text table of the hits (rank, score, product id, category, title) for terminals."""
    rows = [(str(rank), f"{hit.score:.4f}", hit.product_id, hit.product.category, hit.product.title[:title_width])
            for rank, hit in enumerate(result.hits, 1)]
    header = ("rank", "score", "product_id", "category", "title")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {0, 1}  # numbers align right

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                    strict=True))).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows]
    lines.append(f"{len(result.hits)} hits from index version {result.index_version} in {result.took_us / 1e3:.1f} ms")
    return "\n".join(lines)
