"""Table-driven tests pinning the index planning decisions (indexer.plan)."""

import re

import pytest

from indexer.plan import (
    EXACT_FACTORY,
    EXACT_MAX_N,
    IndexPlan,
    MemoryBudgetError,
    check_memory,
    default_nprobe,
    estimate_memory,
    parse_bytes,
    plan_from_factory,
    plan_index,
)


@pytest.mark.parametrize(
    ("n", "dim", "factory", "nlist", "pq_m", "train_size", "nprobe"),
    [
        (0, 128, "IDMap,Flat", 0, 0, 0, 1),
        (60, 768, "IDMap,Flat", 0, 0, 0, 1),
        (EXACT_MAX_N - 1, 768, "IDMap,Flat", 0, 0, 0, 1),
        (EXACT_MAX_N, 128, "IVF512,PQ32x8", 512, 32, 20_000, 32),
        (EXACT_MAX_N, 768, "IVF512,PQ64x8", 512, 64, 20_000, 32),
        (50_000, 384, "IVF1024,PQ64x8", 1024, 64, 50_000, 32),
        (100_000, 128, "IVF2048,PQ32x8", 2048, 32, 100_000, 64),
        (1_000_000, 768, "IVF16384,PQ64x8", 16384, 64, 1_000_000, 128),
        (10_000_000, 256, "IVF65536,PQ64x8", 65536, 64, 4_194_304, 256),
        (1_000_000_000, 768, "IVF262144,PQ64x8", 262144, 64, 16_777_216, 512),  # capped at MAX_NLIST
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


GiB = 2**30


@pytest.mark.parametrize(
    ("n", "dim", "budget", "target", "factory"),
    [
        (1_000_000, 256, None, 0.95, "IVF16384,PQ64x8"),
        (1_000_000, 256, 8 * GiB, 0.95, "IVF16384,PQ64x8"),  # fits: the 0.95 plan unchanged
        (5_000_000, 256, 5_500_000_000, 0.95, "OPQ32,IVF32768,PQ32x8"),  # 64-byte codes just over: compress
        (1_000_000, 256, None, 0.9, "OPQ32,IVF16384,PQ32x8"),  # lower target: 8 dims per byte, rotated
        (1_000_000, 256, None, 0.8, "OPQ16,IVF16384,PQ16x8"),
        (100_000, 256, 1 * GiB, 0.95, "IVF2048,PQ64x8"),
        (15_000, 256, None, 0.95, "IDMap,Flat"),
        (15_000, 256, 60 * 2**20, 0.95, "IVF256,PQ64x8"),  # flat (66 MiB with the catalog) over budget
    ],
)
def test_plan_under_budget_and_target(n: int, dim: int, budget: int | None, target: float, factory: str) -> None:
    plan = plan_index(n, dim, memory_budget=budget, target_recall=target)
    assert plan.factory == factory
    assert plan.opq == factory.startswith("OPQ") and plan.rerank_factor == (1 if plan.is_exact else 4)
    if budget is not None:
        assert estimate_memory(plan, n, dim).peak <= budget


def test_budget_that_cannot_be_met_names_budget_and_estimate() -> None:
    with pytest.raises(MemoryBudgetError, match=r"memory budget 512\.0 MiB cannot be met .* needs about") as err:
        plan_index(1_000_000, 256, memory_budget=512 * 2**20)
    assert "--memory-budget" in str(err.value)
    with pytest.raises(MemoryBudgetError, match="over the memory budget 1.0 KiB"):
        check_memory(plan_index(50_000, 64), 50_000, 64, 1024)


def test_memory_estimate_grows_with_n_and_shrinks_per_shard() -> None:
    plan = plan_index(1_000_000, 256)
    one, four = estimate_memory(plan, 1_000_000, 256), estimate_memory(plan, 1_000_000, 256, num_shards=4)
    assert one.resident == 1_000_000 * 72 + 16384 * 256 * 4 + 256 * 256 * 4
    assert four.add < one.add and one.train == 2 * 1_000_000 * 256 * 4 + 1_000_000 * 8 + 16384 * 256 * 4 + 256 * 256 * 4
    assert estimate_memory(plan, 2_000_000, 256).peak > one.peak


@pytest.mark.parametrize(("text", "value"), [("8GB", 8 * GiB), ("8G", 8 * GiB), ("512MiB", 512 * 2**20),
                                             ("1.5 gb", int(1.5 * GiB)), ("1000", 1000), ("4kb", 4096)])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_parse_bytes_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="write e.g. 8GB"):
        parse_bytes("lots")


@pytest.mark.parametrize("factory, n, message", [
    ("Garbage", 1000, "cannot build the factory string 'Garbage' for 256-d vectors"),
    ("IVF16,PQ7", 1000, "cannot build the factory string 'IVF16,PQ7'"),  # 256 is no multiple of 7
    ("IVF4096,Flat", 300, "4096 inverted lists, more than the 300 vectors"),
])
def test_a_user_factory_that_cannot_be_built_is_a_value_error(factory: str, n: int, message: str) -> None:
    """--factory Garbage or IVF16,PQ7 stopped the build with a Faiss RuntimeError traceback; IVF4096 on 300
    vectors did so after the whole embed stage."""
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_from_factory(factory, n, 256)
    assert plan_from_factory("IVF16,PQ32", 1000, 256).nlist == 16
    assert plan_from_factory("IVF4096,Flat", 300, 256, trains=False).nlist == 4096  # an update reuses the training
