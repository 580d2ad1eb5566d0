"""Index build: IVF-PQ oracle test against exact search, validation gating CURRENT, end to end with a model."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.build import (
    ValidationFailed,
    add_vectors,
    build_index_from_vectors,
    plan_for,
    recall_at_k,
    train_index,
)
from indexer.search import search_shards
from indexer.version import list_versions, open_current, read_current
from model.catalog import Product

RECALL_FLOOR_IVFPQ = 0.5  # measured 0.61 at the plan's nprobe (PQ-limited: 32 bytes for 128 dims)


def clustered(n: int, centers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points around random cluster centres, L2-normalised (like embeddings of similar products)."""
    dim = centers.shape[1]
    x = centers[rng.integers(len(centers), size=n)] + 2.0 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    x = np.ascontiguousarray(x, dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def make_products(n: int) -> list[Product]:
    return [Product(product_id=f"p{i}", title=f"item {i}", category="Tops", brand="", price=None, currency="",
                    in_stock=True, image_url="", attributes={}, split=None) for i in range(n)]


def test_ivfpq_oracle_recall_at_plan_nprobe() -> None:
    rng = np.random.default_rng(0)
    centers = 4.0 * rng.standard_normal((200, 128)) / np.sqrt(128)
    xb, xq = clustered(20_000, centers, rng), clustered(200, centers, rng)
    plan = plan_for(len(xb), 128)
    assert (plan.factory, plan.nprobe) == ("IVF512,PQ32x8", 32)
    shards = add_vectors(train_index(xb, plan, seed=0), xb, num_shards=2)
    _, I = search_shards(shards, xq, 10, plan.nprobe)  # noqa: E741
    recall = recall_at_k(xb, xq, I, 10)
    assert recall >= RECALL_FLOOR_IVFPQ, f"IVF-PQ recall@10 {recall:.3f} < floor {RECALL_FLOOR_IVFPQ}"
    _, I1 = search_shards(shards, xq, 10, 1)
    assert recall_at_k(xb, xq, I1, 10) < recall, "nprobe=1 must lose recall against the default nprobe"


def test_recall_at_k_is_tie_aware() -> None:
    xb = np.ones((20, 4), dtype=np.float32) / 2.0  # all identical: any 10 ids are a correct answer
    assert recall_at_k(xb, xb[:2], np.array([list(range(10, 20))] * 2), 10) == 1.0


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def test_failing_validation_leaves_current_untouched(tmp_path: Path) -> None:
    good = build_index_from_vectors(_vectors(100), make_products(100), tmp_path, "a" * 64, tmp_path,
                                    validation_queries=20)
    bad = _vectors(100, seed=1)
    bad[[3, 50]] = np.nan
    with pytest.raises(ValidationFailed, match="2 of 100 vectors contain NaN"):
        build_index_from_vectors(bad, make_products(100), tmp_path, "b" * 64, tmp_path)
    with pytest.raises(ValidationFailed, match="recall@10") as failure:  # an approximate index, impossible floor
        build_index_from_vectors(_vectors(3000), make_products(3000), tmp_path, "b" * 64, tmp_path,
                                 factory="IVF32,PQ4x4", min_recall_at_10=0.999, validation_queries=50)
    assert failure.value.report["recall_at_10"] < 0.999
    assert read_current(tmp_path) == good.name
    assert list_versions(tmp_path) == [good.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["CURRENT", good.name]), "no temp folder left"


def test_ivf_version_validates_and_searches(tmp_path: Path) -> None:
    xb = _vectors(2000)
    path = build_index_from_vectors(xb, make_products(2000), tmp_path, "a" * 64, tmp_path, factory="IVF16,Flat",
                                    nprobe=16, num_shards=3, validation_queries=50)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["factory"] == "IVF16,Flat" and manifest["search_defaults"] == {"nprobe": 16}
    assert manifest["validation"]["recall_at_10"] == 1.0  # nprobe == nlist: exhaustive
    with open_current(tmp_path) as version:
        assert len(version.shards) == 3
        _, I = version.search(xb[:3], 1)  # noqa: E741
        assert I[:, 0].tolist() == [0, 1, 2]
