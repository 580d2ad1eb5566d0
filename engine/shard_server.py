"""Remote shard mode, the shard's side: a gRPC IndexShard server holding some Faiss shards of the live version.

`vitrine serve --role shard --shards 0,1` opens CURRENT with only those Faiss shards (plus the
filter columns, to turn a request's filter into an id selector) and answers `IndexShard.Search`:
already-embedded queries in, per held shard the top k (internal id, score) out. No model is loaded
(torch is never imported). Filters are always pushed into Faiss as selectors here; very selective
filters never arrive, the root scores them exactly. For filter-aware probing the server also reads,
once per version and memory-mapped, the inverted-list ids of the shards it does not hold, so it
probes exactly the lists a standalone server would.

Like a standalone server it reports NOT_SERVING until loaded and warmed up, follows CURRENT (hot
swap; a version without one of its shards is refused and the old one keeps serving) and stops
cleanly on SIGINT/SIGTERM. After a swap it keeps the version it swapped away from open until the
next swap and answers requests naming it, so a root that has not swapped yet still gets whole
answers (memory: up to two versions of the held shards). A request naming any other index version
is answered FAILED_PRECONDITION (the root then counts this server's shards as missing); a root
probes for that before it swaps (engine.remote.ShardFanout.behind).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine import convert
from engine.candidates import ShardSearch
from engine.config import ServerConfig
from engine.errors import InvalidQuery, VersionMismatch
from engine.lifecycle import ServerStartError, VitrineServer, bind, run_until_signal, set_health
from engine.metrics import Metrics
from engine.search import check_deadline
from engine.service import deadline_of, handle_rpc
from engine.swap import SearcherSlot, VersionWatcher
from engine.types import SearchFilter, ShardAnswer, ShardQuery
from indexer.version import IndexVersion, current_version_path, load_shard, open_version
from protos.vitrine.v1 import shard_pb2, shard_pb2_grpc

logger = logging.getLogger("vitrine.engine")

SHARD_SERVICE_NAME = shard_pb2.DESCRIPTOR.services_by_name["IndexShard"].full_name  # "vitrine.v1.IndexShard"
NEVER_EXACT = -1  # a shard server's filter plans always use a Faiss selector (the root scores the exact ones)


def other_shards_of(version: IndexVersion) -> Callable[[], Iterator[faiss.Index]]:
    """A loader of the version's shards not held here, memory-mapped, one at a time (for list ids only)."""
    held = set(version.shard_ids)

    def load() -> Iterator[faiss.Index]:
        for position, entry in enumerate(version.manifest["shards"]):
            if position not in held:
                yield load_shard(version.path, entry, version.dim, mmap=True)

    return load


def create_shard_search(version: IndexVersion, batch_threads: int = 0) -> ShardSearch:
    """A warmed-up ShardSearch over the held shards of `version` (closes it and raises ServerStartError on failure)."""
    try:
        shards = ShardSearch(version, NEVER_EXACT, other_shards_of(version), batch_threads)
        warm_up_shards(shards)
    except Exception as exc:
        version.close()
        raise ServerStartError(f"warm-up of shards {version.shard_ids} of index version {version.name} "
                               f"failed: {exc}") from exc
    return shards


def warm_up_shards(shards: ShardSearch) -> None:
    """One search of every held shard and the filter prober's list map, so the first request is not slow."""
    xq = np.ones((1, shards.version.dim), np.float32) / np.sqrt(shards.version.dim)
    parts = shards.search_parts(xq, 1, None, shards.plan(SearchFilter()))
    if any(s.ntotal for s in shards.shards) and not any((part.ids >= 0).any() for part in parts):
        raise ServerStartError("a search of the held shards returned no candidate")
    shards.prober()


def check_shard_query(query: ShardQuery, dim: int, count: int) -> None:
    """InvalidQuery when the queries, k or nprobe cannot be searched (`count`: the version's vectors, all shards)."""
    if query.vectors.shape[0] == 0:
        raise InvalidQuery("the shard request holds no query vector")
    if query.vectors.shape[1] != dim:
        raise InvalidQuery(f"the query vectors have {query.vectors.shape[1]} dimensions, the index {dim}")
    if not np.isfinite(query.vectors).all():
        raise InvalidQuery("the query vectors contain NaN or infinite values")
    if query.k < 1:
        raise InvalidQuery(f"k must be >= 1, got {query.k}")
    if query.k > max(count, 1):  # a root asks for at most the version's count; Faiss would allocate k per query
        raise InvalidQuery(f"k must be at most the index version's {count} vectors, got {query.k}")
    if query.nprobe is not None and query.nprobe < 0:
        raise InvalidQuery(f"nprobe must be >= 0 (0 means the index default), got {query.nprobe}")


class IndexShardServicer(shard_pb2_grpc.IndexShardServicer):
    """IndexShard.Search over the ShardSearch in `slot` (swapped whole on a new version, never mutated)."""

    def __init__(self, slot: SearcherSlot[ShardSearch], metrics: Metrics) -> None:
        self.slot = slot
        self.metrics = metrics

    def Search(self, request: shard_pb2.ShardSearchRequest,
               context: grpc.ServicerContext) -> shard_pb2.ShardSearchResponse:
        """Per held shard, the top k of each query (status codes: see shard.proto)."""

        def answer() -> shard_pb2.ShardSearchResponse:
            start = time.perf_counter()
            query = convert.shard_query_from_proto(request)
            with self.slot.lease(query.index_version or None) as shards:
                version = shards.version.name
                if query.index_version and query.index_version != version:
                    previous = self.slot.previous
                    also = f" (and still {previous.version.name})" if previous is not None else ""
                    raise VersionMismatch(f"this shard server serves index version {version}{also}, not "
                                          f"{query.index_version}; a root never mixes versions")
                check_shard_query(query, shards.version.dim, shards.version.count)
                check_deadline(deadline_of(context), "the shard search")
                parts = shards.search_parts(query.vectors, query.k, query.nprobe, shards.plan(query.filter))
                held = tuple(shards.shard_ids)
            took_us = int((time.perf_counter() - start) * 1e6)
            return convert.shard_answer_to_proto(ShardAnswer(tuple(parts), held, version, took_us))

        return handle_rpc(self.metrics, "ShardSearch", context, answer)


def load_shard_search(config: ServerConfig, path: Path) -> ShardSearch:
    """Open the version at `path` with the configured shards and warm it up; ServerStartError when impossible."""
    try:
        version = open_version(path, shards=config.shards)
    except Exception as exc:
        raise ServerStartError(f"cannot open shards {list(config.shards)} of the index at {path}: {exc}") from exc
    return create_shard_search(version, config.faiss_batch_threads)


def create_shard_server(config: ServerConfig) -> tuple[VitrineServer, int]:
    """Bind and start a shard server (NOT_SERVING), load its shards of CURRENT, warm up, report SERVING."""
    if config.role != "shard" or not config.shards:
        raise ServerStartError("a shard server needs role 'shard' and the shards it serves (--shards 0,1)")
    faiss.omp_set_num_threads(config.faiss_threads)
    server, port = bind(config)
    slot: SearcherSlot[ShardSearch] = SearcherSlot(keep_previous=True)
    metrics = Metrics()
    health_servicer = health.HealthServicer()
    set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING, (SHARD_SERVICE_NAME,))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    shard_pb2_grpc.add_IndexShardServicer_to_server(IndexShardServicer(slot, metrics), server)
    reflection.enable_server_reflection(
        (SHARD_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    server.start()
    logger.info("listening on %s:%d (NOT_SERVING while loading shards %s of %s)", config.host, port,
                list(config.shards), config.index_root)
    try:
        shards = load_shard_search(config, current_version_path(config.index_root))
        metrics_port = metrics.serve_http(config.metrics_port, config.metrics_host) \
            if config.metrics_port is not None else None
    except BaseException:
        server.stop(None)
        raise
    slot.install(shards)
    _set_index_metrics(metrics, shards)
    watcher = _start_watcher(config, slot, metrics) if config.watch else None
    set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING, (SHARD_SERVICE_NAME,))
    logger.info("SERVING shards %s of index version %s (%s, %d of %d vectors)", shards.shard_ids, shards.version.name,
                shards.version.factory, sum(s.ntotal for s in shards.shards), shards.version.count)
    return VitrineServer(server, slot, None, metrics, health_servicer, watcher, metrics_port,
                         service_names=(SHARD_SERVICE_NAME,)), port


def _set_index_metrics(metrics: Metrics, shards: ShardSearch) -> None:
    version = shards.version
    metrics.set_index(version.name, version.factory, version.model_fingerprint, sum(s.ntotal for s in shards.shards))


def _start_watcher(config: ServerConfig, slot: SearcherSlot[ShardSearch],
                   metrics: Metrics) -> VersionWatcher[ShardSearch]:
    def load(name: str) -> ShardSearch:
        kept = slot.previous  # a rollback to the version kept open: serve it again (LMDB opens it only once)
        shards = kept if kept is not None and kept.version.name == name else \
            load_shard_search(config, Path(config.index_root) / name)
        _set_index_metrics(metrics, shards)
        return shards

    watcher = VersionWatcher(Path(config.index_root), slot, load, config.poll_s,
                             on_result=lambda result: metrics.swaps.labels(result).inc())
    watcher.start()
    return watcher


def serve_shard(config: ServerConfig) -> int:
    """Run a shard server until SIGINT/SIGTERM (see engine.lifecycle.run_until_signal)."""
    return run_until_signal(config, create_shard_server)
