"""A publish in remote shard mode costs no partial answer: real root and shard server processes on loopback.

The root and the shard servers watch different index roots that hold the same version folders (the
shards' are symlinks), so the test decides who sees a new CURRENT first:

1. the root first: it must not swap while its shard servers still serve the old version (it would
   get no candidates from them), and keeps serving the old one whole;
2. then the shard servers: they swap and keep the old version open for the root, which swaps next.

Meanwhile a client searches the root without a pause: every answer must be whole (no missing shard)
and error-free, from the old version and then the new one.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from engine_fixtures import FACTORY, build_engine_index, free_port, serve_process, stop_processes

from engine.client import VisualSearchClient
from indexer.build import build_index_from_vectors
from indexer.version import open_version, publish_current
from protos.vitrine.v1 import search_pb2, shard_pb2, shard_pb2_grpc

pytestmark = pytest.mark.timeout(400)

NEW_VERSION = "20990101T000000Z"


def shard_search(target: str, dim: int, version: str) -> shard_pb2.ShardSearchResponse:
    with grpc.insecure_channel(target) as channel:
        query = search_pb2.Vector(values=[1.0] * dim)
        return shard_pb2_grpc.IndexShardStub(channel).Search(
            shard_pb2.ShardSearchRequest(queries=[query], k=3, index_version=version), timeout=10)


@pytest.fixture()
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        stop_processes(started)


def test_a_publish_in_remote_shard_mode_costs_no_partial_answer(tmp_path: Path,
                                                                 processes: list[subprocess.Popen]) -> None:
    index = build_engine_index(tmp_path)  # the root's index root: tmp_path/index
    old = index.version_path.name
    with open_version(index.version_path) as version:  # the new version: same products, same vectors
        vectors = version.vectors_of(np.arange(version.count))
        products = version.products(np.arange(version.count))
        fingerprint = version.model_fingerprint
    shard_root = tmp_path / "shard-index"
    shard_root.mkdir()
    (shard_root / old).symlink_to(index.version_path, target_is_directory=True)
    publish_current(shard_root, old)

    shard_ports, root_port = [free_port(), free_port()], free_port()
    for shard, port in enumerate(shard_ports):
        processes.append(serve_process(["--index-root", str(shard_root), "--role", "shard", "--shards", str(shard),
                                        "--port", str(port), "--poll-s", "0.1"],
                                       tmp_path / f"shard-{shard}.log"))
    targets = [f"127.0.0.1:{port}" for port in shard_ports]
    processes.append(serve_process(["--index-root", str(index.index_root), "--role", "root", "--shard-servers",
                                    ",".join(targets), "--port", str(root_port), "--shard-timeout-ms", "5000",
                                    "--poll-s", "0.1"],
                                   tmp_path / "root.log"))
    for port, service in [(shard_ports[0], "vitrine.v1.IndexShard"), (shard_ports[1], "vitrine.v1.IndexShard"),
                          (root_port, "")]:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=5.0) as client:
            client.wait_ready(timeout_s=120.0, service=service)

    answers: list[tuple[str, bool, int]] = []  # (version, partial, hits) of every search during the test
    errors: list[str] = []
    stop = threading.Event()

    def search_without_pause() -> None:
        rng = np.random.default_rng(3)
        with VisualSearchClient(f"127.0.0.1:{root_port}", timeout_s=20.0, retries=0) as client:
            while not stop.is_set():
                try:
                    result = client.search_vector(rng.normal(size=index.dim).astype(np.float32), top_k=10)
                    answers.append((result.index_version, result.partial, len(result.hits)))
                except grpc.RpcError as err:
                    errors.append(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]

    searcher = threading.Thread(target=search_without_pause)
    searcher.start()
    try:
        new = build_index_from_vectors(vectors, products, index.index_root, fingerprint, index.model_dir, FACTORY,
                                       nprobe=2, num_shards=2, min_recall_at_10=0.0, validation_queries=16,
                                       publish=False, name=NEW_VERSION)
        (shard_root / new.name).symlink_to(new, target_is_directory=True)

        # 1. the root sees the new version first: it waits for its shard servers
        publish_current(index.index_root, new.name)
        deadline = time.monotonic() + 30
        while "waits, still serving" not in (tmp_path / "root.log").read_text():
            assert time.monotonic() < deadline, "the root never deferred its swap"
            time.sleep(0.1)
        time.sleep(1.0)  # ten more polls
        with VisualSearchClient(f"127.0.0.1:{root_port}", timeout_s=10.0) as client:
            assert client.index_info().version == old
        with pytest.raises(grpc.RpcError) as err:
            shard_search(targets[0], index.dim, new.name)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        # 2. the shard servers swap (keeping the old version for the root), then the root
        publish_current(shard_root, new.name)
        deadline = time.monotonic() + 60
        with VisualSearchClient(f"127.0.0.1:{root_port}", timeout_s=10.0) as client:
            while client.index_info().version != new.name:
                assert time.monotonic() < deadline, "the root never swapped to the new version"
                time.sleep(0.05)
        for target in targets:  # both versions answered by each shard server
            assert shard_search(target, index.dim, old).index_version == old
            assert shard_search(target, index.dim, new.name).index_version == new.name
        time.sleep(0.5)  # searches on the new version
    finally:
        stop.set()
        searcher.join(60)
    assert not errors, errors[:5]
    seen = {version for version, _, _ in answers}
    assert seen == {old, new.name}, seen
    partial = [a for a in answers if a[1] or a[2] != 10]
    assert not partial, f"{len(partial)} of {len(answers)} answers were partial or short: {partial[:5]}"


def test_a_shard_server_rolls_back_to_the_version_it_keeps_open(tmp_path: Path) -> None:
    """A rollback names the version a shard server swapped away from and still holds open: it goes back to
    serving it (opening it a second time failed, LMDB refuses that, and the rollback was refused for good)."""
    from engine.config import ServerConfig
    from engine.shard_server import create_shard_server

    index = build_engine_index(tmp_path)
    old = index.version_path.name
    with open_version(index.version_path) as version:
        vectors = version.vectors_of(np.arange(version.count))
        products = version.products(np.arange(version.count))
        fingerprint = version.model_fingerprint
    new = build_index_from_vectors(vectors, products, index.index_root, fingerprint, index.model_dir, FACTORY,
                                   nprobe=2, num_shards=2, min_recall_at_10=0.0, validation_queries=16,
                                   publish=False, name=NEW_VERSION)
    server, port = create_shard_server(ServerConfig(index_root=index.index_root, port=0, role="shard",
                                                    shards=(0, 1), poll_s=0.05))
    target = f"127.0.0.1:{port}"
    watcher = server.watcher
    assert watcher is not None

    def wait_for(name: str) -> None:
        deadline = time.monotonic() + 30
        while server.slot.current is None or server.slot.current.version.name != name:
            assert time.monotonic() < deadline, f"the shard server never swapped to {name}: {watcher.refused}"
            time.sleep(0.02)

    try:
        publish_current(index.index_root, new.name)
        wait_for(new.name)
        publish_current(index.index_root, old)  # the rollback
        wait_for(old)
        assert not watcher.refused
        assert shard_search(target, index.dim, old).index_version == old
        assert shard_search(target, index.dim, new.name).index_version == new.name  # now the kept previous one
        publish_current(index.index_root, new.name)  # and forward again
        wait_for(new.name)
        assert shard_search(target, index.dim, "").index_version == new.name
        assert server.slot.closed_versions == 0 and not watcher.refused
    finally:
        server.stop(None).wait()
