"""Stopping the server releases its index version: the same version opens again in this process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest
from engine_fixtures import build_engine_index

from engine.client import VisualSearchClient
from engine.server import ServerConfig, create_server
from indexer.version import open_version


def test_stop_closes_the_version_so_it_can_be_served_again(tmp_path: Path) -> None:
    index = build_engine_index(tmp_path)
    config = ServerConfig(index_root=index.index_root, port=0, max_workers=2)
    for _ in range(2):  # a second server in the same process needs the first one's LMDB closed
        server, port = create_server(config)
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=10.0) as client:
            assert client.index_info().count == len(index.products)
        assert server.stop(grace=1).wait(timeout=30)
        with pytest.raises(grpc.RpcError), VisualSearchClient(f"127.0.0.1:{port}", timeout_s=1.0, retries=0) as c:
            c.index_info()
    with open_version(index.version_path) as version:
        assert version.count == len(index.products)


def test_get_product_returns_the_record_or_a_clear_status(tmp_path: Path) -> None:
    index = build_engine_index(tmp_path)
    server, port = create_server(ServerConfig(index_root=index.index_root, port=0, max_workers=2))
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=10.0) as client:
            expected = dataclasses.replace(index.products[3], split=None)  # the API does not carry splits
            assert client.get_product(expected.product_id) == expected
            for product_id, code, words in [("no-such-id", grpc.StatusCode.NOT_FOUND, "'no-such-id' is not in"),
                                            ("", grpc.StatusCode.INVALID_ARGUMENT, "product_id is empty")]:
                with pytest.raises(grpc.RpcError) as err:
                    client.get_product(product_id)
                assert err.value.code() == code and words in (err.value.details() or "")
            assert client.get_product(expected.product_id) == expected  # still serving
    finally:
        server.stop(grace=1).wait(timeout=30)
