"""TLS and mutual TLS (`vitrine serve --tls-cert --tls-key [--tls-ca]`): gRPC, the HTTP gateway, a root's
channels to its shard servers, `vitrine query --tls-ca`. Certificates made by openssl for the test (a CA,
a server certificate for localhost / 127.0.0.1, a client certificate); skipped when openssl is missing."""

from __future__ import annotations

import json
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from engine_fixtures import (
    EngineIndex,
    build_engine_index,
    free_port,
    make_test_certs,
    serve_process,
    stop_processes,
)

from engine.client import VisualSearchClient
from engine.config import ConfigError, ServerConfig
from engine.server import ServerStartError, create_server
from vitrine.cli import main

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def engine_index(tmp_path_factory: pytest.TempPathFactory) -> EngineIndex:
    return build_engine_index(tmp_path_factory.mktemp("engine-tls"))


@pytest.fixture()
def tls_server(engine_index: EngineIndex, certs: Path, request: pytest.FixtureRequest) -> Iterator[tuple]:
    mutual = getattr(request, "param", False)
    config = ServerConfig(index_root=engine_index.index_root, port=0, max_workers=2, watch=False, http_port=0,
                          tls_cert=certs / "server.pem", tls_key=certs / "server.key",
                          tls_ca=certs / "ca.pem" if mutual else None)
    server, port = create_server(config)
    yield server, port
    server.stop(None).wait()


def _vector(index: EngineIndex) -> np.ndarray:
    return np.random.default_rng(1).normal(size=index.dim).astype(np.float32)


def test_tls_grpc_and_https(tls_server: tuple, certs: Path, engine_index: EngineIndex,
                            capsys: pytest.CaptureFixture[str]) -> None:
    server, port = tls_server
    with VisualSearchClient(f"localhost:{port}", timeout_s=10.0, tls_ca=certs / "ca.pem") as client:
        assert len(client.search_vector(_vector(engine_index), top_k=3).hits) == 3
    with VisualSearchClient(f"localhost:{port}", timeout_s=3.0, retries=0) as plain:  # plaintext: refused
        with pytest.raises(grpc.RpcError) as error:
            plain.search_vector(_vector(engine_index), top_k=3)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    body = json.dumps({"vector": {"values": _vector(engine_index).tolist()}, "top_k": 3}).encode()
    call = urllib.request.Request(f"https://localhost:{server.http_port}/v1/search", data=body,
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(call, timeout=10, context=context) as response:
        assert len(json.loads(response.read())["hits"]) == 3
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to the TLS port
        urllib.request.urlopen(f"http://localhost:{server.http_port}/healthz", timeout=5).read()
    product = engine_index.products[0].product_id
    assert main(["query", "--target", f"localhost:{port}", "--product-id", product, "--top-k", "2",
                 "--tls-ca", str(certs / "ca.pem")]) == 0
    assert "rank" in capsys.readouterr().out


@pytest.mark.parametrize("tls_server", [True], indirect=True)
def test_mutual_tls_needs_a_client_certificate(tls_server: tuple, certs: Path, engine_index: EngineIndex) -> None:
    server, port = tls_server
    with VisualSearchClient(f"localhost:{port}", timeout_s=10.0, tls_ca=certs / "ca.pem",
                            tls_cert=certs / "client.pem", tls_key=certs / "client.key") as client:
        assert len(client.search_vector(_vector(engine_index), top_k=3).hits) == 3
    with VisualSearchClient(f"localhost:{port}", timeout_s=3.0, retries=0, tls_ca=certs / "ca.pem") as anonymous:
        with pytest.raises(grpc.RpcError) as error:
            anonymous.search_vector(_vector(engine_index), top_k=3)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):  # HTTPS without a certificate
        urllib.request.urlopen(f"https://localhost:{server.http_port}/healthz", timeout=5, context=context).read()
    context.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    with urllib.request.urlopen(f"https://localhost:{server.http_port}/healthz", timeout=5, context=context) as r:
        assert json.loads(r.read()) == {"status": "SERVING"}


def test_a_root_talks_tls_to_its_shard_servers(engine_index: EngineIndex, certs: Path, tmp_path: Path) -> None:
    """A shard server process (`vitrine serve --role shard` with mutual TLS) and a root verifying it and showing
    its own certificate; a client reaches the root over mutual TLS too."""
    files = {"tls_cert": certs / "server.pem", "tls_key": certs / "server.key", "tls_ca": certs / "ca.pem"}
    shard_port = free_port()
    flags = [f"--{name.replace('_', '-')}={path}" for name, path in files.items()]
    shard = serve_process(["--index-root", str(engine_index.index_root), "--role", "shard", "--shards", "0,1",
                           "--port", str(shard_port), "--no-watch", *flags], tmp_path / "shard.log")
    try:
        with VisualSearchClient(f"localhost:{shard_port}", timeout_s=5.0, tls_ca=certs / "ca.pem",
                                tls_cert=certs / "client.pem", tls_key=certs / "client.key") as probe:
            probe.wait_ready(timeout_s=120.0, service="")
        root, root_port = create_server(ServerConfig(index_root=engine_index.index_root, port=0, role="root",
                                                     shard_servers=(f"localhost:{shard_port}",), watch=False,
                                                     **files))
        try:
            with VisualSearchClient(f"localhost:{root_port}", timeout_s=10.0, tls_ca=certs / "ca.pem",
                                    tls_cert=certs / "client.pem", tls_key=certs / "client.key") as client:
                result = client.search_vector(_vector(engine_index), top_k=4)
            assert len(result.hits) == 4 and not result.partial
        finally:
            root.stop(None).wait()
    finally:
        stop_processes([shard])
    assert "over TLS (clients need a certificate)" in (tmp_path / "shard.log").read_text()


def test_tls_settings_errors_name_what_is_wrong(engine_index: EngineIndex, certs: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both tls_cert and tls_key"):
        ServerConfig(index_root=engine_index.index_root, tls_cert=certs / "server.pem")
    with pytest.raises(ConfigError, match="needs the server's own tls_cert"):
        ServerConfig(index_root=engine_index.index_root, tls_ca=certs / "ca.pem")
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(ServerStartError, match=r"TLS certificate .*not.pem is not a PEM file"):
        create_server(ServerConfig(index_root=engine_index.index_root, port=0, watch=False,
                                   tls_cert=tmp_path / "not.pem", tls_key=certs / "server.key"))
    with pytest.raises(ServerStartError, match=r"cannot read the TLS private key .*missing.key"):
        create_server(ServerConfig(index_root=engine_index.index_root, port=0, watch=False,
                                   tls_cert=certs / "server.pem", tls_key=tmp_path / "missing.key"))


def test_client_key_without_certificate_is_an_error_not_plaintext(tmp_path: Path) -> None:
    """A client key alone was ignored: the client silently connected in plaintext."""
    from engine.tls import TlsError

    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TlsError, match="needs both a TLS certificate and its private key"):
        VisualSearchClient("localhost:1", tls_key=key)


def test_client_negative_retries_is_an_error() -> None:
    """retries=-1 made every call fail with AssertionError('unreachable')."""
    with pytest.raises(ValueError, match="retries must be >= 0"):
        VisualSearchClient("localhost:1", retries=-1)
