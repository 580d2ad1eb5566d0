"""The gRPC server: VisualSearch over the live index version, plus health and reflection.

`create_server(config)` binds, starts the server with health NOT_SERVING, loads the CURRENT index
version and the model, refuses a model whose fingerprint differs from the one the index was built
with, runs a warm-up query and only then reports SERVING. `serve(config)` wraps it for the command
line and stops cleanly on SIGINT/SIGTERM. Protobuf types stop at the servicer (engine.convert).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image

from engine import convert
from engine.errors import NotReady, status_for
from engine.search import Searcher
from engine.types import SearchQuery, SearchRequest
from indexer.version import IndexVersion, current_version_path, open_version
from model.embedder import Embedder
from protos.vitrine.v1 import search_pb2, search_pb2_grpc

logger = logging.getLogger("vitrine.engine")

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["VisualSearch"].full_name  # "vitrine.v1.VisualSearch"
_T = TypeVar("_T")


class ServerStartError(RuntimeError):
    """The server cannot start serving: no index version, unreadable model, or a model/index mismatch."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Configuration of one VisualSearch server."""

    index_root: Path  # folder holding index versions and CURRENT
    model: Path | None = None  # checkpoint folder; None: the version manifest's model_path
    host: str = "127.0.0.1"  # interface to bind ("0.0.0.0": every interface)
    port: int = 50051  # TCP port; 0: any free port (create_server returns the real one)
    max_workers: int = 8  # threads serving requests concurrently
    max_message_bytes: int = 16 << 20  # largest request/response in bytes (bounds query image size)
    default_top_k: int = 10  # hits returned when a request's top_k is 0
    device: str = "cpu"  # torch device of the embedder ("cuda" when present)
    grace_s: float = 5.0  # seconds in-flight requests get to finish on shutdown


class VisualSearchServicer(search_pb2_grpc.VisualSearchServicer):
    """The VisualSearch RPCs: convert, delegate to the current Searcher, map errors to status codes.

    The Searcher is swapped as a whole (one attribute assignment), never mutated, so a later hot
    swap can replace it while requests run on the old one.
    """

    def __init__(self) -> None:
        self._searcher: Searcher | None = None

    @property
    def searcher(self) -> Searcher:
        """The Searcher in service; NotReady before loading finished."""
        searcher = self._searcher
        if searcher is None:
            raise NotReady("the server is still loading its index and model; retry in a few seconds")
        return searcher

    def set_searcher(self, searcher: Searcher | None) -> None:
        """Put `searcher` into service (None: take the current one out)."""
        self._searcher = searcher

    def take_searcher(self) -> Searcher | None:
        """Take the Searcher out of service and return it (the caller closes it)."""
        searcher, self._searcher = self._searcher, None
        return searcher

    def Search(self, request: search_pb2.SearchRequest, context: grpc.ServicerContext) -> search_pb2.SearchResponse:
        """Search by image, vector or product id (status codes: see search.proto)."""
        return _handle("Search", context,
                       lambda: convert.result_to_proto(self.searcher.search(convert.request_from_proto(request))))

    def GetIndexInfo(self, request: search_pb2.GetIndexInfoRequest,
                     context: grpc.ServicerContext) -> search_pb2.GetIndexInfoResponse:
        """Describe the served index version."""
        return _handle("GetIndexInfo", context, lambda: convert.index_info_to_proto(self.searcher.index_info()))

    def GetProduct(self, request: search_pb2.GetProductRequest,
                   context: grpc.ServicerContext) -> search_pb2.GetProductResponse:
        """One product's catalog record (status codes: see search.proto)."""

        def answer() -> search_pb2.GetProductResponse:
            searcher = self.searcher
            return search_pb2.GetProductResponse(product=convert.product_to_proto(
                searcher.get_product(request.product_id)), index_version=searcher.version.name)

        return _handle("GetProduct", context, answer)


def _handle(method: str, context: grpc.ServicerContext, call: Callable[[], _T]) -> _T:
    """Run one RPC body, log one line (method, status, latency) and map any error to its status code."""
    start = time.perf_counter()
    try:
        response = call()
    except Exception as exc:  # noqa: BLE001 - every error becomes a status; status_for picks the code
        code, message = status_for(exc)
        latency_ms = (time.perf_counter() - start) * 1e3
        log = logger.exception if code == grpc.StatusCode.INTERNAL else logger.info
        log("%s %s %.1fms: %s", method, code.name, latency_ms, message)
        context.abort(code, message)
    logger.info("%s OK %.1fms", method, (time.perf_counter() - start) * 1e3)
    return response


def load_searcher(config: ServerConfig) -> Searcher:
    """Open the CURRENT version and its model, check they belong together, warm up; ServerStartError if not."""
    try:
        version = open_version(current_version_path(config.index_root))
    except Exception as exc:
        raise ServerStartError(f"cannot open the index under {config.index_root}: {exc}") from exc
    try:
        embedder = load_embedder(config, version)
        searcher = Searcher(version, embedder, default_top_k=config.default_top_k)
        warm_up(searcher)
    except Exception as exc:
        version.close()
        if isinstance(exc, ServerStartError):
            raise
        raise ServerStartError(f"warm-up of index version {version.name} failed: {exc}") from exc
    return searcher


def load_embedder(config: ServerConfig, version: IndexVersion) -> Embedder:
    """The model named by the config (else by the manifest), refusing one the index was not built with."""
    model_path = config.model or version.manifest.get("model_path")
    if not model_path:
        raise ServerStartError(f"index version {version.name} names no model_path; pass the checkpoint explicitly")
    try:
        embedder = Embedder.load(model_path, device=config.device)
    except Exception as exc:
        raise ServerStartError(f"cannot load the model checkpoint {model_path}: {exc}") from exc
    if embedder.fingerprint != version.model_fingerprint:
        raise ServerStartError(
            f"model {model_path} has fingerprint {embedder.fingerprint[:16]}..., but index version {version.name} "
            f"was built with model {version.model_fingerprint[:16]}...; serve the model the index was built with "
            "(see the manifest's model_path) or rebuild the index with this model")
    return embedder


def warm_up(searcher: Searcher) -> None:
    """One image embedding and one index search end to end, so the first real request is not slow or broken."""
    image = Image.new("RGB", (64, 64), (127, 127, 127))
    embedding = searcher.embedder.embed_images([image])
    if embedding.shape != (1, searcher.version.dim) or not np.isfinite(embedding).all():
        raise ServerStartError(f"warm-up: the model returned an embedding of shape {embedding.shape} "
                               f"(expected (1, {searcher.version.dim})) or non-finite values")
    vector = embedding[0] if np.linalg.norm(embedding[0]) > 0 else np.ones(searcher.version.dim, np.float32)
    result = searcher.search(SearchRequest(query=SearchQuery(vector=vector), top_k=1))
    if searcher.version.count and not result.hits:
        raise ServerStartError(f"warm-up: a search of index version {searcher.version.name} returned no hits")


class VitrineServer:
    """The started grpc.Server and the index version it holds open.

    `stop(grace)` stops gRPC like grpc.Server.stop, then takes the Searcher out of service and
    closes its index version (Faiss shards, LMDB catalog, vector map), so the same version can be
    opened again in this process. Every other attribute is the grpc.Server's.
    """

    def __init__(self, server: grpc.Server, servicer: VisualSearchServicer) -> None:
        self._server = server
        self._servicer = servicer

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving; the returned event is set once requests finished and the version is closed."""
        stopped = self._server.stop(grace)
        closed = threading.Event()

        def close_when_stopped() -> None:
            stopped.wait()
            searcher = self._servicer.take_searcher()
            if searcher is not None:
                searcher.version.close()
            closed.set()

        threading.Thread(target=close_when_stopped, name="vitrine-stop").start()
        return closed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def create_server(config: ServerConfig) -> tuple[VitrineServer, int]:
    """Bind and start the server (health NOT_SERVING), load the index and model, then report SERVING.

    Returns the started server and the bound port (the real one when config.port is 0). Loading
    happens before returning; on failure the server is stopped and ServerStartError is raised.
    """
    server, port, _ = _create_server(config)
    return server, port


def _create_server(config: ServerConfig) -> tuple[VitrineServer, int, health.HealthServicer]:
    """create_server, also returning the health servicer (serve() flips it to NOT_SERVING on shutdown)."""
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers), options=options)
    servicer = VisualSearchServicer()
    search_pb2_grpc.add_VisualSearchServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ServerStartError(f"cannot bind {address}: {exc}") from exc
    if port == 0:
        raise ServerStartError(f"cannot bind {address} (in use, or not a local interface)")
    server.start()
    logger.info("listening on %s:%d (NOT_SERVING while loading %s)", config.host, port, config.index_root)
    try:
        searcher = load_searcher(config)
    except BaseException:
        server.stop(None)
        raise
    servicer.set_searcher(searcher)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("SERVING index version %s (%s, %d vectors, dim %d)", searcher.version.name, searcher.version.factory,
                searcher.version.count, searcher.version.dim)
    return VitrineServer(server, servicer), port, health_servicer


def serve(config: ServerConfig) -> int:
    """Run the server until SIGINT/SIGTERM, then report NOT_SERVING and stop with a grace period.

    Returns 0 after a clean stop, 1 when the server could not start (the reason is logged).
    """
    try:
        server, port, health_servicer = _create_server(config)
    except ServerStartError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        logger.info("serving on %s:%d; Ctrl-C to stop", config.host, port)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopping: NOT_SERVING, %.1fs grace for in-flight requests", config.grace_s)
    health_servicer.enter_graceful_shutdown()
    server.stop(config.grace_s).wait()
    logger.info("stopped")
    return 0
