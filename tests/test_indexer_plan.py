"""Table-driven tests pinning the index planning decisions (indexer.plan)."""

import pytest

from indexer.plan import EXACT_FACTORY, EXACT_MAX_N, IndexPlan, default_nprobe, plan_from_factory, plan_index


@pytest.mark.parametrize(
    ("n", "dim", "factory", "nlist", "pq_m", "train_size", "nprobe"),
    [
        (0, 128, "IDMap,Flat", 0, 0, 0, 1),
        (60, 768, "IDMap,Flat", 0, 0, 0, 1),
        (EXACT_MAX_N - 1, 768, "IDMap,Flat", 0, 0, 0, 1),
        (EXACT_MAX_N, 128, "IVF512,PQ32x8", 512, 32, 20_000, 32),
        (EXACT_MAX_N, 768, "IVF512,PQ64x8", 512, 64, 20_000, 32),
        (50_000, 384, "IVF1024,PQ64x8", 1024, 64, 50_000, 32),
        (100_000, 128, "IVF1024,PQ32x8", 1024, 32, 65_536, 32),
        (1_000_000, 768, "IVF4096,PQ64x8", 4096, 64, 262_144, 64),
        (10_000_000, 256, "IVF16384,PQ64x8", 16384, 64, 1_048_576, 128),
        (1_000_000_000, 768, "IVF131072,PQ64x8", 131072, 64, 8_388_608, 512),
        (30_000, 100, "IVF512,PQ25x8", 512, 25, 30_000, 32),
        (30_000, 6, "IVF512,PQ1x8", 512, 1, 30_000, 32),
    ],
)
def test_plan_index_table(n: int, dim: int, factory: str, nlist: int, pq_m: int, train_size: int, nprobe: int) -> None:
    plan = plan_index(n, dim)
    assert (plan.factory, plan.nlist, plan.pq_m, plan.train_size, plan.nprobe) == (
        factory, nlist, pq_m, train_size, nprobe)
    assert plan.is_exact == (factory == EXACT_FACTORY)
    if not plan.is_exact:
        assert dim % plan.pq_m == 0
        assert plan.nlist & (plan.nlist - 1) == 0, "nlist is a power of two"
        assert plan.train_size // plan.nlist >= 39, "at least 39 training points per list"


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="dim >= 1"):
        plan_index(10, 0)


@pytest.mark.parametrize(("nlist", "nprobe"), [(0, 1), (1, 1), (2, 2), (16, 4), (512, 32), (1024, 32), (4096, 64)])
def test_default_nprobe(nlist: int, nprobe: int) -> None:
    assert default_nprobe(nlist) == nprobe


@pytest.mark.parametrize(
    ("factory", "expected", "exact", "nlist", "train_size"),
    [
        ("Flat", "IDMap,Flat", True, 0, 0),
        ("IDMap,Flat", "IDMap,Flat", True, 0, 0),
        ("HNSW32", "IDMap,HNSW32", False, 0, 5000),
        ("IVF64,Flat", "IVF64,Flat", False, 64, 4096),
        ("IVF256,PQ16", "IVF256,PQ16", False, 256, 5000),
    ],
)
def test_plan_from_factory(factory: str, expected: str, exact: bool, nlist: int, train_size: int) -> None:
    plan = plan_from_factory(factory, 5000, 128)
    assert (plan.factory, plan.is_exact, plan.nlist, plan.train_size) == (expected, exact, nlist, train_size)


def test_plan_json_and_memory() -> None:
    plan = plan_index(1_000_000, 768)
    assert IndexPlan(**plan.to_json()) == plan
    assert plan.bytes_per_vector(768) == 64 + 8
    assert plan_index(10, 768).bytes_per_vector(768) == 768 * 4 + 8
