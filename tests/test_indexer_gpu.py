"""The Faiss GPU path sits behind a clean check; without a usable GPU every step falls back to the CPU."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from indexer import fill
from indexer.plan import plan_from_factory


def _vectors(n: int = 2000, dim: int = 16) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    faiss.normalize_L2(x)
    return x.astype(np.float16)


def test_gpu_count_is_zero_without_gpu_support(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    assert fill.faiss_gpu_count() == expected
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    assert fill.faiss_gpu_count() == 0, "a CPU build of Faiss claiming a GPU is not a GPU"


def test_broken_gpu_falls_back_to_the_same_cpu_index(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    xb = _vectors()
    plan = plan_from_factory("IVF16,PQ8x4", len(xb), xb.shape[1])
    cpu = fill.fill_shard(fill.train_index(xb, plan, use_gpu=False), xb, np.arange(len(xb)), use_gpu=False)

    def no_device(*args: object) -> None:
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", no_device, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", no_device, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", no_device, raising=False)
    assert fill.faiss_gpu_count() == 1
    with caplog.at_level(logging.WARNING, logger="vitrine.indexer"):
        trained = fill.train_index(xb, plan)  # use_gpu=None: "GPU present" -> tries, fails, falls back
        fallback = fill.fill_shard(trained, xb, np.arange(len(xb)))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "training on the CPU" in messages and "adding on the CPU" in messages
    xq = np.asarray(xb[:20], dtype=np.float32)
    np.testing.assert_array_equal(cpu.search(xq, 5)[1], fallback.search(xq, 5)[1])
