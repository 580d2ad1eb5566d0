"""The HTTP/JSON gateway (`vitrine serve --http-port`): the same answers as gRPC, over plain HTTP.

A real server (gRPC and HTTP on ports chosen by the OS) over a real index; requests go out with urllib,
as a web back end or curl would send them: an image body with query parameters, proto3 JSON bodies,
GET routes. Errors carry the gRPC code name and its HTTP status.
"""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_fixtures import EngineIndex, build_engine_index, create_server_held_at_load, free_port

from engine.client import VisualSearchClient
from engine.server import ServerConfig, create_server
from engine.types import SearchFilter

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def engine_index(tmp_path_factory: pytest.TempPathFactory) -> EngineIndex:
    return build_engine_index(tmp_path_factory.mktemp("engine-http"))


@pytest.fixture(scope="module")
def served(engine_index: EngineIndex) -> Iterator[tuple[Any, int]]:
    server, port = create_server(ServerConfig(index_root=engine_index.index_root, port=0, max_workers=4,
                                              http_port=0, http_cors_origin="https://shop.example.com",
                                              max_message_bytes=4 << 20))
    yield server, port
    server.stop(None).wait()


def http(server: Any, path: str, body: bytes | None = None, content_type: str = "application/json",
         method: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer) of one HTTP call to the gateway."""
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=body, method=method,
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_search_by_image_body_matches_grpc(served: tuple[Any, int], engine_index: EngineIndex) -> None:
    server, port = served
    product = engine_index.products[7]
    image = engine_index.images[product.product_id]
    status, answer = http(server, "/v1/search?top_k=5", image, "image/jpeg")
    assert status == 200, answer
    with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=10.0) as client:
        expected = client.search_image(image, top_k=5)
    assert [h["product_id"] for h in answer["hits"]] == [h.product_id for h in expected.hits]
    assert [h["score"] for h in answer["hits"]] == pytest.approx([h.score for h in expected.hits], abs=1e-6)
    assert answer["index_version"] == engine_index.version_path.name
    assert answer["hits"][0]["product"]["title"] == expected.hits[0].product.title
    # the same photo as `curl --data-binary @photo.jpg` sends it (form-urlencoded), and with no type at all: it
    # is recognised by its first bytes (it was parsed as JSON: "'utf-8' codec can't decode byte 0xff")
    for kind in ("application/x-www-form-urlencoded", ""):
        status, sniffed = http(server, "/v1/search?top_k=5", image, kind)
        assert status == 200, sniffed
        assert [h["product_id"] for h in sniffed["hits"]] == [h["product_id"] for h in answer["hits"]]
    status, refused = http(server, "/v1/search", image, "application/json")  # declared JSON stays JSON
    assert status == 400 and "JSON" in refused["message"]


def test_search_by_json_with_filter_matches_grpc(served: tuple[Any, int], engine_index: EngineIndex) -> None:
    server, port = served
    category = engine_index.products[0].category
    vector = np.random.default_rng(3).normal(size=engine_index.dim).astype(np.float32)
    body = {"vector": {"values": vector.tolist()}, "top_k": 8,
            "filter": {"categories": [category], "price": {"max": 80.0}, "in_stock_only": True},
            "options": {"one_per_product": True}}
    status, answer = http(server, "/v1/search", json.dumps(body).encode())
    assert status == 200, answer
    with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=10.0) as client:
        expected = client.search_vector(vector, top_k=8, filter=SearchFilter(
            categories=(category,), max_price=80.0, in_stock_only=True))
    assert [h["product_id"] for h in answer["hits"]] == [h.product_id for h in expected.hits] and expected.hits
    for hit in answer["hits"]:
        product = hit["product"]
        assert product["category"] == category and product["in_stock"] and product["price"] <= 80.0
    # the same through query parameters on an image body, and lowerCamelCase JSON
    image = engine_index.images[engine_index.products[2].product_id]
    status, by_query = http(server, f"/v1/search?top_k=3&category={category}&max_price=80&in_stock=true", image,
                            "image/jpeg")
    assert status == 200 and 0 < len(by_query["hits"]) <= 3
    assert all(h["product"]["category"] == category for h in by_query["hits"])
    camel = {"vector": {"values": vector.tolist()}, "topK": 8, "filter": {"categories": [category],
                                                                           "price": {"max": 80.0},
                                                                           "inStockOnly": True}}
    status, again = http(server, "/v1/search", json.dumps(camel).encode())
    assert status == 200 and [h["product_id"] for h in again["hits"]] == [h["product_id"] for h in answer["hits"]]


def test_crop_as_a_query_parameter_and_in_json(served: tuple[Any, int], engine_index: EngineIndex) -> None:
    server, _ = served
    product = engine_index.products[9]
    image = engine_index.images[product.product_id]
    status, whole = http(server, "/v1/embed", image, "image/jpeg")
    status, half = http(server, "/v1/embed?crop=0,0,1,0.5", image, "image/jpeg")
    assert status == 200 and half["vector"]["values"] != whole["vector"]["values"]
    body = {"image": base64.b64encode(image).decode(), "crop": {"x": 0, "y": 0, "width": 1, "height": 0.5},
            "top_k": 3}
    status, by_json = http(server, "/v1/search", json.dumps(body).encode())
    status2, by_query = http(server, "/v1/search?top_k=3&crop=0,0,1,0.5", image, "image/jpeg")
    assert status == status2 == 200 and by_json["hits"] == by_query["hits"]
    status, answer = http(server, "/v1/search?crop=0,0,1", image, "image/jpeg")
    assert status == 400 and "x,y,width,height" in answer["message"]
    status, answer = http(server, "/v1/search?crop=0,0,2,1", image, "image/jpeg")
    assert status == 400 and "must lie inside the image" in answer["message"]


def test_batch_embed_product_and_index_routes(served: tuple[Any, int], engine_index: EngineIndex) -> None:
    server, _ = served
    ids = [p.product_id for p in engine_index.products[:3]]
    body = {"requests": [{"product_id": ids[0], "top_k": 2}, {"product_id": "no-such-product"},
                         {"image": base64.b64encode(engine_index.images[ids[1]]).decode(), "top_k": 2}]}
    status, batch = http(server, "/v1/batch-search", json.dumps(body).encode())
    assert status == 200 and len(batch["results"]) == 3
    assert batch["results"][0]["code"] == 0 and len(batch["results"][0]["response"]["hits"]) == 2
    assert batch["results"][1]["code"] == 5 and "no-such-product" in batch["results"][1]["message"]
    status, embedded = http(server, "/v1/embed", engine_index.images[ids[2]], "image/jpeg")
    assert status == 200 and len(embedded["vector"]["values"]) == engine_index.dim
    assert np.linalg.norm(embedded["vector"]["values"]) == pytest.approx(1.0, abs=1e-4)
    status, product = http(server, f"/v1/products/{ids[0]}")
    assert status == 200 and product["product"]["product_id"] == ids[0]
    status, info = http(server, "/v1/index")
    assert status == 200 and int(info["count"]) == len(engine_index.products) and info["dim"] == engine_index.dim
    status, health = http(server, "/healthz")
    assert (status, health) == (200, {"status": "SERVING"})


def test_fields_at_their_default_are_in_the_json(served: tuple[Any, int], engine_index: EngineIndex) -> None:
    """A browser reads `answer.hits.length` and `result.code === 0`: an empty list, a zero code, a false flag are
    written (proto3 JSON omitted them: no "hits" key when a filter passed nothing); an unset price stays absent."""
    server, _ = served
    product = engine_index.products[0]
    body = {"product_id": product.product_id, "filter": {"categories": ["no such category"]}}
    status, answer = http(server, "/v1/search", json.dumps(body).encode())
    assert status == 200 and answer["hits"] == [] and answer["partial"] is False and answer["missing_shards"] == []
    status, batch = http(server, "/v1/batch-search", json.dumps({"requests": [body]}).encode())
    assert status == 200 and batch["results"][0]["code"] == 0 and batch["results"][0]["message"] == ""
    assert batch["results"][0]["response"]["hits"] == []
    out_of_stock = next(p for p in engine_index.products if not p.in_stock)
    status, answer = http(server, f"/v1/products/{out_of_stock.product_id}")
    assert status == 200 and answer["product"]["in_stock"] is False and answer["product"]["brand"] == ""
    assert answer["product"]["price"] == out_of_stock.price
    status, answer = http(server, "/v1/search?top_k=1", engine_index.images[product.product_id], "image/jpeg")
    assert status == 200 and answer["hits"][0]["product"]["image_url"] == "" and answer["partial"] is False


@pytest.mark.parametrize("path, body, kind, method, status, code, message", [
    ("/v1/search", b"not an image", "image/jpeg", None, 400, "INVALID_ARGUMENT", "not a recognised image"),
    ("/v1/search", b"{not json", "application/json", None, 400, "INVALID_ARGUMENT", "not a valid vitrine.v1"),
    ("/v1/search", b'{"vector": {"values": [1]}, "colour": "red"}', "application/json", None, 400,
     "INVALID_ARGUMENT", "colour"),
    ("/v1/search", b"{}", "application/json", None, 400, "INVALID_ARGUMENT", ""),
    ("/v1/search?top_k=many", b"x", "image/png", None, 400, "INVALID_ARGUMENT", "top_k='many' is not an integer"),
    ("/v1/search?colour=red", b"x", "image/png", None, 400, "INVALID_ARGUMENT", "unknown query parameters"),
    ("/v1/search?top_k=99999999999999", b"x", "image/png", None, 400, "INVALID_ARGUMENT", "top_k='99999999999999' "
                                                                                            "is out of range"),
    ("/v1/search?nprobe=-3000000000", b"x", "image/png", None, 400, "INVALID_ARGUMENT", "out of range"),
    ("/v1/products/nope", None, "application/json", None, 404, "NOT_FOUND", "nope"),
    ("/v1/nothing", None, "application/json", None, 404, "NOT_FOUND", "no such endpoint"),
    ("/v1/search", None, "application/json", "GET", 405, "UNIMPLEMENTED", "GET is not allowed"),
])
def test_errors_carry_the_grpc_code_and_its_http_status(served: tuple[Any, int], path: str, body: bytes | None,
                                                        kind: str, method: str | None, status: int, code: str,
                                                        message: str) -> None:
    got, answer = http(served[0], path, body, kind, method)
    assert (got, answer["code"]) == (status, code), answer
    assert message in answer["message"]


def test_messages_name_what_the_caller_sent(served: tuple[Any, int], engine_index: EngineIndex) -> None:
    """A bad X-Timeout-Ms header is named as the header (it was "query parameter timeout_ms"), a POST to a GET
    route answers 405 whether or not it has a body (without one: "a POST needs a Content-Length header"), a JSON
    body that is not an object says so (it was "Failed to parse 1 field")."""
    server, _ = served
    product_id = engine_index.products[0].product_id
    body = json.dumps({"product_id": product_id}).encode()
    status, answer = http(server, "/v1/search", body, headers={"X-Timeout-Ms": "soon"})
    assert status == 400 and answer["message"] == "header X-Timeout-Ms='soon' is not a number"
    status, answer = http(server, "/v1/search?timeout_ms=soon", body)
    assert status == 400 and answer["message"] == "query parameter timeout_ms='soon' is not a number"
    for path in (f"/v1/products/{product_id}", "/v1/index", "/healthz"):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:  # curl -X POST: no
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())     # Content-Length
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 405") and f"POST is not allowed on {path}".encode() in answer, answer
        assert http(server, path, b"{}", method="POST")[0] == 405
    assert http(server, "/v1/nothing", method="POST")[0] == 404
    status, answer = http(server, "/v1/search", b"[1, 2]")
    assert status == 400 and "must be a JSON object" in answer["message"], answer
    assert http(server, "/v1/search", body)[0] == 200  # the server keeps serving


def test_a_data_url_image_in_json_and_text_that_is_not_base64(served: tuple[Any, int],
                                                               engine_index: EngineIndex) -> None:
    """A browser's FileReader.readAsDataURL gives "data:image/jpeg;base64,...": its prefix became garbage bytes in
    front of the image ("not a recognised image"); text that is not base64 ("!!!") became an empty image."""
    server, _ = served
    image = engine_index.images[engine_index.products[4].product_id]
    encoded = base64.b64encode(image).decode()
    status, plain = http(server, "/v1/search", json.dumps({"image": encoded, "top_k": 3}).encode())
    assert status == 200
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))  # MIME line breaks
    for value in (f"data:image/jpeg;base64,{encoded}", f"DATA:image/jpeg;name=a.jpg;base64,{wrapped}",
                  base64.urlsafe_b64encode(image).decode().rstrip("=")):
        status, answer = http(server, "/v1/search", json.dumps({"image": value, "top_k": 3}).encode())
        assert status == 200 and answer["hits"] == plain["hits"], answer
        batch_body = json.dumps({"requests": [{"image": value, "top_k": 3}]}).encode()
        status, batch = http(server, "/v1/batch-search", batch_body)
        assert status == 200 and batch["results"][0]["response"]["hits"] == plain["hits"]
    for value in ("!!!", "data:image/jpeg,not-base64-at-all!"):
        status, answer = http(server, "/v1/embed", json.dumps({"image": value}).encode())
        assert status == 400 and "not base64" in answer["message"], answer


def test_query_parameters_beside_a_json_body_are_refused(served: tuple[Any, int], engine_index: EngineIndex) -> None:
    """Options as query parameters apply to a raw image body; beside a JSON body they were silently ignored
    (a category filter in the URL answered unfiltered hits). Only timeout_ms goes with a JSON body."""
    server, _ = served
    product_id = engine_index.products[3].product_id
    other = next(p.category for p in engine_index.products if p.category != engine_index.products[3].category)
    body = json.dumps({"product_id": product_id}).encode()
    for path in (f"/v1/search?top_k=3&category={other}", "/v1/batch-search?in_stock=true", "/v1/embed?crop=0,0,1,1"):
        status, answer = http(server, path, body if "batch" not in path else b'{"requests": [{}]}')
        assert status == 400 and "query parameters" in answer["message"] and "JSON" in answer["message"], answer
    status, answer = http(server, "/v1/search?timeout_ms=10000", body)
    assert status == 200 and len(answer["hits"]) == 10


def test_an_oversized_body_is_refused_unread(served: tuple[Any, int]) -> None:
    server, _ = served
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 999999999\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            chunks.append(chunk)
        answer = b"".join(chunks).decode()
    assert answer.startswith("HTTP/1.1 413") and "over the limit of 4194304 bytes" in answer


def test_deadline_and_cors(served: tuple[Any, int], engine_index: EngineIndex) -> None:
    server, _ = served
    image = engine_index.images[engine_index.products[1].product_id]
    status, answer = http(server, "/v1/search", image, "image/jpeg", headers={"X-Timeout-Ms": "0.001"})
    assert (status, answer["code"]) == (504, "DEADLINE_EXCEEDED")
    status, answer = http(server, "/v1/search?timeout_ms=-5", image, "image/jpeg")
    assert status == 400 and "timeout_ms must be positive" in answer["message"]
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/search", method="OPTIONS",
                                     headers={"Origin": "https://shop.example.com",
                                              "Access-Control-Request-Method": "POST"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example.com"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/healthz")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example.com"


@pytest.mark.parametrize("timeout_ms", ["1e300", "inf", "nan"])
def test_a_huge_or_non_finite_timeout(served: tuple[Any, int], engine_index: EngineIndex, timeout_ms: str) -> None:
    """A deadline too far away to wait on is no deadline (it was INTERNAL: OverflowError in the embedding
    wait); NaN is refused like any timeout that is not positive."""
    server, _ = served
    image = engine_index.images[engine_index.products[1].product_id]
    status, answer = http(server, "/v1/search?top_k=3", image, "image/jpeg", headers={"X-Timeout-Ms": timeout_ms})
    if timeout_ms == "nan":
        assert status == 400 and "header X-Timeout-Ms must be positive" in answer["message"]
    else:
        assert status == 200 and len(answer["hits"]) == 3, answer


def test_health_says_not_serving_once_stopping(tmp_path: Path) -> None:
    own = build_engine_index(tmp_path)  # its own version: one process opens a version's LMDB once
    server, _ = create_server(ServerConfig(index_root=own.index_root, port=0, max_workers=2, http_port=0,
                                           watch=False))
    try:
        assert http(server, "/healthz") == (200, {"status": "SERVING"})
        server.serving.clear()  # what stop() does first, before the grace period
        assert http(server, "/healthz") == (503, {"status": "NOT_SERVING"})
    finally:
        server.stop(None).wait()
    with pytest.raises(urllib.error.URLError):
        http(server, "/healthz")  # closed with the server


def test_the_gateway_answers_503_while_the_server_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As gRPC does (health NOT_SERVING, UNAVAILABLE): /healthz says NOT_SERVING and calls answer 503 while the
    index and model load; the gateway was bound only once loaded, so HTTP clients got "connection refused"."""
    import threading

    own = build_engine_index(tmp_path)
    http_port = free_port()
    release, thread, started = create_server_held_at_load(monkeypatch, ServerConfig(
        index_root=own.index_root, port=0, max_workers=2, http_port=http_port, watch=False))
    loading = type("Loading", (), {"http_port": http_port})()
    try:
        for _ in range(200):  # the gateway binds right after gRPC, before the load
            try:
                assert http(loading, "/healthz") == (503, {"status": "NOT_SERVING"})
                break
            except urllib.error.URLError:
                threading.Event().wait(0.05)
        else:
            pytest.fail("the HTTP gateway was not up while the server loaded")
        product = own.products[0]
        status, answer = http(loading, f"/v1/products/{product.product_id}")
        assert (status, answer["code"]) == (503, "UNAVAILABLE") and "loading" in answer["message"]
        status, answer = http(loading, "/v1/embed", own.images[product.product_id], "image/jpeg")
        assert (status, answer["code"]) == (503, "UNAVAILABLE") and "loading" in answer["message"]
        release.set()
        thread.join(60)
        server, _ = started[0]
        assert server.http_port == http_port and http(server, "/healthz") == (200, {"status": "SERVING"})
        status, answer = http(server, f"/v1/products/{product.product_id}")
        assert status == 200 and answer["product"]["product_id"] == product.product_id
    finally:
        release.set()
        thread.join(60)
        for server, _ in started:
            server.stop(None).wait()


def test_an_idle_connection_is_closed_and_frees_its_thread() -> None:
    """A keep-alive client that goes quiet (or never sends a request) is disconnected after the idle timeout."""
    import threading
    import time

    from engine.http_gateway import HttpGateway

    gateway = HttpGateway(servicer=None, is_serving=lambda: True, host="127.0.0.1", port=0, idle_timeout_s=0.5)
    gateway.start()
    try:
        before = threading.active_count()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as quiet, \
                socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as served_once:
            served_once.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'"SERVING"}'):  # headers and body may come in separate packets
                chunk = served_once.recv(4096)
                assert chunk, f"closed before the whole answer: {answer!r}"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            assert quiet.recv(1) == b"" and served_once.recv(1) == b""  # both closed by the server
            assert time.monotonic() - start < 5
        deadline = time.monotonic() + 5
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before, "the connection threads ended"
    finally:
        gateway.close()
