"""Training the coarse quantizer: two-level k-means for fine quantizers, against Faiss's own k-means."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from indexer import fill
from indexer.plan import plan_from_factory
from indexer.validate import exact_topk, recall_from_truth


def clustered(n: int, clusters: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` random centres (the shape of a catalog's embeddings)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    x = centers[rng.integers(clusters, size=n)] + 0.5 * rng.standard_normal((n, dim))
    x = np.ascontiguousarray(x, dtype=np.float32)
    faiss.normalize_L2(x)
    return x


@pytest.mark.parametrize(("counts", "nlist"), [([100, 100, 100, 100], 8), ([500, 3, 1, 0, 96], 60),
                                               ([40, 1, 1], 42), ([7], 7)])
def test_split_lists_is_proportional_and_never_exceeds_the_points(counts: list[int], nlist: int) -> None:
    counts_a = np.array(counts)
    lists = fill.split_lists(counts_a, nlist)
    assert lists.sum() == nlist and (lists <= counts_a).all()
    share = counts_a * nlist / counts_a.sum()
    assert (np.abs(lists - share) < 1 + (lists == counts_a)).all() or (lists == counts_a).any()


def test_two_level_centroids_match_faiss_kmeans_quality() -> None:
    """Same number of centroids, deterministic under a seed, and a k-means objective within 15% of Faiss's (points
    cannot move between first-level clusters; on 100k-1M vectors the recall of the index was the same)."""
    x = clustered(8_000, 100)
    centroids = fill.two_level_centroids(x, 128, seed=3)
    assert centroids.shape == (128, 32) and centroids.dtype == np.float32
    np.testing.assert_array_equal(centroids, fill.two_level_centroids(x, 128, seed=3))
    km = faiss.Kmeans(32, 128, niter=fill.KMEANS_NITER, seed=3)
    km.train(x)

    def objective(c: np.ndarray) -> float:  # mean squared distance to the nearest centroid
        index = faiss.IndexFlatL2(32)
        index.add(c)
        return float(index.search(x, 1)[0].mean())

    assert objective(centroids) <= 1.15 * objective(km.centroids)
    with pytest.raises(ValueError, match="at least as many training vectors"):
        fill.two_level_centroids(x[:100], 128)


@pytest.mark.parametrize("factory", ["IVF128,PQ8x8", "OPQ8,IVF128,PQ8x8", "IVF128_HNSW32,PQ8x8"])
def test_fine_quantizers_train_two_level_with_the_same_recall(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture, factory: str) -> None:
    """An index whose nlist reaches TWO_LEVEL_MIN_NLIST trains two-level (OPQ rotation first when there is
    one) and searches as well as the same index trained by Faiss's own k-means."""
    xb = clustered(12_000, 100)
    xq = clustered(200, 100, seed=1)
    plan = plan_from_factory(factory, len(xb), xb.shape[1])
    D_true, _ = exact_topk(xb, xq, 10)
    recalls = {}
    for threshold in (128, 10**9):
        monkeypatch.setattr(fill, "TWO_LEVEL_MIN_NLIST", threshold)
        with caplog.at_level(logging.INFO, logger="vitrine.indexer"):
            caplog.clear()
            index = fill.fill_shard(fill.train_index(xb, plan, use_gpu=False), xb, np.arange(len(xb)), use_gpu=False)
        assert ("two-level" in caplog.text) == (threshold == 128)
        assert index.ntotal == len(xb) and faiss.extract_index_ivf(index).quantizer.ntotal == 128
        faiss.extract_index_ivf(index).nprobe = 16
        recalls[threshold] = recall_from_truth(D_true, xq, xb, index.search(xq, 10)[1])
    assert recalls[128] >= recalls[10**9] - 0.03, recalls


def test_two_level_training_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A GPU Faiss claims but cannot use: the two-level k-means warns and trains on the CPU, same index."""
    xb = clustered(12_000, 100)
    plan = plan_from_factory("IVF128,PQ8x8", len(xb), xb.shape[1])
    monkeypatch.setattr(fill, "TWO_LEVEL_MIN_NLIST", 128)
    cpu = fill.train_index(xb, plan, use_gpu=False)

    def no_device(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", no_device, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", no_device, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", no_device, raising=False)
    with caplog.at_level(logging.WARNING, logger="vitrine.indexer"):
        fallback = fill.train_index(xb, plan)
    assert "training on the CPU" in caplog.text
    quantizers = [faiss.extract_index_ivf(i).quantizer for i in (cpu, fallback)]
    np.testing.assert_array_equal(*(faiss.rev_swig_ptr(faiss.downcast_index(q).get_xb(), 128 * 32) for q in quantizers))


@pytest.mark.parametrize("factory", ["IVF128,PQ8x8", "OPQ8,IVF128,PQ8x8"])
def test_adding_with_numpy_assignment_gives_faiss_lists(monkeypatch: pytest.MonkeyPatch, factory: str) -> None:
    """A CPU add to a fine flat quantizer picks lists by numpy products (CoarseAssigner): every vector lands in
    the list Faiss's own add picks (up to float rounding), search recall is unchanged, two adds are equal."""
    xb = clustered(12_000, 100)
    xq = clustered(200, 100, seed=1)
    plan = plan_from_factory(factory, len(xb), xb.shape[1])
    trained = fill.train_index(xb, plan, use_gpu=False)
    rows = np.arange(len(xb))
    monkeypatch.setattr(fill, "FAST_ASSIGN_MIN_NLIST", 10**9)
    assert not fill.CoarseAssigner.applies(trained)
    exact = fill.fill_shard(trained, xb, rows, use_gpu=False, chunk=5000)
    monkeypatch.setattr(fill, "FAST_ASSIGN_MIN_NLIST", 128)
    assert fill.CoarseAssigner.applies(trained)
    fast = [fill.fill_shard(trained, xb, rows, use_gpu=False, chunk=5000) for _ in range(2)]
    assert fast[0].ntotal == exact.ntotal == len(xb)

    def lists_of(index: faiss.Index) -> np.ndarray:  # the list each id was added to
        ivf = faiss.extract_index_ivf(index)
        out = np.empty(len(xb), dtype=np.int64)
        for number in range(ivf.nlist):
            size = ivf.invlists.list_size(number)
            out[faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size)] = number
        return out

    assert np.mean(lists_of(fast[0]) == lists_of(exact)) >= 0.999
    np.testing.assert_array_equal(lists_of(fast[0]), lists_of(fast[1]))
    D_true, _ = exact_topk(xb, xq, 10)
    recalls = []
    for index in (exact, fast[0]):
        faiss.extract_index_ivf(index).nprobe = 16
        recalls.append(recall_from_truth(D_true, xq, xb, index.search(xq, 10)[1]))
    assert abs(recalls[1] - recalls[0]) <= 0.005, recalls
