"""Builders of a tiny real index for the engine tests: an untrained model, real catalog images, a version.

The model is made with model's public API (create_model + save_checkpoint) and left untrained: the
engine tests check plumbing (conversions, filters, status codes), not relevance. Prices and stock
are assigned deterministically (the fashion catalog has neither) so filters have something to do.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CATALOG_DIRS = (REPO_ROOT / "data" / "mini-catalog", Path("/work/shared/datasets/fashion-product-images-small"))
NUM_PRODUCTS = 240  # small enough to embed in seconds on 2 CPU cores
EMBEDDING_DIM = 16  # the tiny model's embedding size
FACTORY = "IVF4,Flat"  # IVF so over-fetching and nprobe are exercised; 2 shards so the merge is too


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_server_held_at_load(monkeypatch: Any, config: Any) -> tuple[threading.Event, threading.Thread, list]:
    """`create_server(config)` started in a thread whose index-and-model load waits until `release` is set:
    (release, thread, started), `started` holding (server, port) once it returned. Set release and join the thread
    before stopping the server."""
    import engine.server as server_module

    release, real_load = threading.Event(), server_module.load_searcher

    def slow_load(loaded: Any, *args: Any) -> Any:  # the real load, held back until the test's checks are done
        assert release.wait(60)
        return real_load(loaded, *args)

    monkeypatch.setattr(server_module, "load_searcher", slow_load)
    started: list = []
    thread = threading.Thread(target=lambda: started.append(server_module.create_server(config)))
    thread.start()
    return release, thread, started


def serve_process(args: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """A `vitrine serve` process (grace 0.5 s, one OpenMP thread) logging to `log`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1",
           **(extra_env or {})}
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the server's logging
        return subprocess.Popen([sys.executable, "-m", "vitrine", "serve", "--grace-s", "0.5", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def stop_processes(processes: Sequence[subprocess.Popen]) -> None:
    """Stop server processes still running (resumed first if stopped): SIGTERM, 30 s, then SIGKILL."""
    for process in processes:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclasses.dataclass(frozen=True)
class EngineIndex:
    """What the tests need to know about the built index."""

    index_root: Path
    model_dir: Path
    version_path: Path
    products: list  # model.catalog.Product, row = internal id
    images: dict  # product_id -> encoded image bytes
    dim: int


def catalog_dir() -> Path:
    """The mini catalog made by the model room, else the shared dataset it was made from."""
    for folder in CATALOG_DIRS:
        if (folder / "styles.csv").exists():
            return folder
    raise FileNotFoundError(f"no catalog found in any of {[str(p) for p in CATALOG_DIRS]}")


def with_price_and_stock(products: list) -> list:
    """Deterministic prices 10, 20, ... 100 and every third product out of stock."""
    return [dataclasses.replace(p, price=float(10 * (1 + i % 10)), currency="EUR", in_stock=i % 3 != 0)
            for i, p in enumerate(products)]


def make_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """An untrained tiny checkpoint through model's public API (different seeds: different fingerprints)."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.networks import ModelConfig, create_model

    torch.manual_seed(seed)
    config = ModelConfig(image_size=(32, 32), patch_size=8, width=32, depth=1, num_heads=2, embedding_dim=EMBEDDING_DIM)
    card = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "label_maps": {}, "metrics": {}}
    return save_checkpoint(out_dir, create_model(config), card)


def load_products(limit: int = NUM_PRODUCTS) -> tuple[list, dict]:
    """The first `limit` catalog products that have an image, and their image bytes."""
    from model.catalog import CatalogConfig, read_catalog

    folder = catalog_dir()
    with open(folder / "styles.csv", encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    config = CatalogConfig() if "split" in header else dataclasses.replace(CatalogConfig(), split_column=None)
    products, images = [], {}
    for product in read_catalog(folder / "styles.csv", config).products:
        path = folder / "images" / config.image_pattern.format(id=product.product_id)
        if path.exists():
            products.append(product)
            images[product.product_id] = path.read_bytes()
        if len(products) == limit:
            break
    return with_price_and_stock(products), images


def build_engine_index(root: Path) -> EngineIndex:
    """Checkpoint + embedded catalog + a published index version under `root`."""
    from indexer.build import build_index_from_vectors
    from model.embedder import Embedder

    model_dir = make_checkpoint(root / "model")
    embedder = Embedder.load(model_dir)
    products, images = load_products()
    vectors = embedder.embed_bytes([images[p.product_id] for p in products])
    version_path = build_index_from_vectors(vectors, products, root / "index", embedder.fingerprint, model_dir,
                                            FACTORY, nprobe=2, num_shards=2, min_recall_at_10=0.0,
                                            validation_queries=32)
    return EngineIndex(root / "index", model_dir, version_path, products, images, embedder.dim)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(folder: Path, name: str, subject: str, extensions: str) -> None:
    """name.key + name.pem signed by folder/ca.pem."""
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


def make_test_certs(folder: Path) -> Path:
    """A test CA (ca.pem), a server certificate for localhost / 127.0.0.1 (server.pem, server.key) and a client
    certificate (client.pem, client.key), made with the openssl command; returns `folder`."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=vitrine test CA", "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    _issue(folder, "server", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                              "extendedKeyUsage=serverAuth,clientAuth\n")
    _issue(folder, "client", "/CN=shop backend", "extendedKeyUsage=clientAuth\n")
    return folder
