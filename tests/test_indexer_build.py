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
from indexer.validate import exact_topk, recall_from_truth, rerank
from indexer.version import list_versions, open_current, read_current
from model.catalog import Product

RECALL_FLOOR_RERANKED = 0.95  # the validation gate's default floor (re-ranked recall@10)


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


def test_ivfpq_oracle_recall_with_rerank() -> None:
    """IVF-PQ against exact search: re-ranking 4x candidates from float16 vectors lifts recall over the floor."""
    rng = np.random.default_rng(0)
    centers = 4.0 * rng.standard_normal((100, 64)) / np.sqrt(64)
    xb, xq = clustered(4000, centers, rng), clustered(100, centers, rng)
    assert (plan_for(20_000, 128).factory, plan_for(20_000, 128).nprobe) == ("IVF512,PQ32x8", 32)
    plan = plan_for(len(xb), 64, "IVF64,PQ32x4")
    xb16 = xb.astype(np.float16)
    shards = add_vectors(train_index(xb16, plan, seed=0), xb16, num_shards=2)
    D_true, _ = exact_topk(xb16, xq, 10)
    _, I = search_shards(shards, xq, 10, plan.nprobe)  # noqa: E741
    plain = recall_from_truth(D_true, xq, xb16, I)
    _, I4 = search_shards(shards, xq, 40, plan.nprobe)
    reranked = recall_from_truth(D_true, xq, xb16, rerank(xb16, xq, I4, 10)[1])
    assert reranked >= RECALL_FLOOR_RERANKED > plain, f"recall@10 {plain:.3f} plain, {reranked:.3f} re-ranked"


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
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["CURRENT", "HISTORY", good.name]), "no temp folder left"


def test_gate_tunes_search_defaults_when_the_plan_misses_the_floor(tmp_path: Path) -> None:
    """nprobe 1 of 64 lists misses neighbours in other lists: the gate raises nprobe / re-rank until recall
    reaches the floor, records the cheapest passing pair as the version's search defaults, and the engine's
    candidate count is the one the gate measured with."""
    from engine.search import Searcher
    from engine.types import SearchQuery, SearchRequest
    from indexer.validate import rerank_candidates

    centers = 4.0 * np.random.default_rng(3).standard_normal((30, 32)) / np.sqrt(32)
    xb = clustered(6000, centers, np.random.default_rng(4))
    path = build_index_from_vectors(xb, make_products(6000), tmp_path, "a" * 64, tmp_path, factory="IVF64,PQ16x8",
                                    nprobe=1, validation_queries=100)
    manifest = json.loads((path / "manifest.json").read_text())
    validation, defaults = manifest["validation"], manifest["search_defaults"]
    trials = validation["tuning"]["trials"]
    assert validation["tuning"]["planned"]["nprobe"] == 1 and trials[0]["recall_at_10"] < RECALL_FLOOR_RERANKED
    assert trials[-1]["recall_at_10"] >= RECALL_FLOOR_RERANKED > max(t["recall_at_10"] for t in trials[:-1])
    assert defaults == {"nprobe": trials[-1]["nprobe"], "rerank_factor": trials[-1]["rerank_factor"]}
    assert defaults["nprobe"] > 1 and validation["recall_at_10"] == trials[-1]["recall_at_10"]
    with open_current(tmp_path) as version:
        assert (version.default_nprobe, version.rerank_factor) == (defaults["nprobe"], defaults["rerank_factor"])
        searcher = Searcher(version, lambda images, deadline: np.zeros((0, 32), np.float32))
        request = SearchRequest(SearchQuery(vector=xb[0]), top_k=10)
        assert searcher._fetch_k(10, request) == rerank_candidates(10, defaults["rerank_factor"], 6000)
        assert searcher.search(request).hits[0].product_id == "p0"


def test_ivf_version_validates_and_searches(tmp_path: Path) -> None:
    xb = _vectors(2000)
    path = build_index_from_vectors(xb, make_products(2000), tmp_path, "a" * 64, tmp_path, factory="IVF16,Flat",
                                    nprobe=16, num_shards=3, validation_queries=50)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["factory"] == "IVF16,Flat" and manifest["search_defaults"] == {"nprobe": 16, "rerank_factor": 1}
    assert manifest["validation"]["recall_at_10"] == 1.0  # nprobe == nlist: exhaustive
    with open_current(tmp_path) as version:
        assert len(version.shards) == 3
        _, I = version.search(xb[:3], 1)  # noqa: E741
        assert I[:, 0].tolist() == [0, 1, 2]
