"""Prometheus metrics of one server, in its own registry (several servers can live in one process).

Names follow the Prometheus conventions (base units, `_seconds`, `_total`):

- `vitrine_request_duration_seconds{method}`      histogram of RPC latency
- `vitrine_requests_total{method,code}`           RPCs answered, by gRPC status code name
- `vitrine_stage_duration_seconds{stage}`         histogram per stage: decode, embed, search, rerank, fetch
- `vitrine_embed_batch_size`                      histogram of images per micro-batch
- `vitrine_index_info{version,factory,model_fingerprint}` 1 for the served version
- `vitrine_index_vectors`                         vectors in the served version
- `vitrine_index_swaps_total{result}`             hot swaps: swapped, refused, failed, deferred (a root waiting
  for its shard servers; once per version)
- `vitrine_inflight_requests`                     RPCs in progress
- `vitrine_shard_request_duration_seconds{shard_server}` (root) histogram of each shard server call's latency
- `vitrine_shard_requests_total{shard_server,result}` (root) shard calls: ok, unavailable, deadline_exceeded,
  version_mismatch, error
- `vitrine_partial_responses_total{method}`       (root) searches answered without some shards
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's metrics; `serve_http(port)` exposes them at http://host:port/metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram("vitrine_request_duration_seconds", "RPC latency in seconds", ["method"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("vitrine_requests", "RPCs answered, by status code", ["method", "code"], registry=r)
        self.stage_seconds = Histogram("vitrine_stage_duration_seconds", "Time per request stage in seconds",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vitrine_embed_batch_size", "Images embedded per micro-batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.index_info = Gauge("vitrine_index_info", "The served index version (value 1)",
                                ["version", "factory", "model_fingerprint"], registry=r)
        self.index_vectors = Gauge("vitrine_index_vectors", "Vectors in the served index version", registry=r)
        self.swaps = Counter("vitrine_index_swaps", "Hot swaps of the index version, by result", ["result"],
                             registry=r)
        self.inflight = Gauge("vitrine_inflight_requests", "RPCs in progress", registry=r)
        self.shard_seconds = Histogram("vitrine_shard_request_duration_seconds",
                                       "Latency of a root's call to one shard server in seconds", ["shard_server"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.shard_requests = Counter("vitrine_shard_requests", "A root's calls to shard servers, by result",
                                      ["shard_server", "result"], registry=r)
        self.partial = Counter("vitrine_partial_responses", "Searches answered without some shards (partial)",
                               ["method"], registry=r)
        self._http: object | None = None
        self._lock = threading.Lock()

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """Count one answered RPC and its latency."""
        self.request_seconds.labels(method).observe(seconds)
        self.requests.labels(method, code).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record the time one request spent in `stage`."""
        self.stage_seconds.labels(stage).observe(seconds)

    def observe_shard_call(self, shard_server: str, result: str, seconds: float) -> None:
        """Count one call of a root to a shard server: its result and latency."""
        self.shard_seconds.labels(shard_server).observe(seconds)
        self.shard_requests.labels(shard_server, result).inc()

    def set_index(self, version: str, factory: str, model_fingerprint: str, count: int) -> None:
        """Mark `version` as the served one (the previous version's info series is removed)."""
        with self._lock:
            self.index_info.clear()
            self.index_info.labels(version, factory, model_fingerprint).set(1)
            self.index_vectors.set(count)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port. OSError naming the address
        when it cannot be bound (in use: it was a bare "Address already in use" traceback)."""
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port} (--metrics-port): "
                                     f"{exc.strerror or exc}") from exc
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if started."""
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]

    def text(self) -> str:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry).decode("utf-8")
