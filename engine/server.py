"""The gRPC server: VisualSearch over the live index version, plus health, reflection and metrics.

`create_server(config)` binds, starts the server with health NOT_SERVING, loads the CURRENT index
version and the model, refuses a model whose fingerprint differs from the one the index was built
with, runs a warm-up query and only then reports SERVING. It then watches CURRENT and hot-swaps
to newly published versions (engine.swap). `serve(config)` wraps it for the command line and stops
cleanly on SIGINT/SIGTERM (NOT_SERVING first, then a grace period for in-flight requests).

Roles (ServerConfig.role): "standalone" holds every Faiss shard of the version; "root" holds the
model, catalog, filters and stored vectors but no Faiss shard, and asks the shard servers for
candidates (engine.remote); "shard" is engine.shard_server (create_server hands it over).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image

from engine.batcher import BatcherConfig, MicroBatcher
from engine.config import ServerConfig
from engine.errors import NotReady, ShardsUnavailable
from engine.http_gateway import HttpGateway
from engine.lifecycle import ServerStartError, VitrineServer, bind, run_until_signal, set_health
from engine.metrics import Metrics
from engine.remote import RemoteShardSearch, ShardFanout
from engine.search import Searcher
from engine.service import VisualSearchServicer
from engine.swap import SearcherSlot, SwapDeferred, VersionWatcher
from engine.tls import TlsError, channel_credentials, http_ssl_context
from engine.types import SearchQuery, SearchRequest
from indexer.version import IndexVersion, current_version_path, open_version
from model.embedder import Embedder
from protos.vitrine.v1 import search_pb2, search_pb2_grpc

__all__ = ["ServerConfig", "ServerStartError", "VitrineServer", "create_server", "serve", "load_searcher"]

logger = logging.getLogger("vitrine.engine")

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["VisualSearch"].full_name  # "vitrine.v1.VisualSearch"


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
        """Unit embeddings of preprocessed (3, H, W) arrays: one batch through the Embedder's shared forward pass."""
        return self.embedder.embed_pixels(np.stack(arrays))

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


def load_embedder(config: ServerConfig, version: IndexVersion) -> Embedder:
    """The model named by the config (else by the manifest), refusing one the index was not built with."""
    model_path = config.model or version.manifest.get("model_path")
    if not model_path:
        raise ServerStartError(f"index version {version.name} names no model_path; pass the checkpoint explicitly")
    try:
        embedder = Embedder.load(model_path, device=config.device, precision=config.precision)
    except Exception as exc:
        hint = "" if config.model else (
            f" (the path is index version {version.name}'s manifest model_path, written when it was built; if the "
            "checkpoint has moved, pass its new place with --model / VITRINE_MODEL)")
        raise ServerStartError(f"cannot load the model checkpoint {model_path}: {exc}{hint}") from exc
    check_model(embedder.fingerprint, version, str(model_path))
    logger.info("query embedding: model %s on %s in %s", model_path, config.device, embedder.precision)
    return embedder


def check_model(fingerprint: str, version: IndexVersion, model_path: str) -> None:
    """ServerStartError when `version` was built with another model than the one with `fingerprint`."""
    if fingerprint != version.model_fingerprint:
        raise ServerStartError(
            f"model {model_path} has fingerprint {fingerprint[:16]}..., but index version {version.name} "
            f"was built with model {version.model_fingerprint[:16]}...; serve the model the index was built with "
            "(see the manifest's model_path) or rebuild the index with this model")


def open_served_version(config: ServerConfig, path: Path) -> IndexVersion:
    """The version at `path` as this role needs it: every Faiss shard (standalone) or none (root)."""
    return open_version(path, shards=() if config.role == "root" else None)


def create_searcher(version: IndexVersion, runner: ModelRunner, config: ServerConfig, metrics: Metrics,
                    fanout: ShardFanout | None = None) -> Searcher:
    """A warmed-up Searcher over `version` (closes the version and raises ServerStartError on failure).

    With `fanout` (a root), candidates come from the shard servers instead of local Faiss shards.
    """
    try:
        if runner.embedder.dim != version.dim:
            raise ServerStartError(f"the model embeds into {runner.embedder.dim} dimensions but index version "
                                   f"{version.name} holds {version.dim}-dimensional vectors")
        check_model(runner.embedder.fingerprint, version, str(config.model or "the server's model"))
        remote = None if fanout is None else RemoteShardSearch(version, fanout, config.exact_max,
                                                               config.require_all_shards, config.faiss_batch_threads)
        searcher = Searcher(version, runner.embed, default_top_k=config.default_top_k, exact_max=config.exact_max,
                            rerank_depth=config.rerank_depth, batch_threads=config.faiss_batch_threads,
                            max_image_bytes=config.max_message_bytes, max_image_pixels=config.max_image_pixels,
                            observe=metrics.observe_stage, shards=remote, decode_size=runner.embedder.decode_size)
        warm_up(searcher)
    except Exception as exc:
        version.close()
        if isinstance(exc, ServerStartError):
            raise
        raise ServerStartError(f"warm-up of index version {version.name} failed: {exc}") from exc
    return searcher


def load_searcher(config: ServerConfig, metrics: Metrics | None = None,
                  fanout: ShardFanout | None = None) -> tuple[Searcher, ModelRunner]:
    """Open the CURRENT version and its model, check they belong together, warm up; ServerStartError if not."""
    try:
        version = open_served_version(config, current_version_path(config.index_root))
    except Exception as exc:
        raise ServerStartError(f"cannot open the index under {config.index_root}: {exc}") from exc
    metrics = metrics or Metrics()
    try:
        runner = ModelRunner(load_embedder(config, version), config, metrics)
    except BaseException:
        version.close()
        raise
    try:
        return create_searcher(version, runner, config, metrics, fanout), runner
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
    try:
        result = searcher.search(SearchRequest(query=SearchQuery(vector=vector), top_k=1))
    except ShardsUnavailable as exc:  # a root serves without its shards: searches answer UNAVAILABLE until they do
        logger.warning("warm-up of index version %s: %s; serving anyway", searcher.version.name, exc)
        return
    if searcher.version.count and not result.hits and not result.partial:
        raise ServerStartError(f"warm-up: a search of index version {searcher.version.name} returned no hits")


def create_server(config: ServerConfig) -> tuple[VitrineServer, int]:
    """Bind and start the server (health NOT_SERVING), load the index and model, then report SERVING.

    Returns the started server and the bound port (the real one when config.port is 0). Loading
    happens before returning; on failure the server is stopped and ServerStartError is raised.
    A config with role "shard" starts a shard server (engine.shard_server.create_shard_server).
    """
    if config.role == "shard":
        from engine.shard_server import create_shard_server

        return create_shard_server(config)
    faiss.omp_set_num_threads(config.faiss_threads)  # process-wide: parallelism comes from concurrent requests
    torch.set_num_threads(config.torch_threads)
    server, port = bind(config)
    slot: SearcherSlot[Searcher] = SearcherSlot()
    metrics = Metrics()
    health_servicer = health.HealthServicer()
    set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING, (SERVICE_NAME,))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    runner_box: list[ModelRunner] = []

    def embed(images: Sequence[Image.Image], deadline: float | None) -> np.ndarray:
        if not runner_box:  # Embed needs no index lease: it must say so itself while the model loads
            raise NotReady("the server is still loading its index and model; retry in a few seconds")
        return runner_box[0].embed(images, deadline)

    servicer = VisualSearchServicer(slot, embed, "", metrics,
                                    max_batch_queries=config.max_batch_queries,
                                    max_image_bytes=config.max_message_bytes, max_image_pixels=config.max_image_pixels,
                                    max_answer_bytes=config.max_message_bytes)
    search_pb2_grpc.add_VisualSearchServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    server.start()
    logger.info("listening on %s:%d (NOT_SERVING while loading %s)", config.host, port, config.index_root)
    serving = threading.Event()  # the HTTP gateway's /healthz; VitrineServer.serving once loaded
    gateway: HttpGateway | None = None
    try:
        credentials = channel_credentials(config.tls_ca, config.tls_cert, config.tls_key) \
            if config.role == "root" and config.tls_ca is not None else None
        if config.http_port is not None:  # as gRPC: up while loading (/healthz 503, calls 503 UNAVAILABLE)
            gateway = start_gateway(config, servicer, serving)
    except (TlsError, ServerStartError) as exc:
        server.stop(None)
        raise ServerStartError(str(exc)) from exc
    fanout = ShardFanout(config.shard_servers, metrics, config.shard_timeout_ms / 1e3, config.max_message_bytes,
                         credentials) if config.role == "root" else None
    try:
        searcher, runner = load_searcher(config, metrics, fanout)
        metrics_port = metrics.serve_http(config.metrics_port, config.metrics_host) \
            if config.metrics_port is not None else None
    except BaseException:
        server.stop(None)
        if fanout is not None:
            fanout.close()
        if gateway is not None:
            gateway.close()
        raise
    runner_box.append(runner)
    servicer.model_fingerprint = runner.embedder.fingerprint
    servicer.decode_size = runner.embedder.decode_size
    slot.install(searcher)
    _set_index_metrics(metrics, searcher)
    watcher = _start_watcher(config, slot, runner, metrics, fanout) if config.watch else None
    closeables: list = [fanout] if fanout else []
    vitrine = VitrineServer(server, slot, runner, metrics, health_servicer, watcher, metrics_port,
                            service_names=(SERVICE_NAME,), closeables=closeables)
    vitrine.serving = serving
    if gateway is not None:
        vitrine.http_port = gateway.port
        vitrine.closeables.insert(0, gateway)
    set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING, (SERVICE_NAME,))
    vitrine.serving.set()
    logger.info("SERVING index version %s (%s, %d vectors, dim %d)%s", searcher.version.name,
                searcher.version.factory, searcher.version.count, searcher.version.dim,
                f" as a root over shard servers {', '.join(config.shard_servers)}" if fanout else "")
    return vitrine, port


def start_gateway(config: ServerConfig, servicer: VisualSearchServicer, serving: threading.Event) -> HttpGateway:
    """The started HTTP/JSON gateway over `servicer` (/healthz: `serving`); ServerStartError when it cannot bind."""
    assert config.http_port is not None
    try:
        tls = http_ssl_context(config.tls_cert, config.tls_key, config.tls_ca) \
            if config.tls_cert is not None and config.tls_key is not None else None
        gateway = HttpGateway(servicer, serving.is_set, config.host, config.http_port,
                              max_body_bytes=config.max_message_bytes, max_concurrent=config.max_concurrent_rpcs,
                              cors_origin=config.http_cors_origin, tls=tls)
    except (OSError, TlsError) as exc:
        raise ServerStartError(f"cannot bind the HTTP gateway to {config.host}:{config.http_port}: {exc}") from exc
    gateway.start()
    return gateway


def _set_index_metrics(metrics: Metrics, searcher: Searcher) -> None:
    version = searcher.version
    metrics.set_index(version.name, version.factory, version.model_fingerprint, version.count)


def _start_watcher(config: ServerConfig, slot: SearcherSlot[Searcher], runner: ModelRunner, metrics: Metrics,
                   fanout: ShardFanout | None) -> VersionWatcher[Searcher]:
    def load(name: str) -> Searcher:
        current = slot.current
        if fanout is not None and current is not None:  # a root: swap only when the shard servers hold `name`
            late = fanout.behind(name, current.version.dim)
            if late:
                raise SwapDeferred(f"shard servers {', '.join(late)} do not serve index version {name} yet")
        version = open_served_version(config, Path(config.index_root) / name)
        searcher = create_searcher(version, runner, config, metrics, fanout)
        _set_index_metrics(metrics, searcher)
        return searcher

    watcher = VersionWatcher(Path(config.index_root), slot, load, config.poll_s,
                             on_result=lambda result: metrics.swaps.labels(result).inc())
    watcher.start()
    return watcher


def serve(config: ServerConfig) -> int:
    """Run the server (any role) until SIGINT/SIGTERM, then report NOT_SERVING and stop with a grace period.

    Returns 0 after a clean stop, 1 when the server could not start (the reason is logged).
    """
    return run_until_signal(config, create_server)
