"""Hot swap through a real server: CURRENT changes are picked up, in-flight requests finish on the old
version, a version built with another model is refused (the old one keeps serving), and memory stays
flat over 20 swaps."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import build_engine_index, load_products

from engine.client import VisualSearchClient
from engine.search import Searcher
from engine.server import ServerConfig, create_server
from engine.swap import SearcherSlot, SwapDeferred, VersionWatcher
from indexer.build import build_index_from_vectors
from indexer.version import publish_current

pytestmark = pytest.mark.timeout(180)


def hold_searches_of_top_k_7(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """(entered, release): a Search with top_k 7 -- only the request a test holds in flight -- sets `entered`
    and waits for `release` before it runs."""
    entered, release = threading.Event(), threading.Event()
    real_search = Searcher.search

    def held_search(self: Searcher, request, deadline=None):  # noqa: ANN001, ANN202
        if request.top_k == 7:
            entered.set()
            assert release.wait(30)
        return real_search(self, request, deadline)

    monkeypatch.setattr(Searcher, "search", held_search)
    return entered, release


def wait_for_version(client: VisualSearchClient, name: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.index_info().version != name:
        assert time.monotonic() < deadline, f"the server never swapped to {name}"
        time.sleep(0.02)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def synthetic_version(index_root: Path, fingerprint: str, model_dir: Path, n: int, dim: int, seed: int,
                      name: str) -> Path:
    """A version of n random vectors whose products repeat the mini catalog's (ids made unique)."""
    import dataclasses

    rng = np.random.default_rng(seed)
    xb = rng.normal(size=(n, dim)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    base, _ = load_products(50)
    products = [dataclasses.replace(base[i % len(base)], product_id=f"s{seed}-{i}") for i in range(n)]
    return build_index_from_vectors(xb, products, index_root, fingerprint, model_dir, "IVF64,Flat", nprobe=4,
                                    min_recall_at_10=0.0, validation_queries=16, publish=False, name=name)


def test_hot_swap_in_flight_requests_and_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    index = build_engine_index(tmp_path)
    fingerprint = load_fingerprint(index.version_path)
    new = synthetic_version(index.index_root, fingerprint, index.model_dir, 3000, index.dim, 1, "20990101T000000Z")
    other_model = synthetic_version(index.index_root, "0" * 64, index.model_dir, 3000, index.dim, 2,
                                    "20990101T000001Z")
    server, port = create_server(ServerConfig(index_root=index.index_root, port=0, poll_s=0.05, max_workers=4))
    entered, release = hold_searches_of_top_k_7(monkeypatch)
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=30.0) as client:
            old = client.index_info().version
            answers: list = []
            held = threading.Thread(target=lambda: answers.append(
                client.search_vector(np.ones(index.dim, np.float32), top_k=7)))
            held.start()
            assert entered.wait(30)
            publish_current(index.index_root, new.name)
            wait_for_version(client, new.name)  # new requests see the new version at once
            assert server.slot.closed_versions == 0  # the old one is still leased by the held request
            release.set()
            held.join(30)
            assert answers[0].index_version == old and len(answers[0].hits) == 7
            assert server.slot.closed_versions == 1
            assert client.search_product("s1-5", top_k=3).index_version == new.name
            with caplog.at_level(logging.INFO, logger="vitrine.engine"):
                publish_current(index.index_root, other_model.name)
                deadline = time.monotonic() + 30
                while "refused" not in caplog.text:
                    assert time.monotonic() < deadline, "the mismatching version was never refused"
                    time.sleep(0.05)
            assert "fingerprint" in caplog.text and other_model.name in caplog.text
            assert client.index_info().version == new.name  # the old version keeps serving
            assert client.search_product("s1-5", top_k=3).hits
            assert 'vitrine_index_swaps_total{result="refused"} 1.0' in server.metrics.text()
    finally:
        release.set()
        server.stop(None).wait()


def load_fingerprint(version_path: Path) -> str:
    import json

    return json.loads((version_path / "manifest.json").read_text())["model_fingerprint"]


def test_memory_does_not_grow_over_20_swaps(tmp_path: Path) -> None:
    index = build_engine_index(tmp_path)
    fingerprint = load_fingerprint(index.version_path)
    n = 150_000  # ~10 MB of Faiss index per version: a leaked version per swap would show clearly
    versions = [synthetic_version(index.index_root, fingerprint, index.model_dir, n, index.dim, seed,
                                  f"2099010{seed}T000000Z") for seed in (1, 2)]
    version_mb = sum(f.stat().st_size for f in versions[0].glob("shard-*.faiss")) / 2**20
    server, port = create_server(ServerConfig(index_root=index.index_root, port=0, poll_s=0.02, max_workers=2))
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=30.0) as client:
            rss = []
            for swap in range(20):
                target = versions[swap % 2]
                publish_current(index.index_root, target.name)
                wait_for_version(client, target.name)
                for _ in range(3):
                    assert len(client.search_vector(np.ones(index.dim, np.float32), top_k=5).hits) == 5
                rss.append(rss_mb())
            assert server.slot.closed_versions == 20  # the first (fixture) version and 19 swapped-out ones
        growth = rss[-1] - rss[3]
        assert growth < 2 * version_mb, f"RSS grew {growth:.1f} MiB over 16 swaps (one version: {version_mb:.1f} MiB)"
    finally:
        server.stop(None).wait()


class FakeVersion:
    """Just what SearcherSlot needs of an IndexVersion: a name and close()."""

    factory, count = "Flat", 0

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeServed:
    def __init__(self, name: str) -> None:
        self.version = FakeVersion(name)


def test_a_keep_previous_slot_leases_the_previous_version_by_name_until_the_next_swap() -> None:
    slot: SearcherSlot[FakeServed] = SearcherSlot(keep_previous=True)
    v1, v2, v3 = FakeServed("v1"), FakeServed("v2"), FakeServed("v3")
    slot.install(v1)  # type: ignore[arg-type]
    slot.install(v2)  # type: ignore[arg-type]
    assert slot.previous is v1 and not v1.version.closed
    with slot.lease("v1") as served:
        assert served is v1
        slot.install(v3)  # v1 retires while leased: closed when the lease ends, v2 is now the previous
        assert not v1.version.closed and slot.previous is v2
    assert v1.version.closed and slot.closed_versions == 1
    with slot.lease("v2") as a, slot.lease("v3") as b, slot.lease() as c, slot.lease("v0") as d:
        assert (a, b, c, d) == (v2, v3, v3, v3)  # an unknown name gets the current one (the caller refuses it)
    slot.install(None)  # shutdown closes both
    assert v2.version.closed and v3.version.closed and slot.previous is None


def test_a_plain_slot_closes_the_replaced_version() -> None:
    slot: SearcherSlot[FakeServed] = SearcherSlot()
    v1, v2 = FakeServed("v1"), FakeServed("v2")
    slot.install(v1)  # type: ignore[arg-type]
    slot.install(v2)  # type: ignore[arg-type]
    assert v1.version.closed and slot.previous is None
    with slot.lease("v1") as served:
        assert served is v2


def test_a_deferred_swap_is_retried_at_the_next_poll_and_logged_once(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "CURRENT").write_text("v2\n")
    slot: SearcherSlot[FakeServed] = SearcherSlot()
    slot.install(FakeServed("v1"))  # type: ignore[arg-type]
    ready: list[bool] = [False]
    results: list[str] = []

    def load(name: str) -> FakeServed:
        if not ready[0]:
            raise SwapDeferred("shard servers 127.0.0.1:1 do not serve index version v2 yet")
        return FakeServed(name)

    watcher = VersionWatcher(tmp_path, slot, load, 0.01, on_result=results.append)  # type: ignore[arg-type,type-var]
    with caplog.at_level(logging.INFO, logger="vitrine.engine"):
        assert [watcher.check_once() for _ in range(3)] == ["deferred"] * 3
        assert slot.current is not None and slot.current.version.name == "v1" and not watcher.refused
        assert caplog.text.count("waits, still serving v1") == 1 and results == ["deferred"]
        ready[0] = True
        assert watcher.check_once() == "swapped"
    assert slot.current.version.name == "v2" and results == ["deferred", "swapped"] and not watcher.deferred


def test_an_unreadable_current_is_logged_once_per_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A missing CURRENT was logged at every poll (every 2 s by default) for as long as it stayed missing."""
    slot: SearcherSlot[FakeServed] = SearcherSlot()
    slot.install(FakeServed("v1"))  # type: ignore[arg-type]
    watcher = VersionWatcher(tmp_path, slot, FakeServed, 0.01)  # type: ignore[arg-type,type-var]
    with caplog.at_level(logging.INFO, logger="vitrine.engine"):
        assert [watcher.check_once() for _ in range(5)] == ["unreadable"] * 5
        assert caplog.text.count("cannot read CURRENT") == 1 and "still serving v1" in caplog.text
        (tmp_path / "CURRENT").write_text("v1\n")
        assert watcher.check_once() == "unchanged" and "readable again" in caplog.text
        (tmp_path / "CURRENT").unlink()
        assert watcher.check_once() == "unreadable"
        assert caplog.text.count("cannot read CURRENT") == 2  # missing again after it was back: said again


def test_a_rollback_to_a_version_still_closing_is_served_once_it_closed(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Publish, then roll back while a request still holds the old version: opening it again fails while it is
    open (LMDB: once per process), so the swap waits for it to close instead of refusing it for good."""
    from engine_fixtures import FACTORY

    from indexer.version import open_version

    index = build_engine_index(tmp_path)
    old = index.version_path.name
    with open_version(index.version_path) as version:
        vectors, products = version.vectors_of(np.arange(version.count)), version.products(np.arange(version.count))
    new = build_index_from_vectors(vectors, products, index.index_root, load_fingerprint(index.version_path),
                                   index.model_dir, FACTORY, nprobe=2, num_shards=2, min_recall_at_10=0.0,
                                   validation_queries=16, publish=False, name="20990101T000000Z")
    server, port = create_server(ServerConfig(index_root=index.index_root, port=0, poll_s=0.05, max_workers=4))
    entered, release = hold_searches_of_top_k_7(monkeypatch)
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=30.0) as client:
            held = threading.Thread(target=lambda: client.search_vector(np.ones(index.dim, np.float32), top_k=7))
            held.start()
            assert entered.wait(30)
            publish_current(index.index_root, new.name)
            wait_for_version(client, new.name)
            publish_current(index.index_root, old)  # the rollback, while the old version is still leased
            time.sleep(0.5)  # ten polls
            assert client.index_info().version == new.name
            release.set()
            held.join(30)
            wait_for_version(client, old)
            assert server.watcher is not None and not server.watcher.refused
            assert client.search_product(products[0].product_id, top_k=3).index_version == old
    finally:
        release.set()
        server.stop(None).wait()


def test_a_refused_version_is_tried_again_only_when_current_is_published_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A refused version was never tried again, even after its files were repaired and it was published again
    (`index rollback --to` it): the server had to be restarted to serve it."""
    (tmp_path / "20990101T000000Z").mkdir()
    (tmp_path / "20990101T000000Z" / "manifest.json").write_text("{}")  # publish_current wants one; load is faked
    publish_current(tmp_path, "20990101T000000Z")
    slot: SearcherSlot[FakeServed] = SearcherSlot()
    slot.install(FakeServed("v1"))  # type: ignore[arg-type]
    broken = [True]
    loads: list[str] = []

    def load(name: str) -> FakeServed:
        loads.append(name)
        if broken[0]:
            raise OSError(f"shard-000.faiss of {name}: permission denied")
        return FakeServed(name)

    watcher = VersionWatcher(tmp_path, slot, load, 0.01)  # type: ignore[arg-type,type-var]
    with caplog.at_level(logging.INFO, logger="vitrine.engine"):
        assert [watcher.check_once() for _ in range(3)] == ["refused", "unchanged", "unchanged"]
        assert loads == ["20990101T000000Z"] and caplog.text.count("refused index version") == 1
        broken[0] = False  # the operator repairs the files ...
        assert watcher.check_once() == "unchanged"  # ... which alone is not a request to load it again
        publish_current(tmp_path, "20990101T000000Z")  # ... and publishes it again
        assert watcher.check_once() == "swapped" and "published again" in caplog.text
    assert slot.current is not None and slot.current.version.name == "20990101T000000Z" and not watcher.refused
