"""The gRPC server: VisualSearch over the live index version, plus health, reflection and metrics.

`create_server(config)` binds, starts the server with health NOT_SERVING, loads the CURRENT index
version and the model, refuses a model whose fingerprint differs from the one the index was built
with, runs a warm-up query and only then reports SERVING. It then watches CURRENT and hot-swaps
to newly published versions (engine.swap). `serve(config)` wraps it for the command line and stops
cleanly on SIGINT/SIGTERM (NOT_SERVING first, then a grace period for in-flight requests).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image

from engine.batcher import BatcherConfig, MicroBatcher
from engine.config import ServerConfig, config_to_json
from engine.logs import configure_logging
from engine.metrics import Metrics
from engine.search import Searcher
from engine.service import VisualSearchServicer
from engine.swap import SearcherSlot, VersionWatcher
from engine.types import SearchQuery, SearchRequest
from indexer.version import IndexVersion, current_version_path, open_version
from model.embedder import Embedder
from protos.vitrine.v1 import search_pb2, search_pb2_grpc

__all__ = ["ServerConfig", "ServerStartError", "VitrineServer", "create_server", "serve", "load_searcher"]

logger = logging.getLogger("vitrine.engine")

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["VisualSearch"].full_name  # "vitrine.v1.VisualSearch"


class ServerStartError(RuntimeError):
    """The server cannot start serving: no index version, unreadable model, or a model/index mismatch."""


class ModelRunner:
    """The server's one model: embeds images directly or through the micro-batcher.

    With micro-batching, each request thread preprocesses its own image (resize + normalise, in
    parallel) and the batcher thread only stacks the arrays and runs one forward pass per batch.
    """

    def __init__(self, embedder: Embedder, config: ServerConfig, metrics: Metrics) -> None:
        self.embedder = embedder
        self.batcher = MicroBatcher(self._forward, BatcherConfig(config.max_batch, config.max_wait_ms / 1e3,
                                                                  config.batch_workers),
                                    metrics.batch_size.observe) if config.micro_batch else None

    def embed(self, images: Sequence[Image.Image], deadline: float | None = None) -> np.ndarray:
        """Embeddings (n, dim) of decoded images."""
        if self.batcher is not None:
            return self.batcher.embed([self.embedder.preprocess(image) for image in images], deadline)
        return self.embedder.embed_images(images)

    def _forward(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Unit embeddings of preprocessed (3, H, W) arrays, one forward pass (as Embedder.embed_images runs it)."""
        embedder = self.embedder
        use_cuda = embedder.device.startswith("cuda")
        with torch.inference_mode():
            tensor = torch.from_numpy(np.stack(arrays)).to(embedder.device)
            if getattr(embedder, "channels_last", False):
                tensor = tensor.to(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda):
                vectors = embedder.model.embed(tensor).float().cpu().numpy()
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


def load_embedder(config: ServerConfig, version: IndexVersion) -> Embedder:
    """The model named by the config (else by the manifest), refusing one the index was not built with."""
    model_path = config.model or version.manifest.get("model_path")
    if not model_path:
        raise ServerStartError(f"index version {version.name} names no model_path; pass the checkpoint explicitly")
    try:
        embedder = Embedder.load(model_path, device=config.device)
    except Exception as exc:
        raise ServerStartError(f"cannot load the model checkpoint {model_path}: {exc}") from exc
    check_model(embedder.fingerprint, version, str(model_path))
    return embedder


def check_model(fingerprint: str, version: IndexVersion, model_path: str) -> None:
    """ServerStartError when `version` was built with another model than the one with `fingerprint`."""
    if fingerprint != version.model_fingerprint:
        raise ServerStartError(
            f"model {model_path} has fingerprint {fingerprint[:16]}..., but index version {version.name} "
            f"was built with model {version.model_fingerprint[:16]}...; serve the model the index was built with "
            "(see the manifest's model_path) or rebuild the index with this model")


def create_searcher(version: IndexVersion, runner: ModelRunner, config: ServerConfig, metrics: Metrics) -> Searcher:
    """A warmed-up Searcher over `version` (closes the version and raises ServerStartError on failure)."""
    try:
        if runner.embedder.dim != version.dim:
            raise ServerStartError(f"the model embeds into {runner.embedder.dim} dimensions but index version "
                                   f"{version.name} holds {version.dim}-dimensional vectors")
        check_model(runner.embedder.fingerprint, version, str(config.model or "the server's model"))
        searcher = Searcher(version, runner.embed, default_top_k=config.default_top_k, exact_max=config.exact_max,
                            rerank_depth=config.rerank_depth,
                            max_image_bytes=config.max_message_bytes, max_image_pixels=config.max_image_pixels,
                            observe=metrics.observe_stage)
        warm_up(searcher)
    except Exception as exc:
        version.close()
        if isinstance(exc, ServerStartError):
            raise
        raise ServerStartError(f"warm-up of index version {version.name} failed: {exc}") from exc
    return searcher


def load_searcher(config: ServerConfig, metrics: Metrics | None = None) -> tuple[Searcher, ModelRunner]:
    """Open the CURRENT version and its model, check they belong together, warm up; ServerStartError if not."""
    try:
        version = open_version(current_version_path(config.index_root))
    except Exception as exc:
        raise ServerStartError(f"cannot open the index under {config.index_root}: {exc}") from exc
    metrics = metrics or Metrics()
    try:
        runner = ModelRunner(load_embedder(config, version), config, metrics)
    except BaseException:
        version.close()
        raise
    try:
        return create_searcher(version, runner, config, metrics), runner
    except BaseException:
        runner.close()
        raise


def warm_up(searcher: Searcher) -> None:
    """One image embedding and one index search end to end, so the first real request is not slow or broken."""
    image = Image.new("RGB", (64, 64), (127, 127, 127))
    embedding = searcher.embed([image], None)
    if embedding.shape != (1, searcher.version.dim) or not np.isfinite(embedding).all():
        raise ServerStartError(f"warm-up: the model returned an embedding of shape {embedding.shape} "
                               f"(expected (1, {searcher.version.dim})) or non-finite values")
    vector = embedding[0] if np.linalg.norm(embedding[0]) > 0 else np.ones(searcher.version.dim, np.float32)
    result = searcher.search(SearchRequest(query=SearchQuery(vector=vector), top_k=1))
    if searcher.version.count and not result.hits:
        raise ServerStartError(f"warm-up: a search of index version {searcher.version.name} returned no hits")


class VitrineServer:
    """The started grpc.Server with what it holds: the Searcher slot, model, watcher and metrics.

    `stop(grace)` stops gRPC like grpc.Server.stop, then stops the watcher and the micro-batcher
    and closes the served index version, so the same version can be opened again in this process.
    Every other attribute is the grpc.Server's.
    """

    def __init__(self, server: grpc.Server, slot: SearcherSlot, runner: ModelRunner, metrics: Metrics,
                 health_servicer: health.HealthServicer, watcher: VersionWatcher | None,
                 metrics_port: int | None) -> None:
        self._server = server
        self.slot = slot
        self.runner = runner
        self.metrics = metrics
        self.health_servicer = health_servicer
        self.watcher = watcher
        self.metrics_port = metrics_port  # the bound /metrics port; None when not exposed

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving; the returned event is set once requests finished and the version is closed."""
        set_health(self.health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.watcher is not None:
            self.watcher.stop()
        stopped = self._server.stop(grace)
        closed = threading.Event()

        def close_when_stopped() -> None:
            stopped.wait()
            self.runner.close()
            self.slot.install(None)
            self.metrics.close()
            closed.set()

        threading.Thread(target=close_when_stopped, name="vitrine-stop").start()
        return closed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def set_health(health_servicer: health.HealthServicer, status: Any) -> None:
    """Set the health status of both the server ("") and the VisualSearch service."""
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, status)


def _bind(config: ServerConfig) -> tuple[grpc.Server, int]:
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers), options=options,
                         maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ServerStartError(f"cannot bind {address}: {exc}") from exc
    if port == 0:
        raise ServerStartError(f"cannot bind {address} (in use, or not a local interface)")
    return server, port


def create_server(config: ServerConfig) -> tuple[VitrineServer, int]:
    """Bind and start the server (health NOT_SERVING), load the index and model, then report SERVING.

    Returns the started server and the bound port (the real one when config.port is 0). Loading
    happens before returning; on failure the server is stopped and ServerStartError is raised.
    """
    faiss.omp_set_num_threads(config.faiss_threads)  # process-wide: parallelism comes from concurrent requests
    torch.set_num_threads(config.torch_threads)
    server, port = _bind(config)
    slot, metrics = SearcherSlot(), Metrics()
    health_servicer = health.HealthServicer()
    set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    runner_box: list[ModelRunner] = []
    servicer = VisualSearchServicer(slot, lambda images, deadline: runner_box[0].embed(images, deadline), "", metrics,
                                    max_batch_queries=config.max_batch_queries,
                                    max_image_bytes=config.max_message_bytes, max_image_pixels=config.max_image_pixels)
    search_pb2_grpc.add_VisualSearchServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    server.start()
    logger.info("listening on %s:%d (NOT_SERVING while loading %s)", config.host, port, config.index_root)
    try:
        searcher, runner = load_searcher(config, metrics)
        metrics_port = metrics.serve_http(config.metrics_port, config.metrics_host) \
            if config.metrics_port is not None else None
    except BaseException:
        server.stop(None)
        raise
    runner_box.append(runner)
    servicer.model_fingerprint = runner.embedder.fingerprint
    slot.install(searcher)
    _set_index_metrics(metrics, searcher)
    watcher = _start_watcher(config, slot, runner, metrics) if config.watch else None
    set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    logger.info("SERVING index version %s (%s, %d vectors, dim %d)", searcher.version.name, searcher.version.factory,
                searcher.version.count, searcher.version.dim)
    return VitrineServer(server, slot, runner, metrics, health_servicer, watcher, metrics_port), port


def _set_index_metrics(metrics: Metrics, searcher: Searcher) -> None:
    version = searcher.version
    metrics.set_index(version.name, version.factory, version.model_fingerprint, version.count)


def _start_watcher(config: ServerConfig, slot: SearcherSlot, runner: ModelRunner, metrics: Metrics) -> VersionWatcher:
    def load(name: str) -> Searcher:
        version = open_version(Path(config.index_root) / name)
        searcher = create_searcher(version, runner, config, metrics)
        _set_index_metrics(metrics, searcher)
        return searcher

    watcher = VersionWatcher(Path(config.index_root), slot, load, config.poll_s,
                             on_result=lambda result: metrics.swaps.labels(result).inc())
    watcher.start()
    return watcher


def serve(config: ServerConfig) -> int:
    """Run the server until SIGINT/SIGTERM, then report NOT_SERVING and stop with a grace period.

    Returns 0 after a clean stop, 1 when the server could not start (the reason is logged).
    """
    if config.log_json:
        configure_logging(json_lines=True)
    logger.info("configuration: %s", config_to_json(config))
    try:
        server, port = create_server(config)
    except ServerStartError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        logger.info("serving on %s:%d; Ctrl-C to stop", config.host, port)
        if server.metrics_port is not None:
            logger.info("metrics on http://%s:%d/metrics", config.metrics_host, server.metrics_port)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopping: NOT_SERVING, %.1fs grace for in-flight requests", config.grace_s)
    server.health_servicer.enter_graceful_shutdown()
    server.stop(config.grace_s).wait()
    logger.info("stopped")
    return 0
