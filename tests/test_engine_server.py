"""End to end through a real gRPC server on port 0: searches, filters, index info, health, reflection, errors."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from engine_fixtures import EngineIndex, build_engine_index, create_server_held_at_load, free_port, make_checkpoint

from engine.client import VisualSearchClient, format_results_table
from engine.server import ServerConfig, ServerStartError, create_server
from engine.types import SearchFilter, SearchOptions

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def engine_index(tmp_path_factory: pytest.TempPathFactory) -> EngineIndex:
    return build_engine_index(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def server(engine_index: EngineIndex) -> Iterator[tuple[grpc.Server, int]]:
    server, port = create_server(ServerConfig(index_root=engine_index.index_root, port=0, max_workers=4))
    yield server, port
    server.stop(None).wait()


@pytest.fixture()
def client(server: tuple[grpc.Server, int]) -> Iterator[VisualSearchClient]:
    with VisualSearchClient(f"127.0.0.1:{server[1]}", timeout_s=10.0, backoff_s=0.05) as client:
        yield client


def test_health_serving_and_reflection(client: VisualSearchClient) -> None:
    client.wait_ready(timeout_s=5.0)
    assert client.health("") == "SERVING"
    assert client.health("vitrine.v1.VisualSearch") == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client._channel)
    answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert "vitrine.v1.VisualSearch" in names


def test_index_info(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    info = client.index_info()
    assert info.version == engine_index.version_path.name
    assert (info.count, info.dim, info.shard_count, info.metric) == (len(engine_index.products), engine_index.dim,
                                                                     2, "inner_product")
    assert "IVF4" in info.factory and len(info.model_fingerprint) == 64 and info.created_utc is not None
    from model.checkpoint import load_model_card
    from model.images import DECODE_MARGIN

    height, width = load_model_card(engine_index.model_dir)["input_size"]
    assert info.query_image_size == (DECODE_MARGIN * width, DECODE_MARGIN * height)  # what a client may shrink to


def test_filter_values_match_exactly_and_an_unknown_one_matches_nothing(client: VisualSearchClient,
                                                                        engine_index: EngineIndex) -> None:
    """What search.proto's Filter says: case-sensitive exact matches, an unknown value is no error but no hit,
    brand "" accepts the products whose brand is unknown (the fixture catalog has no brand column)."""
    product = engine_index.products[0]
    assert product.brand == "" and product.category
    hits = client.search_product(product.product_id, top_k=5,
                                 filter=SearchFilter(categories=(product.category,))).hits
    assert hits and all(h.product.category == product.category for h in hits)
    for wrong in (product.category.lower(), product.category.upper(), f" {product.category}", "no such category"):
        assert client.search_product(product.product_id, filter=SearchFilter(categories=(wrong,))).hits == ()
    assert client.search_product(product.product_id, filter=SearchFilter(brands=("Nike",))).hits == ()
    assert len(client.search_product(product.product_id, top_k=5, filter=SearchFilter(brands=("",))).hits) == 5


def test_search_by_image_finds_itself(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    product = engine_index.products[5]
    result = client.search_image(engine_index.images[product.product_id], top_k=5)
    assert result.index_version == engine_index.version_path.name
    assert len(result.hits) == 5
    own = [h for h in result.hits if h.product_id == product.product_id]  # untrained model: near-ties possible
    assert own and own[0].score == pytest.approx(result.hits[0].score, abs=1e-3)
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0, abs=1e-2)
    assert result.hits[0].product.title
    table = format_results_table(result)
    assert "rank" in table.splitlines()[0] and result.hits[0].product_id in table


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_search_by_phone_format_image(client: VisualSearchClient, engine_index: EngineIndex, fmt: str) -> None:
    """A catalog photo re-encoded as HEIC (iPhone) or AVIF finds the same product as its JPEG."""
    import io

    from model.images import decode_image

    product = engine_index.products[5]
    buffer = io.BytesIO()
    decode_image(engine_index.images[product.product_id]).save(buffer, format=fmt, quality=95)
    result = client.search_image(buffer.getvalue(), top_k=5)
    jpeg = client.search_image(engine_index.images[product.product_id], top_k=5)
    assert product.product_id in {h.product_id for h in result.hits}
    assert result.hits[0].score == pytest.approx(jpeg.hits[0].score, abs=0.05)


def test_search_by_a_48_megapixel_phone_jpeg(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    """A full-resolution 48 MP photo (over the server's 40 MP decode limit) is decoded at reduced scale, not
    refused, and finds the product like its small JPEG does."""
    import io

    from PIL import Image

    from model.images import decode_image

    product = engine_index.products[5]
    photo = decode_image(engine_index.images[product.product_id]).resize((6048, 8064), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=80)
    assert 6048 * 8064 > 40_000_000 and len(buffer.getvalue()) < 16 << 20
    result = client.search_image(buffer.getvalue(), top_k=5)
    small = client.search_image(engine_index.images[product.product_id], top_k=5)
    assert product.product_id in {h.product_id for h in result.hits}
    assert result.hits[0].score == pytest.approx(small.hits[0].score, abs=0.05)


def _two_products_photo(engine_index: EngineIndex) -> tuple[bytes, str, str]:
    """A PNG showing two catalog products side by side (as decoded), and their ids, left then right."""
    import io

    from PIL import Image

    from model.images import decode_image

    left, right = engine_index.products[11], engine_index.products[40]
    a, b = (decode_image(engine_index.images[p.product_id]) for p in (left, right))
    canvas = Image.new("RGB", (a.width + b.width, max(a.height, b.height)), (255, 255, 255))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    assert a.width == b.width and a.height == b.height == canvas.height  # catalog photos share one size
    return buffer.getvalue(), left.product_id, right.product_id


def test_search_by_a_cropped_region_of_a_photo(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    """A photo of two products: each half, marked with crop, finds its own product (its own embedding: score 1)."""
    photo, left, right = _two_products_photo(engine_index)
    for crop, wanted in (((0.0, 0.0, 0.5, 1.0), left), ((0.5, 0.0, 0.5, 1.0), right)):
        result = client.search_image(photo, top_k=5, crop=crop)
        own = [h for h in result.hits if h.product_id == wanted]
        assert own and own[0].score == pytest.approx(1.0, abs=1e-3), (crop, [h.product_id for h in result.hits])
        alone = client.embed(engine_index.images[wanted]).vector
        np.testing.assert_allclose(client.embed(photo, crop=crop).vector, alone, atol=1e-4)


def test_a_large_jpeg_photo_and_its_crops_embed_as_their_full_decode(client: VisualSearchClient,
                                                                     engine_index: EngineIndex) -> None:
    """A phone-sized JPEG decodes at reduced scale (the model's Embedder.decode_size, more pixels for a crop);
    the whole photo and each half embed as their full-size decode does, and each half finds its product."""
    import io

    from PIL import Image

    from model.images import decode_image

    photo, left, right = _two_products_photo(engine_index)
    big = decode_image(photo).resize((2400, 1600), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=92)
    jpeg = buffer.getvalue()
    full = decode_image(jpeg)
    for crop, wanted in ((None, None), ((0.0, 0.0, 0.5, 1.0), left), ((0.5, 0.0, 0.5, 1.0), right)):
        part = full if crop is None else full.crop((0, 0, 1200, 1600) if crop[0] == 0 else (1200, 0, 2400, 1600))
        png = io.BytesIO()
        part.save(png, format="PNG")  # PNGs are always decoded at full size
        reference = client.embed(png.getvalue()).vector
        vector = client.embed(jpeg, crop=crop).vector
        assert float(np.dot(vector, reference)) > 0.99, crop
        if wanted is not None:
            assert wanted in {h.product_id for h in client.search_image(jpeg, top_k=5, crop=crop).hits}


def test_a_client_shrinks_a_large_photo_before_upload(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    """shrink=True: the client downscales a large photo (with its EXIF orientation) to GetIndexInfo's query image
    size, divided by the crop's fractions, and uploads a few kilobytes; the server embeds it as it embeds the
    photo itself, and each half still finds its product. Small photos are sent as they are."""
    import io

    from PIL import Image

    from engine.client import shrink_image
    from model.images import decode_image

    photo, left, right = _two_products_photo(engine_index)
    big = decode_image(photo).resize((2400, 1600), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated, as phones do
    buffer = io.BytesIO()
    big.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    jpeg = buffer.getvalue()
    size = client.index_info().query_image_size
    assert size is not None
    for crop, wanted in ((None, None), ((0.0, 0.0, 0.5, 1.0), left), ((0.5, 0.0, 0.5, 1.0), right)):
        shrunk = client.shrink(jpeg, crop)
        sent = decode_image(shrunk)
        need = size if crop is None else (round(size[0] / crop[2]), round(size[1] / crop[3]))
        assert len(shrunk) < len(jpeg) // 10 and sent.width >= need[0] and sent.height >= need[1], (crop, sent.size)
        assert abs(sent.width / sent.height - 1.5) < 0.02  # the photo as shown: landscape, aspect kept
        vector = client.embed(shrunk, crop=crop).vector
        assert float(np.dot(vector, client.embed(jpeg, crop=crop).vector)) > 0.99, crop
        if wanted is not None:
            hits = client.search_image(jpeg, top_k=5, crop=crop, shrink=True).hits
            assert wanted in {h.product_id for h in hits}
    small = engine_index.images[left]
    assert shrink_image(small, size) is small  # 60x80: already under the size the server uses
    assert shrink_image(b"not an image", size) == b"not an image"  # the server will say what is wrong


@pytest.mark.parametrize("crop, message", [((0.0, 0.0, 0.0, 1.0), "must lie inside"),
                                           ((0.6, 0.0, 0.5, 1.0), "x + width <= 1"),
                                           ((-0.1, 0.0, 0.5, 0.5), "must lie inside"),
                                           ((0.0, 0.0, float("nan"), 1.0), "must lie inside"),
                                           ((0.0, 0.0, 1.0, float("nan")), "must lie inside")])
def test_a_crop_outside_the_photo_is_invalid(client: VisualSearchClient, engine_index: EngineIndex,
                                             crop: tuple[float, float, float, float], message: str) -> None:
    photo, _, _ = _two_products_photo(engine_index)
    with pytest.raises(grpc.RpcError) as error:
        client.search_image(photo, crop=crop)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        client.embed(photo, crop=crop)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
    from engine.types import SearchQuery, SearchRequest

    items = client.batch_search([SearchRequest(SearchQuery(image=photo, crop=crop), 3),
                                 SearchRequest(SearchQuery(image=photo), 3)])
    assert [i.code for i in items] == ["INVALID_ARGUMENT", "OK"] and message in items[0].message


def test_a_crop_needs_an_image_query(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    from engine.types import SearchQuery, SearchRequest

    request = SearchRequest(SearchQuery(product_id=engine_index.products[0].product_id, crop=(0, 0, 1, 1)), 3)
    with pytest.raises(grpc.RpcError) as error:
        client.search(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image queries only" in error.value.details()


def test_search_by_vector(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    rng = np.random.default_rng(0)
    result = client.search_vector(rng.normal(size=engine_index.dim).astype(np.float32) * 3.0, top_k=7)
    assert len(result.hits) == 7
    assert len({h.product_id for h in result.hits}) == 7


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_search_by_vector_of_any_nonzero_scale(client: VisualSearchClient, engine_index: EngineIndex,
                                               scale: float) -> None:
    """A vector whose squares overflow or underflow float32 finds what its unit vector finds (it was searched
    as all zeros: scores 0 in arbitrary order, or refused as all zeros)."""
    rng = np.random.default_rng(1)
    unit = rng.normal(size=engine_index.dim).astype(np.float32)
    unit /= np.linalg.norm(unit)
    expected = client.search_vector(unit, top_k=5)
    result = client.search_vector(unit * np.float32(scale), top_k=5)
    assert [h.product_id for h in result.hits] == [h.product_id for h in expected.hits]
    assert [h.score for h in result.hits] == pytest.approx([h.score for h in expected.hits], abs=1e-5)


def test_search_by_product_excludes_itself(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    product_id = engine_index.products[0].product_id
    result = client.search_product(product_id, top_k=10)
    assert len(result.hits) == 10 and product_id not in [h.product_id for h in result.hits]
    kept = client.search_product(product_id, top_k=3, options=SearchOptions(exclude_query_product=False, nprobe=4))
    own = [h for h in kept.hits if h.product_id == product_id]  # first or tied with a near-duplicate image
    assert own and own[0].score == pytest.approx(kept.hits[0].score, abs=1e-3)


def test_search_with_filter(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    category = engine_index.products[1].category
    search_filter = SearchFilter(categories=(category, "no such category"), min_price=20.0, max_price=60.0,
                                 in_stock_only=True)
    expected = {p.product_id for p in engine_index.products
                if p.category == category and 20.0 <= p.price <= 60.0 and p.in_stock}
    assert expected, "the fixture should hold matching products"
    result = client.search_vector(np.ones(engine_index.dim, np.float32), top_k=1000, filter=search_filter)
    assert {h.product_id for h in result.hits} == expected  # every match, none other (exact fallback included)
    for hit in result.hits:
        price = hit.product.price
        assert hit.product.category == category and price is not None and 20.0 <= price <= 60.0 and hit.product.in_stock


def test_filtered_top_k_matches_exact_search(client: VisualSearchClient, engine_index: EngineIndex) -> None:
    """With every IVF list probed, the filtered top 3 equal brute force over the passing products."""
    vectors = np.load(engine_index.version_path / "vectors.f16.npy").astype(np.float32)
    query = vectors[1] / np.linalg.norm(vectors[1])
    search_filter = SearchFilter(max_price=30.0, in_stock_only=True)
    passing = [i for i, p in enumerate(engine_index.products) if p.price <= 30.0 and p.in_stock]
    scores = vectors[passing] @ query
    expected = [engine_index.products[passing[i]].product_id for i in np.argsort(-scores, kind="stable")[:3]]
    result = client.search_vector(query, top_k=3, filter=search_filter, options=SearchOptions(nprobe=4))
    assert [h.product_id for h in result.hits] == expected
    assert [h.score for h in result.hits] == pytest.approx(sorted(scores, reverse=True)[:3], abs=1e-5)


def _rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.mark.parametrize(("case", "code", "words"), [
    ("bad_image", grpc.StatusCode.INVALID_ARGUMENT, "decode"),
    ("unknown_product", grpc.StatusCode.NOT_FOUND, "no-such-product"),
    ("empty_product_id", grpc.StatusCode.INVALID_ARGUMENT, "product_id is empty"),  # as GetProduct("") answers
    ("wrong_dim", grpc.StatusCode.INVALID_ARGUMENT, "dimensions"),
    ("bad_top_k", grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
])
def test_errors_then_still_serving(client: VisualSearchClient, engine_index: EngineIndex, case: str,
                                   code: grpc.StatusCode, words: str, caplog: pytest.LogCaptureFixture) -> None:
    calls = {
        "bad_image": lambda: client.search_image(b"this is not an image"),
        "unknown_product": lambda: client.search_product("no-such-product"),
        "empty_product_id": lambda: client.search_product(""),
        "wrong_dim": lambda: client.search_vector(np.ones(engine_index.dim + 3, np.float32)),
        "bad_top_k": lambda: client.search_product(engine_index.products[0].product_id, top_k=5000),
    }
    with caplog.at_level(logging.INFO, logger="vitrine.engine"):
        err = _rpc_error(calls[case])
    assert err.code() == code
    assert words in err.details()
    if case == "wrong_dim":
        assert str(engine_index.dim) in err.details() and str(engine_index.dim + 3) in err.details()
    assert any(code.name in r.getMessage() for r in caplog.records)
    assert len(client.search_product(engine_index.products[2].product_id, top_k=3).hits) == 3  # still serving


@pytest.mark.parametrize("product_id", ["x" * 20_000, "é" * 3_000])
def test_a_long_unknown_product_id_is_not_found(client: VisualSearchClient, product_id: str) -> None:
    """The NOT_FOUND message quotes the id shortened: quoted whole it overflowed the client's 16 KiB limit on
    status metadata, and the client got RESOURCE_EXHAUSTED ("Stream removed") instead."""
    for call in (lambda: client.search_product(product_id), lambda: client.get_product(product_id)):
        err = _rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "not in index version" in err.details()
        assert product_id[:50] in err.details() and len(err.details()) < 1000


def test_model_mismatch_refuses_to_start(engine_index: EngineIndex, tmp_path) -> None:
    # A copy of the index (LMDB refuses a second open of the same path in one process) served with a
    # freshly initialised model: its weights, hence its fingerprint, differ from the indexing model's.
    index_root = tmp_path / "index"
    shutil.copytree(engine_index.index_root, index_root)
    other = make_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(ServerStartError, match="fingerprint"):
        create_server(ServerConfig(index_root=index_root, model=other, port=0))


def test_a_moved_model_folder_is_refused_with_the_way_to_name_its_new_place(engine_index: EngineIndex,
                                                                             tmp_path) -> None:
    """The manifest's model_path is where the checkpoint was at build time; serve said only 'cannot load' when it
    had moved since. It now says where the path came from and that --model names the new place, which works."""
    moved = tmp_path / "moved-model"
    shutil.copytree(engine_index.model_dir, moved)
    index_root = tmp_path / "index"
    shutil.copytree(engine_index.index_root, index_root)
    manifest_path = next(index_root.glob("*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["model_path"] = str(tmp_path / "gone")  # as if the checkpoint had been moved after the build
    manifest_path.write_text(json.dumps(manifest))  # model_path is not one of the checksummed files
    with pytest.raises(ServerStartError, match=r"manifest model_path.*--model / VITRINE_MODEL"):
        create_server(ServerConfig(index_root=index_root, port=0, watch=False))
    server, _ = create_server(ServerConfig(index_root=index_root, model=moved, port=0, watch=False))
    server.stop(None)


def test_missing_index_refuses_to_start(tmp_path) -> None:
    with pytest.raises(ServerStartError, match="CURRENT"):
        create_server(ServerConfig(index_root=tmp_path, port=0))


def test_a_batch_whose_answer_is_over_the_message_limit(engine_index: EngineIndex, tmp_path) -> None:
    """search.proto's BatchSearch: an answer larger than the server's message limit is RESOURCE_EXHAUSTED (each hit
    carries its product's record), a smaller batch of the same searches passes, and the server keeps serving."""
    from engine.types import SearchQuery, SearchRequest

    index_root = tmp_path / "index"
    shutil.copytree(engine_index.index_root, index_root)  # its own copy: a process opens a version's LMDB once
    server, port = create_server(ServerConfig(index_root=index_root, port=0, max_workers=2, watch=False,
                                              max_message_bytes=256 << 10))
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=30.0, retries=0) as client:
            request = SearchRequest(query=SearchQuery(product_id=engine_index.products[0].product_id),
                                    top_k=len(engine_index.products))
            err = _rpc_error(lambda: client.batch_search([request] * 20))
            # said by the server, with what to do (it was gRPC's "Sent message larger than max" after the call had
            # been logged and counted OK)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "split the batch" in err.details()
            assert 'vitrine_requests_total{code="RESOURCE_EXHAUSTED",method="BatchSearch"} 1.0' in server.metrics.text()
            items = client.batch_search([request] * 2)
            assert [item.code for item in items] == ["OK", "OK"] and len(items[0].result.hits) > 100
    finally:
        server.stop(None).wait()


def test_not_serving_until_loaded(engine_index: EngineIndex, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    index_root = tmp_path / "index"
    shutil.copytree(engine_index.index_root, index_root)
    port = free_port()
    release, thread, started = create_server_held_at_load(monkeypatch, ServerConfig(index_root=index_root, port=port))
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=2.0, retries=0) as client:
            status = _poll_health(client)
            assert status == "NOT_SERVING"
            err = _rpc_error(lambda: client.search_product(engine_index.products[0].product_id))
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()
            image = engine_index.images[engine_index.products[0].product_id]
            err = _rpc_error(lambda: client.embed(image))  # no model yet: it was INTERNAL (IndexError)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()
            release.set()
            client.wait_ready(timeout_s=30.0)
            assert client.search_product(engine_index.products[0].product_id, top_k=2).hits
    finally:
        release.set()
        thread.join(60)
        for server, _ in started:
            server.stop(None).wait()


def _poll_health(client: VisualSearchClient) -> str:
    """The first health status the server answers (it may take a moment to bind)."""
    import time

    for _ in range(100):
        try:
            return client.health()
        except grpc.RpcError:
            time.sleep(0.05)
    raise AssertionError("the server never answered the health check")


def test_serve_stops_cleanly_on_sigterm(engine_index: EngineIndex, tmp_path) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys

    index_root = tmp_path / "index"
    shutil.copytree(engine_index.index_root, index_root)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = ("import logging, sys; from pathlib import Path; from engine.server import ServerConfig, serve; "
            "logging.basicConfig(level=logging.INFO); "
            f"sys.exit(serve(ServerConfig(index_root=Path({str(index_root)!r}), port={port}, grace_s=1.0)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=2.0) as client:
            client.wait_ready(timeout_s=240.0)
            assert client.search_product(engine_index.products[0].product_id, top_k=1).hits
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "Search OK" in stderr and "stopped" in stderr


def test_request_threads_run_faiss_on_the_configured_openmp_threads(client: VisualSearchClient,
                                                                    engine_index: EngineIndex,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenMP's thread count is per thread: every request thread gets faiss_threads (1), a batch of >= 8
    queries gets faiss_batch_threads (default: all cores) for its Faiss call, and the thread is 1 again after."""
    import os

    import faiss

    from engine.candidates import ShardSearch
    from engine.types import SearchQuery, SearchRequest

    seen: list[tuple[int, int]] = []
    real = ShardSearch._fan_out

    def recording(self, xq, k, nprobe, selector):  # noqa: ANN001, ANN202
        seen.append((xq.shape[0], faiss.omp_get_max_threads()))
        return real(self, xq, k, nprobe, selector)

    monkeypatch.setattr(ShardSearch, "_fan_out", recording)
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(9, engine_index.dim)).astype(np.float32)
    client.search_vector(vectors[0], top_k=3)
    client.batch_search([SearchRequest(SearchQuery(vector=v), top_k=3) for v in vectors])
    client.search_vector(vectors[1], top_k=3)
    assert seen[0] == seen[-1] == (1, 1) and len(seen) > 2, seen
    assert set(seen[1:-1]) == {(9, os.cpu_count())}, seen  # (nprobe may double on this tiny index: several calls)


def test_vitrine_query_with_crop(server: tuple[grpc.Server, int], engine_index: EngineIndex, tmp_path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from vitrine.cli import main

    photo, left, right = _two_products_photo(engine_index)
    (tmp_path / "two.png").write_bytes(photo)
    target = f"127.0.0.1:{server[1]}"
    assert main(["query", "--target", target, "--image", str(tmp_path / "two.png"), "--crop", "0.5,0,0.5,1",
                 "--top-k", "5"]) == 0
    assert right in capsys.readouterr().out
    from PIL import Image

    from model.images import decode_image

    decode_image(photo).resize((2400, 1600)).save(tmp_path / "two.jpg", quality=92)  # a phone-sized photo
    assert main(["query", "--target", target, "--image", str(tmp_path / "two.jpg"), "--crop", "0.5,0,0.5,1",
                 "--top-k", "5", "--shrink"]) == 0
    assert right in capsys.readouterr().out
    assert Image.open(tmp_path / "two.jpg").size == (2400, 1600)  # the user's file is left alone
    assert main(["query", "--target", target, "--product-id", left, "--crop", "0,0,1,1"]) == 2
    assert "--crop marks part of a query photo" in capsys.readouterr().err
    assert main(["query", "--target", target, "--image", str(tmp_path / "two.png"), "--crop", "half"]) == 2
    assert "--crop must be X,Y,W,H" in capsys.readouterr().err
