"""What every vitrine gRPC server shares: binding, health, the stoppable server object, the signal loop.

Used by the standalone and root servers (engine.server) and by shard servers (engine.shard_server);
nothing here imports the model, so a shard server starts without torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any, Protocol

import faiss
import grpc
from grpc_health.v1 import health, health_pb2

from engine.config import ServerConfig, config_to_json
from engine.logs import configure_logging
from engine.metrics import Metrics
from engine.swap import SearcherSlot, VersionWatcher
from engine.tls import TlsError, server_credentials

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
        self.http_port: int | None = None  # the bound HTTP/JSON gateway port; None when there is none
        self.serving = threading.Event()  # set while the server reports SERVING (the HTTP gateway's /healthz)

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving; the returned event is set once requests finished and the version is closed."""
        set_health(self.health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING, self.service_names)
        self.serving.clear()
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


SHARED_PORT = False  # True in the worker processes of run_workers, which bind one port together (SO_REUSEPORT);
# a single server binds its ports alone, so that a port already in use is an error, not a silent share of its traffic


def bind(config: ServerConfig) -> tuple[grpc.Server, int]:
    """A grpc.Server bound to config.host:config.port (not started) and the bound port; ServerStartError."""
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 1 if SHARED_PORT else 0)]
    # OpenMP's thread count is a per-thread setting: each request thread sets its own (a call made
    # in the main thread would leave the request threads at one OpenMP team per core, each).
    executor = futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="vitrine-rpc",
                                          initializer=faiss.omp_set_num_threads, initargs=(config.faiss_threads,))
    server = grpc.server(executor, options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            port = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key, config.tls_ca))
        else:
            port = server.add_insecure_port(address)
    except TlsError as exc:
        raise ServerStartError(str(exc)) from exc
    except RuntimeError as exc:
        raise ServerStartError(f"cannot bind {address}: {exc}") from exc
    if port == 0:
        raise ServerStartError(f"cannot bind {address} (in use, or not a local interface)")
    return server, port


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while the block runs (the previous handlers are restored after)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_until_signal(config: ServerConfig, create: Callable[[ServerConfig], tuple[VitrineServer, int]]) -> int:
    """Start a server with `create`, run it until SIGINT/SIGTERM, then NOT_SERVING and a grace period.

    Returns 0 after a clean stop, 1 when the server could not start (the reason is logged).
    """
    if config.log_json:
        configure_logging(json_lines=True)
    logger.info("configuration: %s", config_to_json(config))
    try:
        server, port = create(config)
    except (ServerStartError, OSError) as exc:  # OSError: e.g. the metrics port in use
        logger.error("cannot start: %s", exc)
        return 1
    with stop_signals() as stop:
        logger.info("serving on %s:%d as %s%s; Ctrl-C to stop", config.host, port, config.role,
                    "" if config.tls_cert is None else " over TLS" + (" (clients need a certificate)"
                                                                        if config.tls_ca is not None else ""))
        if server.metrics_port is not None:
            logger.info("metrics on http://%s:%d/metrics", config.metrics_host, server.metrics_port)
        if server.http_port is not None:
            logger.info("HTTP/JSON gateway on http://%s:%d (POST /v1/search)", config.host, server.http_port)
        stop.wait()
    logger.info("stopping: NOT_SERVING, %.1fs grace for in-flight requests", config.grace_s)
    server.health_servicer.enter_graceful_shutdown()
    server.stop(config.grace_s).wait()
    logger.info("stopped")
    return 0


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def worker_config(config: ServerConfig, index: int, port: int) -> ServerConfig:
    """The config of worker process `index`: one process, the shared port, its own metrics port (base + index)."""
    metrics_port = config.metrics_port
    if metrics_port:  # 0 and None stay: any free port / no endpoint
        metrics_port += index
    return dataclasses.replace(config, processes=1, port=port, metrics_port=metrics_port)


def shared_http_port(config: ServerConfig) -> ServerConfig:
    """The config with a concrete HTTP gateway port for every worker to share (0 becomes one free port)."""
    if config.http_port == 0:
        return dataclasses.replace(config, http_port=_free_port(config.host))
    return config


def _worker_main(config: ServerConfig, index: int, count: int, verbose: bool) -> None:
    """Entry point of one worker process (spawned: a fresh interpreter, logging set up again)."""
    global SHARED_PORT
    SHARED_PORT = True  # the workers share the gRPC and HTTP ports
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s %(levelname)s %(name)s [worker {index}]: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    logger.info("worker %d of %d (pid %d)", index, count, multiprocessing.current_process().pid)
    if config.role == "shard":
        from engine.shard_server import serve_shard

        raise SystemExit(serve_shard(config))
    from engine.server import serve

    raise SystemExit(serve(config))


def run_workers(config: ServerConfig) -> int:
    """Serve with `config.processes` worker processes on one port until SIGINT/SIGTERM; the exit status.

    Each worker is a whole server (own GIL, model, Faiss index, hot-swap watcher, health, metrics on
    metrics_port + i) bound to the same port with SO_REUSEPORT (only workers set it: see SHARED_PORT), so the
    kernel spreads client connections over them. Workers are started with `spawn` (no gRPC, OpenMP
    or torch state is forked). A stop signal is passed on to every worker, which stops gracefully. When
    a worker exits on its own (it could not start, or crashed) the others are stopped too and its exit
    status is returned: restarting is the job of the process manager (systemd, Kubernetes).
    """
    port = config.port or _free_port(config.host)
    config = shared_http_port(config)
    if config.http_port is not None:
        logger.info("HTTP/JSON gateway of every worker on http://%s:%d", config.host, config.http_port)
    context = multiprocessing.get_context("spawn")
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    workers = []
    for index in range(config.processes):
        worker = context.Process(target=_worker_main, name=f"vitrine-worker-{index}",
                                 args=(worker_config(config, index, port), index, config.processes, verbose))
        worker.start()
        workers.append(worker)
    logger.info("%d worker processes on %s:%d (pids %s)", len(workers), config.host, port,
                ", ".join(str(w.pid) for w in workers))
    status = 0
    try:
        with stop_signals() as stop:
            while not stop.wait(0.2):
                ended = [w for w in workers if w.exitcode is not None]
                if ended:
                    status = ended[0].exitcode or 1
                    logger.error("worker %s (pid %s) exited with status %s; stopping the others", ended[0].name,
                                 ended[0].pid, ended[0].exitcode)
                    break
    finally:
        for worker in workers:
            if worker.exitcode is None:
                worker.terminate()  # SIGTERM: the worker's graceful stop
        for worker in workers:
            worker.join(config.grace_s + 30.0)
            if worker.exitcode is None:
                logger.error("worker %s (pid %s) did not stop; killing it", worker.name, worker.pid)
                worker.kill()
                worker.join()
    logger.info("all %d workers stopped", len(workers))
    return status
