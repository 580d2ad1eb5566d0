"""Remote shard mode with real processes on loopback: a root and two shard servers (`vitrine serve --role ...`).

The root over both shard servers must answer exactly (ids and scores) what one standalone server over
the same version answers; a stopped (SIGSTOP: too slow) shard server is cut off at the per-shard
deadline, which never outlasts the client's; a killed one gives partial results naming its shard,
UNAVAILABLE under --require-all-shards or when no shard is left; a shard server refuses another version.
Tests run in file order: the last one kills the shard servers.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import faiss
import grpc
import numpy as np
import pytest
from engine_fixtures import EngineIndex, build_engine_index, free_port, serve_process, stop_processes

from engine.client import VisualSearchClient
from engine.server import ServerConfig, VitrineServer, create_server
from engine.types import SearchFilter, SearchOptions, SearchQuery, SearchRequest, SearchResult
from protos.vitrine.v1 import search_pb2, shard_pb2, shard_pb2_grpc

pytestmark = pytest.mark.timeout(400)

SHARD_TIMEOUT_MS = 2000  # the root's per-shard deadline (generous: the test machine's cores are shared)


@dataclasses.dataclass
class Cluster:
    """Two shard server processes (shard 0, shard 1), a root process over them, and a standalone reference."""

    index: EngineIndex
    shard_ports: list[int]
    shard_processes: list[subprocess.Popen]
    root_port: int
    root_metrics_port: int
    reference: VitrineServer
    reference_port: int
    logs: Path

    @property
    def shard_targets(self) -> tuple[str, ...]:
        return tuple(f"127.0.0.1:{port}" for port in self.shard_ports)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("shards")
    index = build_engine_index(root)
    reference_root = root / "reference-index"  # LMDB refuses a second open of one path in this process
    shutil.copytree(index.index_root, reference_root)
    shard_ports, root_port, metrics_port = [free_port(), free_port()], free_port(), free_port()
    common = ["--index-root", str(index.index_root), "--poll-s", "0.2"]
    processes = [serve_process([*common, "--role", "shard", "--shards", str(shard), "--port", str(port)],
                               root / f"shard-{shard}.log", {}) for shard, port in enumerate(shard_ports)]
    targets = ",".join(f"127.0.0.1:{port}" for port in shard_ports)
    # exact_max 0 on the root and the reference: filtered queries also go through the shards' Faiss selectors
    processes.append(serve_process([*common, "--role", "root", "--shard-servers", targets, "--port", str(root_port),
                                    "--shard-timeout-ms", str(SHARD_TIMEOUT_MS), "--metrics-port", str(metrics_port)],
                                   root / "root.log", {"VITRINE_EXACT_MAX": "0"}))
    reference, reference_port = create_server(ServerConfig(index_root=reference_root, port=0, exact_max=0,
                                                           watch=False))
    try:
        for port, service in [(shard_ports[0], ""), (shard_ports[1], "vitrine.v1.IndexShard"), (root_port, "")]:
            with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=5.0) as client:
                client.wait_ready(timeout_s=120.0, service=service)
        yield Cluster(index, shard_ports, processes[:2], root_port, metrics_port, reference, reference_port, root)
    finally:
        stop_processes(processes)
        reference.stop(None).wait()


@pytest.fixture()
def root(cluster: Cluster) -> Iterator[VisualSearchClient]:
    with VisualSearchClient(f"127.0.0.1:{cluster.root_port}", timeout_s=20.0, retries=0) as client:
        yield client


@pytest.fixture()
def reference(cluster: Cluster) -> Iterator[VisualSearchClient]:
    with VisualSearchClient(f"127.0.0.1:{cluster.reference_port}", timeout_s=20.0) as client:
        yield client


def comparable(result: SearchResult) -> list[tuple[str, float]]:
    return [(hit.product_id, hit.score) for hit in result.hits]


def sample_requests(index: EngineIndex) -> list[SearchRequest]:
    rng = np.random.default_rng(7)
    products = index.products
    requests = [SearchRequest(SearchQuery(vector=rng.normal(size=index.dim).astype(np.float32)), top_k=10)
                for _ in range(4)]
    requests += [
        SearchRequest(SearchQuery(product_id=products[3].product_id), top_k=8),
        SearchRequest(SearchQuery(image=index.images[products[11].product_id]), top_k=5),
        SearchRequest(SearchQuery(product_id=products[20].product_id), top_k=12,
                      options=SearchOptions(exact_rerank=False, one_per_product=False)),  # raw merged Faiss scores
        SearchRequest(SearchQuery(product_id=products[5].product_id), top_k=6, options=SearchOptions(nprobe=1)),
        SearchRequest(SearchQuery(product_id=products[8].product_id), top_k=7,
                      filter=SearchFilter(in_stock_only=True, max_price=70.0)),  # selector + filter-aware probing
        SearchRequest(SearchQuery(vector=np.ones(index.dim, np.float32)), top_k=5,
                      filter=SearchFilter(categories=(products[1].category,)),
                      options=SearchOptions(exact_rerank=False)),
    ]
    return requests


def test_root_over_two_shard_servers_matches_a_standalone_server(cluster: Cluster, root: VisualSearchClient,
                                                                  reference: VisualSearchClient) -> None:
    assert root.index_info().version == cluster.index.version_path.name
    requests = sample_requests(cluster.index)
    for request in requests:
        got, expected = root.search(request), reference.search(request)
        assert not got.partial and got.missing_shards == ()
        assert got.hits and comparable(got) == comparable(expected), request
    items = root.batch_search(requests)  # grouped: one fan-out per (filter, nprobe)
    for request, item in zip(requests, items, strict=True):
        assert item.result is not None and not item.result.partial
        assert comparable(item.result) == comparable(reference.search(request))


def test_shard_server_answers_only_its_shards_and_refuses_another_version(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.shard_targets[1]) as channel:
        stub = shard_pb2_grpc.IndexShardStub(channel)
        query = search_pb2.Vector(values=[1.0] * cluster.index.dim)
        answer = stub.Search(shard_pb2.ShardSearchRequest(queries=[query, query], k=5,
                                                          index_version=cluster.index.version_path.name), timeout=10)
        assert list(answer.shards) == [1] and [c.shard for c in answer.candidates] == [1]
        assert len(answer.candidates[0].ids) == 2 * 5 and set(answer.candidates[0].ids) <= shard_ids(cluster, 1)
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(shard_pb2.ShardSearchRequest(queries=[query], k=5, index_version="20990101T000000Z"),
                        timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert cluster.index.version_path.name in (err.value.details() or "")
        # a direct caller asking for more candidates than the version holds (k near 2**31 made Faiss allocate
        # tens of GB per query): INVALID_ARGUMENT before any search; the whole version's count is still fine
        count = len(cluster.index.products)
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(shard_pb2.ShardSearchRequest(queries=[query], k=2**31 - 1,
                                                     index_version=cluster.index.version_path.name), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in (err.value.details() or "")
        answer = stub.Search(shard_pb2.ShardSearchRequest(queries=[query], k=count,
                                                          index_version=cluster.index.version_path.name), timeout=10)
        assert len(answer.candidates[0].ids) == count


def shard_ids(cluster: Cluster, shard: int) -> set[int]:
    """The internal ids stored in one Faiss shard file of the version."""
    from engine.probing import record_lists

    index = faiss.read_index(str(cluster.index.version_path / f"shard-{shard:03d}.faiss"))
    lists = np.full(len(cluster.index.products), -1, dtype=np.int32)
    record_lists(faiss.downcast_index(index), lists)  # `index` owns the C++ object: keep it referenced
    return set(np.flatnonzero(lists >= 0).tolist())


def test_a_stopped_shard_server_is_cut_off_at_the_shard_deadline(cluster: Cluster, root: VisualSearchClient,
                                                                  reference: VisualSearchClient) -> None:
    request = SearchRequest(SearchQuery(product_id=cluster.index.products[4].product_id), top_k=5)
    slow = cluster.shard_processes[1]
    os.kill(slow.pid, signal.SIGSTOP)  # alive and connected, but answers nothing: slower than any deadline
    try:
        began = time.monotonic()
        result = root.search(request)  # client deadline 20 s, per-shard deadline 2 s
        took = time.monotonic() - began
        assert result.partial and result.missing_shards == (1,)
        assert SHARD_TIMEOUT_MS / 1e3 * 0.9 <= took < SHARD_TIMEOUT_MS / 1e3 + 3.0
        with VisualSearchClient(f"127.0.0.1:{cluster.root_port}", timeout_s=0.8, retries=0) as hurried:
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                hurried.search(request)  # the shard call gets what is left of 0.8 s, not 2 s
            took = time.monotonic() - began
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and took < SHARD_TIMEOUT_MS / 1e3
    finally:
        os.kill(slow.pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while (result := root.search(request)).partial:  # it answers again once resumed
        assert time.monotonic() < deadline, "the resumed shard server never answered again"
        time.sleep(0.1)
    assert comparable(result) == comparable(reference.search(request))


def test_shard_servers_count_passing_vectors_over_the_whole_version(cluster: Cluster) -> None:
    """A prober over shard 1 that reads shard 0's list ids (memory-mapped) maps every id like one over both."""
    from engine.probing import ListProber

    paths = [str(cluster.index.version_path / f"shard-{s:03d}.faiss") for s in (0, 1)]
    both = [faiss.read_index(path) for path in paths]
    count = len(cluster.index.products)
    whole = ListProber.create(both, count)
    split = ListProber.create(both[1:], count, [faiss.read_index(paths[0], faiss.IO_FLAG_MMAP)])
    alone = ListProber.create(both[1:], count)
    assert whole is not None and split is not None and alone is not None
    assert np.array_equal(split.list_of_id, whole.list_of_id) and (whole.list_of_id >= 0).all()
    assert (alone.list_of_id < 0).sum() == len(shard_ids(cluster, 0))


def test_killed_shard_server_gives_partial_results_or_unavailable(cluster: Cluster, root: VisualSearchClient,
                                                                   tmp_path: Path) -> None:
    index = cluster.index
    cluster.shard_processes[1].kill()
    cluster.shard_processes[1].wait(timeout=30)
    request = SearchRequest(SearchQuery(vector=np.ones(index.dim, np.float32)), top_k=10)
    result = root.search(request)
    assert result.partial and result.missing_shards == (1,) and len(result.hits) == 10
    held = {index.products[i].product_id for i in shard_ids(cluster, 0)}
    assert {hit.product_id for hit in result.hits} <= held  # only shard 0's products
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{cluster.root_metrics_port}/metrics", timeout=10).read()
    text = metrics.decode()
    assert 'vitrine_partial_responses_total{method="Search"}' in text
    assert f'vitrine_shard_requests_total{{result="unavailable",shard_server="{cluster.shard_targets[1]}"}}' in text
    assert f'vitrine_shard_request_duration_seconds_count{{shard_server="{cluster.shard_targets[0]}"}}' in text

    strict_root = tmp_path / "index"  # a second root, in this process, with the require-all policy
    shutil.copytree(index.index_root, strict_root)
    server, port = create_server(ServerConfig(index_root=strict_root, port=0, role="root",
                                              shard_servers=cluster.shard_targets, require_all_shards=True,
                                              watch=False))
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=10.0, retries=0) as strict:
            with pytest.raises(grpc.RpcError) as err:
                strict.search(request)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shards 1 " in (err.value.details() or "")
            few = SearchFilter(categories=(index.products[1].category,))  # few products: scored at the root
            assert not strict.search(dataclasses.replace(request, filter=few)).partial
    finally:
        server.stop(None).wait()

    cluster.shard_processes[0].kill()
    cluster.shard_processes[0].wait(timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        root.search(request)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no shard server answered" in (err.value.details() or "")
    assert "shard server 127.0.0.1:" in (cluster.logs / "root.log").read_text()  # the loss was logged

