"""Operations through a real server on port 0: BatchSearch, Embed, metrics, concurrency limit, deadlines,
micro-batching, and the configuration precedence (defaults < file < environment < flags)."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from engine_fixtures import EngineIndex, build_engine_index
from PIL import Image

from engine.batcher import BatcherConfig, MicroBatcher
from engine.client import VisualSearchClient
from engine.config import ConfigError, ServerConfig, load_server_config
from engine.search import Searcher
from engine.server import VitrineServer, create_server
from engine.types import SearchFilter, SearchQuery, SearchRequest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def engine_index(tmp_path_factory: pytest.TempPathFactory) -> EngineIndex:
    return build_engine_index(tmp_path_factory.mktemp("ops"))


@pytest.fixture(scope="module")
def server(engine_index: EngineIndex) -> Iterator[tuple[VitrineServer, int]]:
    config = ServerConfig(index_root=engine_index.index_root, port=0, max_workers=8, metrics_port=0, watch=False)
    server, port = create_server(config)
    yield server, port
    server.stop(None).wait()


@pytest.fixture()
def client(server: tuple[VitrineServer, int]) -> Iterator[VisualSearchClient]:
    with VisualSearchClient(f"127.0.0.1:{server[1]}", timeout_s=20.0, backoff_s=0.05) as client:
        yield client


def test_batch_search_matches_single_searches(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    products = engine_index.products
    requests = [SearchRequest(SearchQuery(product_id=products[i].product_id), top_k=4) for i in range(5)]
    requests.append(SearchRequest(SearchQuery(image=engine_index.images[products[7].product_id]), top_k=3))
    requests.append(SearchRequest(SearchQuery(vector=np.ones(engine_index.dim, np.float32)), top_k=6,
                                  filter=SearchFilter(in_stock_only=True)))
    requests.append(SearchRequest(SearchQuery(product_id="no-such-product")))
    requests.append(SearchRequest(SearchQuery(image=b"not an image")))
    items = client.batch_search(requests)
    assert [item.code for item in items] == ["OK"] * 7 + ["NOT_FOUND", "INVALID_ARGUMENT"]
    assert "no-such-product" in items[7].message and "decode" in items[8].message
    for request, item in zip(requests[:7], items[:7], strict=True):
        single = client.search(request)
        assert item.result is not None
        assert [h.product_id for h in item.result.hits] == [h.product_id for h in single.hits]
    with pytest.raises(grpc.RpcError) as err:
        client.batch_search([])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1 to 1024" in (err.value.details() or "")
    results = client.search_vectors(np.eye(engine_index.dim, dtype=np.float32)[:3], top_k=2)
    assert [len(r.hits) for r in results] == [2, 2, 2]


def test_embed_returns_the_vector_search_uses(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    product = engine_index.products[11]
    embedding = client.embed(engine_index.images[product.product_id])
    assert embedding.vector.shape == (engine_index.dim,)
    assert float(np.linalg.norm(embedding.vector)) == pytest.approx(1.0, abs=1e-5)
    assert embedding.model_fingerprint == client.index_info().model_fingerprint
    by_vector = client.search_vector(embedding.vector, top_k=5)
    by_image = client.search_image(engine_index.images[product.product_id], top_k=5)
    assert [h.product_id for h in by_vector.hits] == [h.product_id for h in by_image.hits]
    for data, words in [(b"", "empty"), (b"GIF89a not supported", "decode")]:
        with pytest.raises(grpc.RpcError) as err:
            client.embed(data)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in (err.value.details() or "")


def test_metrics_endpoint(server: tuple[VitrineServer, int], client: VisualSearchClient,
                          engine_index: EngineIndex) -> None:
    client.search_image(engine_index.images[engine_index.products[0].product_id], top_k=2)
    with pytest.raises(grpc.RpcError):
        client.search_product("no-such-product")
    assert server[0].metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{server[0].metrics_port}/metrics", timeout=10).read().decode()
    assert 'vitrine_requests_total{code="OK",method="Search"}' in text
    assert 'vitrine_requests_total{code="NOT_FOUND",method="Search"}' in text
    for stage in ("decode", "embed", "search", "rerank"):
        assert f'vitrine_stage_duration_seconds_count{{stage="{stage}"}}' in text
    assert 'vitrine_request_duration_seconds_bucket{le="0.01",method="Search"}' in text
    assert f'version="{engine_index.version_path.name}"' in text and "vitrine_index_info{" in text
    assert "vitrine_embed_batch_size_count" in text


def test_concurrency_limit_answers_resource_exhausted(engine_index: EngineIndex, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(engine_index.index_root, tmp_path / "index")
    release = threading.Event()
    real_search = Searcher.search

    def slow_search(self: Searcher, request: SearchRequest, deadline: float | None = None):  # noqa: ANN202
        release.wait(20)
        return real_search(self, request, deadline)

    server, port = create_server(ServerConfig(index_root=tmp_path / "index", port=0, max_workers=8,
                                              max_concurrent_rpcs=2, watch=False))
    monkeypatch.setattr(Searcher, "search", slow_search)
    codes: list[str] = []
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=20.0, retries=0) as client:
            def call() -> None:
                try:
                    client.search_product(engine_index.products[0].product_id, top_k=1)
                    codes.append("OK")
                except grpc.RpcError as err:
                    codes.append(err.code().name)

            threads = [threading.Thread(target=call) for _ in range(5)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 20
            while codes.count("RESOURCE_EXHAUSTED") < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            release.set()
            for thread in threads:
                thread.join(30)
            assert sorted(codes) == ["OK", "OK"] + ["RESOURCE_EXHAUSTED"] * 3
            assert client.search_product(engine_index.products[1].product_id, top_k=1).hits  # still serving
    finally:
        release.set()
        server.stop(None).wait()


def test_deadline_exceeded_then_still_serving(engine_index: EngineIndex, tmp_path: Path) -> None:
    """A slow model: the call ends DEADLINE_EXCEEDED on time, the server counts it and keeps serving."""
    shutil.copytree(engine_index.index_root, tmp_path / "index")
    server, port = create_server(ServerConfig(index_root=tmp_path / "index", port=0, watch=False))
    real_forward = server.runner._forward

    def slow_embed(arrays):  # noqa: ANN001, ANN202
        time.sleep(2.0)  # far beyond the 0.2 s deadline, so a loaded CI machine's scheduling delay cannot blur it
        return real_forward(arrays)

    server.runner.batcher._embed_batch = slow_embed  # type: ignore[union-attr]
    try:
        image = engine_index.images[engine_index.products[0].product_id]
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=0.2, retries=0) as client:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                client.search_image(image)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 1.5
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=20.0) as client:
            assert client.search_image(image, top_k=2).hits
        time.sleep(0.6)
        assert 'code="DEADLINE_EXCEEDED",method="Search"' in server.metrics.text()
    finally:
        server.stop(None).wait()


def test_micro_batcher_groups_concurrent_images() -> None:
    sizes: list[int] = []

    def embed(images):  # noqa: ANN001, ANN202
        time.sleep(0.02)  # a model call takes a while, so queued images pile up
        return np.stack([np.full(4, np.asarray(im).mean(), np.float32) for im in images])

    batcher = MicroBatcher(embed, BatcherConfig(max_batch=8, max_wait_s=0.01), sizes.append)
    images = [Image.new("RGB", (4, 4), (v, v, v)) for v in range(40)]
    out: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, batcher.embed([images[i]])[0]))
               for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    batcher.close()
    assert all(out[i][0] == pytest.approx(i) for i in range(40))  # each caller gets its own row
    assert sum(sizes) == 40 and max(sizes) <= 8 and len(sizes) < 40


def test_config_precedence(tmp_path: Path) -> None:
    (tmp_path / "server.toml").write_text('[server]\nindex_root = "/from/file"\nport = 1111\nmax_batch = 7\n'
                                          'metrics_port = 9100\n')
    env = {"VITRINE_PORT": "2222", "VITRINE_MICRO_BATCH": "false", "VITRINE_METRICS_PORT": "none"}
    config = load_server_config(tmp_path / "server.toml", env, {"port": 3333, "max_workers": None})
    assert config == ServerConfig(index_root=Path("/from/file"), port=3333, max_batch=7, micro_batch=False,
                                  metrics_port=None)
    assert load_server_config(tmp_path / "server.toml", env, {}).port == 2222
    assert load_server_config(tmp_path / "server.toml", {}, {}).port == 1111
    (tmp_path / "server.json").write_text(json.dumps({"index_root": "/j", "poll_s": 0.5}))
    assert load_server_config(tmp_path / "server.json", {}, {}).poll_s == 0.5
    with pytest.raises(ConfigError, match="VITRINE_PORT"):
        load_server_config(None, {"VITRINE_PORT": "eighty", "VITRINE_INDEX_ROOT": "/x"})
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        (tmp_path / "bad.json").write_text(json.dumps({"index_root": "/j", "prot": 1}))
        load_server_config(tmp_path / "bad.json", {}, {})
    with pytest.raises(ConfigError, match="index root is not set"):
        load_server_config(None, {}, {})
    assert load_server_config(None, {"VITRINE_INDEX_ROOT": "/x", "VITRINE_PRECISION": "fp32"}, {}).precision == "fp32"
    with pytest.raises(ConfigError, match="precision must be auto, fp32 or bf16, got 'fp16'"):
        load_server_config(None, {"VITRINE_INDEX_ROOT": "/x"}, {"precision": "fp16"})


@pytest.mark.parametrize(("env", "message"), [
    ({"VITRINE_PORT": "70000"}, "port must be a TCP port in 0-65535"),  # was bound as 70000 % 65536 = 4464
    ({"VITRINE_PORT": "-1"}, "port must be a TCP port"),  # was bound as 65535
    ({"VITRINE_METRICS_PORT": "99999"}, "metrics_port must be a TCP port"),  # was an OverflowError traceback
    ({"VITRINE_HTTP_PORT": "65536"}, "http_port must be a TCP port"),
    ({"VITRINE_POLL_S": "0"}, "poll_s must be > 0"),
    ({"VITRINE_MAX_WORKERS": "0"}, "max_workers must be >= 1"),
    ({"VITRINE_GRACE_S": "-1"}, "grace_s must be >= 0"),
])
def test_config_out_of_range_is_an_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server_config(None, {"VITRINE_INDEX_ROOT": "/x", **env}, {})
