"""What every vitrine gRPC server shares: binding, health, the stoppable server object, the signal loop.

Used by the standalone and root servers (engine.server) and by shard servers (engine.shard_server);
nothing here imports the model, so a shard server starts without torch.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, Protocol

import faiss
import grpc
from grpc_health.v1 import health, health_pb2

from engine.config import ServerConfig, config_to_json
from engine.logs import configure_logging
from engine.metrics import Metrics
from engine.swap import SearcherSlot, VersionWatcher

logger = logging.getLogger("vitrine.engine")


class ServerStartError(RuntimeError):
    """The server cannot start serving: no index version, unreadable model, or a model/index mismatch."""


class Closeable(Protocol):
    """Something the server closes once it stopped serving (the model runner, shard channels)."""

    def close(self) -> None: ...


class VitrineServer:
    """The started grpc.Server with what it holds: the Searcher slot, model, watcher and metrics.

    `stop(grace)` stops gRPC like grpc.Server.stop, then stops the watcher, closes `closeables`
    (the micro-batcher, a root's shard channels) and the served index version, so the same version
    can be opened again in this process. Every other attribute is the grpc.Server's.
    """

    def __init__(self, server: grpc.Server, slot: SearcherSlot, runner: Closeable | None, metrics: Metrics,
                 health_servicer: health.HealthServicer, watcher: VersionWatcher | None,
                 metrics_port: int | None, *, service_names: Sequence[str] = ("",),
                 closeables: Sequence[Closeable] = ()) -> None:
        self._server = server
        self.slot = slot
        self.runner = runner  # the model runner (None on a shard server, which embeds nothing)
        self.metrics = metrics
        self.health_servicer = health_servicer
        self.watcher = watcher
        self.metrics_port = metrics_port  # the bound /metrics port; None when not exposed
        self.service_names = tuple(service_names)
        self.closeables = ([runner] if runner is not None else []) + list(closeables)

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving; the returned event is set once requests finished and the version is closed."""
        set_health(self.health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING, self.service_names)
        if self.watcher is not None:
            self.watcher.stop()
        stopped = self._server.stop(grace)
        closed = threading.Event()

        def close_when_stopped() -> None:
            stopped.wait()
            for closeable in self.closeables:
                closeable.close()
            self.slot.install(None)
            self.metrics.close()
            closed.set()

        threading.Thread(target=close_when_stopped, name="vitrine-stop").start()
        return closed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def set_health(health_servicer: health.HealthServicer, status: Any, service_names: Sequence[str]) -> None:
    """Set the health status of the server ("") and of each of its services."""
    for name in {"", *service_names}:
        health_servicer.set(name, status)


def bind(config: ServerConfig) -> tuple[grpc.Server, int]:
    """A grpc.Server bound to config.host:config.port (not started) and the bound port; ServerStartError."""
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes)]
    # OpenMP's thread count is a per-thread setting: each request thread sets its own (a call made
    # in the main thread would leave the request threads at one OpenMP team per core, each).
    executor = futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="vitrine-rpc",
                                          initializer=faiss.omp_set_num_threads, initargs=(config.faiss_threads,))
    server = grpc.server(executor, options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ServerStartError(f"cannot bind {address}: {exc}") from exc
    if port == 0:
        raise ServerStartError(f"cannot bind {address} (in use, or not a local interface)")
    return server, port


def run_until_signal(config: ServerConfig, create: Callable[[ServerConfig], tuple[VitrineServer, int]]) -> int:
    """Start a server with `create`, run it until SIGINT/SIGTERM, then NOT_SERVING and a grace period.

    Returns 0 after a clean stop, 1 when the server could not start (the reason is logged).
    """
    if config.log_json:
        configure_logging(json_lines=True)
    logger.info("configuration: %s", config_to_json(config))
    try:
        server, port = create(config)
    except ServerStartError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        logger.info("serving on %s:%d as %s; Ctrl-C to stop", config.host, port, config.role)
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
