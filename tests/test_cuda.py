"""The CUDA paths, on a machine with an NVIDIA GPU: embedding, index build, training (plain and DDP/NCCL), serving.

Every test here skips where torch sees no CUDA device (CI, laptops); `benchmarks/gpu_check.sh` runs them on a GPU
machine. What they pin: a CUDA run gives the CPU's results to bf16 rounding (same neighbours, cosine ~1), bf16
autocast is what "auto" picks on a GPU that has it, and a model trained on the GPU loads and embeds on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.catalog import CatalogConfig
from model.checkpoint import default_model_path
from model.data import build_shards
from model.embedder import Embedder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"


def _mini_images(n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted((MINI / "images").glob("*.jpg"))[:n]]


def _neighbour_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose nearest other row is the same under embeddings a and b."""
    def first(x: np.ndarray) -> np.ndarray:
        scores = x @ x.T
        np.fill_diagonal(scores, -np.inf)
        return scores.argmax(axis=1)
    return float(np.mean(first(a) == first(b)))


def test_default_model_embeds_on_cuda_as_on_the_cpu() -> None:
    images = _mini_images(256)
    cpu = Embedder.load(default_model_path(), device="cpu", precision="fp32").embed_bytes(images)
    gpu_embedder = Embedder.load(default_model_path(), device="cuda", precision="auto")
    assert gpu_embedder.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    gpu = gpu_embedder.embed_bytes(images, batch_size=128)
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    np.testing.assert_allclose(np.linalg.norm(gpu, axis=1), 1.0, atol=1e-4)
    cosine = np.sum(gpu * cpu, axis=1)
    assert cosine.min() > 0.98 and cosine.mean() > 0.995, (cosine.min(), cosine.mean())
    assert _neighbour_agreement(cpu, gpu) >= 0.9
    fp32 = Embedder.load(default_model_path(), device="cuda", precision="fp32").embed_bytes(images)
    assert np.sum(fp32 * cpu, axis=1).min() > 0.999  # fp32 on the GPU (cuDNN may use TF32 in the conv stem)


def test_index_build_on_cuda_matches_the_cpu_build(tmp_path: Path) -> None:
    from indexer.build import IndexBuildConfig, build_index
    from indexer.version import open_version

    build_shards(MINI / "styles.csv", MINI / "images", tmp_path / "shards", CatalogConfig(), progress=False)
    versions = {}
    for device in ("cpu", "cuda"):
        config = IndexBuildConfig(shards_dir=str(tmp_path / "shards"), model=str(default_model_path()),
                                  index_root=str(tmp_path / f"index-{device}"), batch_size=256, num_workers=2,
                                  device=device, precision="auto" if device == "cuda" else "fp32")
        versions[device] = build_index(config)
    with open_version(versions["cpu"]) as cpu, open_version(versions["cuda"]) as gpu:
        assert gpu.manifest["validation"]["recall_at_10"] >= 0.95 and gpu.count == cpu.count > 1000
        assert gpu.manifest["embedding"]["embedded"] == gpu.count
        a = np.asarray(cpu.vectors, dtype=np.float32)
        b = np.asarray(gpu.vectors, dtype=np.float32)
    assert np.sum(a * b, axis=1).mean() > 0.995
    assert _neighbour_agreement(a, b) >= 0.9


def _train_command(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vitrine", "train", "--shards", str(shards), "--out", str(out),
            "--label-column", "articleType", "--epochs", "2", "--batch-size", "128", "--width", "64", "--depth", "2",
            "--heads", "2", "--embedding-dim", "32", "--device", "cuda", "--precision", "auto", "--seed", "3", *extra]


def test_training_on_cuda_autocasts_and_the_checkpoint_embeds_on_the_cpu(tmp_path: Path) -> None:
    build_shards(MINI / "styles.csv", MINI / "images", tmp_path / "shards", CatalogConfig(), progress=False)
    done = subprocess.run(_train_command(tmp_path / "shards", tmp_path / "model"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["device"].startswith("cuda") and card["bf16"] == torch.cuda.is_bf16_supported()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(np.isfinite(losses)) and losses[-1] < losses[0]
    vectors = Embedder.load(tmp_path / "model", device="cpu").embed_bytes(_mini_images(8))
    assert vectors.shape == (8, 32) and np.all(np.isfinite(vectors))


def test_torchrun_on_cuda_uses_nccl(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    build_shards(MINI / "styles.csv", MINI / "images", shards, CatalogConfig(), max_records_per_shard=100,
                 progress=False)
    gpus = torch.cuda.device_count()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               "-m", *_train_command(shards, tmp_path / "ddp")[2:]]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((tmp_path / "ddp" / "model_card.json").read_text())
    assert card["world_size"] == gpus and card["device"].startswith("cuda")
    assert card["metrics"]["images_seen"] == 2 * card["train_records"]  # 2 epochs, every record once per epoch


def test_server_embeds_queries_on_cuda(tmp_path: Path) -> None:
    from engine.client import VisualSearchClient
    from engine.server import ServerConfig, create_server
    from indexer.build import build_index_from_vectors
    from model.catalog import read_catalog

    embedder = Embedder.load(default_model_path(), device="cpu", precision="fp32")
    products = [p for p in read_catalog(MINI / "styles.csv", CatalogConfig()).products
                if (MINI / "images" / f"{p.product_id}.jpg").exists()][:300]
    images = [(MINI / "images" / f"{p.product_id}.jpg").read_bytes() for p in products]
    vectors = embedder.embed_bytes(images)
    build_index_from_vectors(vectors, products, tmp_path / "index", embedder.fingerprint, default_model_path(),
                             "IDMap,Flat", min_recall_at_10=0.0, validation_queries=32)
    server, port = create_server(ServerConfig(index_root=tmp_path / "index", port=0, watch=False, device="cuda"))
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=30.0) as client:
            client.wait_ready(timeout_s=60.0)
            for row in (0, 57, 211):
                embedding = client.embed(images[row])
                assert float(embedding.vector @ vectors[row]) > 0.98
                result = client.search_image(images[row], top_k=5)
                assert result.hits[0].product_id == products[row].product_id
    finally:
        server.stop(None).wait()
