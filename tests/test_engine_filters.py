"""Filters that keep recall, shard fan-out and grouping, on real Faiss IVF-PQ versions (no server, no model).

Oracle: exact (brute-force) search over the products passing the filter, with the stored vectors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from engine.candidates import create_filter_plan, nprobe_for
from engine.search import Searcher
from engine.types import SearchFilter, SearchOptions, SearchQuery, SearchRequest
from indexer.build import build_index_from_vectors
from indexer.version import open_version
from model.catalog import Product

pytestmark = pytest.mark.timeout(120)

N, DIM, CLUSTERS = 12_000, 32, 60
BRANDS = ("Acme", "Bolt", "Crux", "Dune")


def clustered_vectors(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` random centres (like real embeddings: far from uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    xb = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return xb / np.linalg.norm(xb, axis=1, keepdims=True)


def synthetic_products(n: int, seed: int = 0, images_per_product: int = 1) -> list[Product]:
    """Products with a category of selectivity 1%, 10% or 50% (by price band), brands and stock."""
    rng = np.random.default_rng(seed + 1)
    u = rng.random(n)
    return [Product(product_id=f"p{i // images_per_product}", title=f"product {i // images_per_product}",
                    category="c1" if u[i] < 0.01 else "c10" if u[i] < 0.11 else "c50" if u[i] < 0.61 else "rest",
                    brand=BRANDS[i % len(BRANDS)], price=float(1 + i % 100), currency="EUR",
                    in_stock=bool(i % 5), image_url="", attributes={}, split=None) for i in range(n)]


def build(root: Path, factory: str, shards: int, images_per_product: int = 1) -> Path:
    """A version of N clustered vectors; a product's images are near-duplicates of one another."""
    xb = np.repeat(clustered_vectors(N // images_per_product, DIM, CLUSTERS), images_per_product, axis=0)
    if images_per_product > 1:
        xb = xb + 0.02 * np.random.default_rng(2).normal(size=xb.shape).astype(np.float32)
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    return build_index_from_vectors(xb, synthetic_products(N, images_per_product=images_per_product), root,
                                    "f" * 64, root / "no-model", factory, nprobe=4, num_shards=shards,
                                    min_recall_at_10=0.0, validation_queries=16)


def no_embed(images, deadline):  # noqa: ANN001, ANN201 - these tests never search by image
    raise AssertionError("no image queries here")


@pytest.fixture(scope="module")
def ivfpq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("ivfpq"), "IVF64,PQ8x8", shards=2)


def exact_filtered(xb: np.ndarray, passing: np.ndarray, xq: np.ndarray, k: int) -> list[set[int]]:
    ids = np.flatnonzero(passing)
    scores = xq @ xb[ids].T
    return [set(ids[np.argsort(-row, kind="stable")[:k]].tolist()) for row in scores]


@pytest.mark.parametrize("category", ["c50", "c10", "c1"])
def test_filtered_recall_against_exact(ivfpq: Path, category: str) -> None:
    """Recall@10 under 50%, 10% and 1% filters stays >= 0.9 (selector + adaptive nprobe, or exact)."""
    with open_version(ivfpq) as version:
        searcher = Searcher(version, no_embed, exact_max=500)
        xb = version.vectors_of(np.arange(version.count))
        search_filter = SearchFilter(categories=(category,))
        plan = searcher.shards.plan(search_filter)
        assert plan.exact == (category == "c1")  # 1% of 12k = 120 ids <= exact_max
        passing = np.array([p.category == category for p in synthetic_products(N)])
        xq = clustered_vectors(40, DIM, CLUSTERS, seed=7)
        truth = exact_filtered(xb, passing, xq, 10)
        requests = [SearchRequest(SearchQuery(vector=q), top_k=10, filter=search_filter,
                                  options=SearchOptions(one_per_product=False)) for q in xq]
        results = searcher.search_batch(requests)
        found = 0
        for result, expected in zip(results, truth, strict=True):
            assert not isinstance(result, Exception)
            assert len(result.hits) == 10 and all(h.product.category == category for h in result.hits)
            found += len({int(h.product_id[1:]) for h in result.hits} & expected)
        assert found / (10 * len(xq)) >= 0.9


def test_selector_plan_and_brand_filter(ivfpq: Path) -> None:
    with open_version(ivfpq) as version:
        searcher = Searcher(version, no_embed, exact_max=100)
        search_filter = SearchFilter(brands=("Bolt", "no such brand"), in_stock_only=True, max_price=50.0)
        plan = create_filter_plan(version, search_filter, exact_max=100)
        products = synthetic_products(N)
        expected = sum(p.brand == "Bolt" and p.in_stock and p.price <= 50.0 for p in products)
        assert plan.selector is not None and plan.passing == expected
        result = searcher.search(SearchRequest(SearchQuery(vector=np.ones(DIM, np.float32)), top_k=25,
                                               filter=search_filter))
        assert len(result.hits) == 25
        assert all(h.product.brand == "Bolt" and h.product.in_stock and h.product.price <= 50.0 for h in result.hits)
        nothing = searcher.search(SearchRequest(SearchQuery(vector=np.ones(DIM, np.float32)),
                                                filter=SearchFilter(brands=("no such brand",))))
        assert nothing.hits == ()


@pytest.mark.parametrize(("nprobe", "selectivity", "nlist", "expected"), [
    (16, 1.0, 1024, 16), (16, 0.25, 1024, 32), (16, 0.01, 1024, 160), (16, 0.0001, 1024, 1024),
    (4, 0.5, 64, 6), (100, 1.0, 64, 64),
])
def test_nprobe_for(nprobe: int, selectivity: float, nlist: int, expected: int) -> None:
    assert nprobe_for(nprobe, selectivity, nlist) == expected


def test_sharded_fan_out_equals_one_unsharded_index(tmp_path: Path) -> None:
    """Flat shards: the merged top k of 3 shards equals the top k of 1 index, ids and scores."""
    one, three = build(tmp_path / "one", "Flat", shards=1), build(tmp_path / "three", "Flat", shards=3)
    xq = clustered_vectors(20, DIM, CLUSTERS, seed=3)
    with open_version(one) as v1, open_version(three) as v3:
        assert len(v3.shards) == 3
        for search_filter in (SearchFilter(), SearchFilter(categories=("c50",))):
            plan1, plan3 = create_filter_plan(v1, search_filter, 0), create_filter_plan(v3, search_filter, 0)
            D1, I1 = Searcher(v1, no_embed).shards.search(xq, 15, None, plan1)
            D3, I3 = Searcher(v3, no_embed).shards.search(xq, 15, None, plan3)
            np.testing.assert_array_equal(I1, I3)
            np.testing.assert_allclose(D1, D3, atol=1e-6)


def test_one_per_product_returns_top_k_with_many_images(tmp_path: Path) -> None:
    """Products with 8 images each: grouping must search again instead of returning fewer hits."""
    path = build(tmp_path, "IVF16,Flat", shards=2, images_per_product=8)
    with open_version(path) as version:
        searcher = Searcher(version, no_embed)
        query = SearchQuery(vector=version.vector(0))
        grouped = searcher.search(SearchRequest(query, top_k=20))
        assert len(grouped.hits) == 20 and len({h.product_id for h in grouped.hits}) == 20
        scores = [h.score for h in grouped.hits]
        assert scores == sorted(scores, reverse=True)
        flat = searcher.search(SearchRequest(query, top_k=20, options=SearchOptions(one_per_product=False)))
        assert len(flat.hits) == 20 and len({h.product_id for h in flat.hits}) < 20


def test_exact_rerank_switch(ivfpq: Path) -> None:
    """Re-rank on: exact float16 scores; off: the PQ index's approximate scores (same products mostly)."""
    with open_version(ivfpq) as version:
        searcher = Searcher(version, no_embed)
        q = clustered_vectors(1, DIM, CLUSTERS, seed=11)[0]
        exact = searcher.search(SearchRequest(SearchQuery(vector=q), top_k=10))
        approx = searcher.search(SearchRequest(SearchQuery(vector=q), top_k=10,
                                               options=SearchOptions(exact_rerank=False)))
        for hit in exact.hits:
            stored = version.vector(version.internal_id(hit.product_id))
            assert hit.score == pytest.approx(float(stored @ q), abs=1e-4)
        assert any(abs(a.score - float(version.vector(version.internal_id(a.product_id)) @ q)) > 1e-4
                   for a in approx.hits)  # PQ scores are approximate
        assert len({h.product_id for h in exact.hits} & {h.product_id for h in approx.hits}) >= 5


def test_batch_equals_single_searches(ivfpq: Path) -> None:
    with open_version(ivfpq) as version:
        searcher = Searcher(version, no_embed)
        xq = clustered_vectors(6, DIM, CLUSTERS, seed=5)
        requests = [SearchRequest(SearchQuery(vector=q), top_k=5, filter=f)
                    for q in xq for f in (SearchFilter(), SearchFilter(categories=("c10",)))]
        requests.append(SearchRequest(SearchQuery(vector=np.ones(DIM + 1, np.float32))))  # bad: wrong dim
        batch = searcher.search_batch(requests)
        assert isinstance(batch[-1], ValueError) and "dimensions" in str(batch[-1])
        for request, outcome in zip(requests[:-1], batch[:-1], strict=True):
            single = searcher.search(request)
            assert not isinstance(outcome, Exception)
            assert [h.product_id for h in outcome.hits] == [h.product_id for h in single.hits]
            assert dataclasses.replace(outcome, took_us=0).index_version == single.index_version


def test_clustered_filter_probes_where_the_passing_vectors_are(tmp_path: Path) -> None:
    """A filter passing whole clusters (~10%), far from most queries: per-query list probing keeps recall
    >= 0.9, as the uniform nprobe fallback (grown, then doubled while short) does."""
    from engine import candidates

    rng = np.random.default_rng(4)
    centres = rng.normal(size=(CLUSTERS, DIM)).astype(np.float32)
    labels = rng.integers(0, CLUSTERS, N)
    xb = centres[labels] + 0.6 * rng.normal(size=(N, DIM)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    chosen = set(rng.choice(CLUSTERS, 6, replace=False).tolist())
    products = [dataclasses.replace(p, category="in" if labels[i] in chosen else "out")
                for i, p in enumerate(synthetic_products(N))]
    path = build_index_from_vectors(xb, products, tmp_path, "f" * 64, tmp_path / "no-model", "IVF64,PQ8x8",
                                    nprobe=4, num_shards=2, min_recall_at_10=0.0, validation_queries=16)
    xq = clustered_vectors(40, DIM, CLUSTERS, seed=9)  # queries from other centres: the filter is far away
    truth = exact_filtered(xb, np.array([p.category == "in" for p in products]), xq, 10)
    search_filter = SearchFilter(categories=("in",))

    def recall(searcher: Searcher) -> float:
        results = searcher.search_batch([SearchRequest(SearchQuery(vector=q), top_k=10, filter=search_filter,
                                                       options=SearchOptions(one_per_product=False)) for q in xq])
        return sum(len({int(h.product_id[1:]) for h in r.hits} & t)  # type: ignore[union-attr]
                   for r, t in zip(results, truth, strict=True)) / (10 * len(xq))

    with open_version(path) as version:
        probing = Searcher(version, no_embed, exact_max=0)
        assert probing.shards.plan(search_filter).list_passing is not None
        uniform = Searcher(version, no_embed, exact_max=0)
        uniform.shards._prober = None  # as for shards that do not allow list probing
        with_probing, with_uniform = recall(probing), recall(uniform)
    assert with_probing >= 0.9 and with_uniform >= 0.9
    assert candidates.nprobe_for(4, 0.1, 64) == 13


def test_scores_stay_within_minus_one_and_one(ivfpq: Path) -> None:
    """The stored float16 vectors are unit vectors only to ~1e-3: a product's own vector as the query scored
    1.0001 against itself, outside the -1..1 the API promises."""
    with open_version(ivfpq) as version:
        stored = version.vectors_of(np.arange(version.count)).astype(np.float32)
        longest = np.argsort(-np.linalg.norm(stored, axis=1))[:5]  # the float16 rows rounded up the most
        assert np.linalg.norm(stored[longest[0]]) > 1.0
        searcher = Searcher(version, no_embed)
        for row in longest:
            for query in (stored[row], -stored[row]):
                result = searcher.search(SearchRequest(SearchQuery(vector=query), top_k=5,
                                                       options=SearchOptions(one_per_product=False)))
                assert all(-1.0 <= hit.score <= 1.0 for hit in result.hits)
            best = searcher.search(SearchRequest(SearchQuery(vector=stored[row]), top_k=1)).hits[0]
            assert best.product_id == f"p{row}" and best.score == 1.0
