"""A client in another language: examples/node/search.js (grpc-js, the proto loaded at run time) against a real
server on a real port. It must get the same hits as the Python client, apply filters, batch, and report the
server's status codes. Needs `node` and `npm ci` in examples/node (`.ci/run` does it when npm is present)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_fixtures import REPO_ROOT, EngineIndex, build_engine_index, make_test_certs

from engine.client import VisualSearchClient
from engine.server import ServerConfig, create_server
from engine.types import SearchFilter

NODE_DIR = REPO_ROOT / "examples" / "node"
NODE = shutil.which("node")
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
                       reason="run `npm ci` in examples/node first"),
]


@pytest.fixture(scope="module")
def engine_index(tmp_path_factory: pytest.TempPathFactory) -> EngineIndex:
    return build_engine_index(tmp_path_factory.mktemp("node"))


@pytest.fixture(scope="module")
def target(engine_index: EngineIndex) -> Iterator[str]:
    server, port = create_server(ServerConfig(index_root=engine_index.index_root, port=0, max_workers=4))
    yield f"127.0.0.1:{port}"
    server.stop(None).wait()


def node(*args: str) -> subprocess.CompletedProcess:
    assert NODE is not None
    return subprocess.run([NODE, str(NODE_DIR / "search.js"), *args], capture_output=True, text=True, timeout=60)


def image_file(engine_index: EngineIndex, row: int, folder: Path) -> tuple[str, Path]:
    product = engine_index.products[row]
    path = folder / f"{product.product_id}.jpg"
    path.write_bytes(engine_index.images[product.product_id])
    return product.product_id, path


def test_node_search_by_image_matches_the_python_client(target: str, engine_index: EngineIndex,
                                                         tmp_path: Path) -> None:
    _, path = image_file(engine_index, 5, tmp_path)
    done = node("--target", target, "--image", str(path), "--top-k", "5", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    with VisualSearchClient(target) as client:
        expected = client.search_image(path.read_bytes(), top_k=5)
    assert answer["index_version"] == expected.index_version == engine_index.version_path.name
    assert [h["product_id"] for h in answer["hits"]] == [h.product_id for h in expected.hits]
    assert [h["score"] for h in answer["hits"]] == pytest.approx([h.score for h in expected.hits], abs=1e-5)
    first = answer["hits"][0]["product"]
    assert first["title"] and first["currency"] == "EUR" and first["price"] > 0
    table = node("--target", target, "--image", str(path), "--top-k", "3")
    assert table.returncode == 0 and table.stdout.splitlines()[1].startswith("rank")
    assert len(table.stdout.splitlines()) == 2 + 3 and expected.hits[0].product_id in table.stdout


def test_node_product_query_with_filters(target: str, engine_index: EngineIndex) -> None:
    product = engine_index.products[7]
    category = product.category
    done = node("--target", target, "--product-id", product.product_id, "--category", category, "--max-price", "50",
                "--in-stock", "--top-k", "10", "--json")
    assert done.returncode == 0, done.stderr
    hits = json.loads(done.stdout)["hits"]
    with VisualSearchClient(target) as client:
        expected = client.search_product(product.product_id, top_k=10,
                                         filter=SearchFilter(categories=(category,), max_price=50.0,
                                                             in_stock_only=True))
    assert [h["product_id"] for h in hits] == [h.product_id for h in expected.hits] and hits
    assert all(h["product"]["category"] == category and h["product"]["price"] <= 50 and h["product"]["in_stock"]
               for h in hits)
    assert product.product_id not in {h["product_id"] for h in hits}  # a product query leaves itself out


def test_node_batch_search_and_index_info(target: str, engine_index: EngineIndex, tmp_path: Path) -> None:
    ids_paths = [image_file(engine_index, row, tmp_path) for row in (3, 11)]
    done = node("--target", target, *[a for _, p in ids_paths for a in ("--image", str(p))], "--top-k", "4", "--json")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert [r["code"] for r in results] == [0, 0] and all(len(r["response"]["hits"]) == 4 for r in results)
    info = node("--target", target, "--info", "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["dim"] == engine_index.dim


def test_node_reports_the_servers_status_codes(target: str, tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is text, not a photo")
    done = node("--target", target, "--image", str(not_an_image))
    assert done.returncode == 1 and done.stderr.startswith("INVALID_ARGUMENT: ") and "image" in done.stderr
    done = node("--target", target, "--product-id", "no-such-product")
    assert done.returncode == 1 and done.stderr.startswith("NOT_FOUND: ")
    done = node("--target", target, "--product-id", "x", "--top-k", "5000")
    assert done.returncode == 1 and done.stderr.startswith("INVALID_ARGUMENT: ") and "top_k" in done.stderr


def test_node_usage_errors_and_unreachable_server(tmp_path: Path) -> None:
    assert node("--top-k", "many").returncode == 2
    assert node("--image", str(tmp_path / "missing.jpg")).returncode == 2
    done = node("--target", "127.0.0.1:1", "--info", "--retries", "1", "--deadline-ms", "2000")
    assert done.returncode == 1 and done.stderr.startswith("UNAVAILABLE: ")


def test_node_crop_matches_the_python_client(target: str, engine_index: EngineIndex, tmp_path: Path) -> None:
    _, path = image_file(engine_index, 7, tmp_path)
    done = node("--target", target, "--image", str(path), "--crop", "0,0.25,1,0.5", "--top-k", "5", "--json")
    assert done.returncode == 0, done.stderr
    with VisualSearchClient(target) as client:
        expected = client.search_image(path.read_bytes(), top_k=5, crop=(0.0, 0.25, 1.0, 0.5))
    assert [h["product_id"] for h in json.loads(done.stdout)["hits"]] == [h.product_id for h in expected.hits]
    bad = node("--target", target, "--image", str(path), "--crop", "0,0,2,1")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
    assert node("--target", target, "--product-id", "x", "--crop", "0,0,1,1").returncode == 2


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_node_over_mutual_tls(tmp_path: Path) -> None:
    """The Node client with --tls-ca / --tls-cert / --tls-key against a server that requires client certificates."""
    (tmp_path / "certs").mkdir()
    certs = make_test_certs(tmp_path / "certs")
    index = build_engine_index(tmp_path / "index")  # its own version: one process opens a version's LMDB once
    server, port = create_server(ServerConfig(index_root=index.index_root, port=0, max_workers=2, watch=False,
                                              tls_cert=certs / "server.pem", tls_key=certs / "server.key",
                                              tls_ca=certs / "ca.pem"))
    try:
        target = f"localhost:{port}"
        product = index.products[3].product_id
        done = node("--target", target, "--product-id", product, "--top-k", "3", "--json", "--tls-ca",
                    str(certs / "ca.pem"), "--tls-cert", str(certs / "client.pem"), "--tls-key",
                    str(certs / "client.key"))
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)["hits"]) == 3
        anonymous = node("--target", target, "--product-id", product, "--tls-ca", str(certs / "ca.pem"),
                         "--retries", "0", "--deadline-ms", "3000")
        assert anonymous.returncode == 1 and "UNAVAILABLE" in anonymous.stderr
        assert node("--target", target, "--info", "--tls-cert", str(certs / "client.pem")).returncode == 2
    finally:
        server.stop(None).wait()
