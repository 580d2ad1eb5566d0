"""Building an index version from arrays in memory, and the names of the staged build job.

The nightly build is the staged, resumable job of `indexer.job` (`IndexBuildConfig`, `build_index`,
re-exported here). `build_index_from_vectors` builds a version in one call from vectors and products
already in memory (tests, the engine's fixtures, small catalogs): plan, train, fill the shards (by
sha1 of the product id), write, validate with re-ranking, and publish CURRENT only when validation
passed. Both share the same training, shard filling, validation and version writing code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from indexer import fill
from indexer.errors import ValidationFailed
from indexer.fill import assign_shards, fill_shards, sample_rows
from indexer.job import STAGES, BuildJob, IndexBuildConfig, build_index
from indexer.plan import IndexPlan, plan_from_factory, plan_index
from indexer.publish import publish_version, write_built_version
from indexer.validate import shard_ids, validate_version
from indexer.version import IndexVersion
from model.catalog import Product

logger = logging.getLogger("vitrine.indexer")

__all__ = [
    "STAGES", "BuildJob", "IndexBuildConfig", "ValidationFailed", "build_index", "plan_for", "train_index",
    "add_vectors", "build_index_from_vectors", "recall_at_k", "shard_ids", "check_vectors",
]


def plan_for(n: int, dim: int, factory: str | None = None, nprobe: int | None = None, *,
             memory_budget: int | None = None, num_shards: int = 1) -> IndexPlan:
    """The index plan: `plan_index` unless a factory string is given; nprobe overrides the default."""
    plan = plan_index(n, dim, memory_budget=memory_budget, num_shards=num_shards) if factory is None \
        else plan_from_factory(factory, n, dim)
    if nprobe is not None:
        plan = IndexPlan(**{**plan.to_json(), "nprobe": int(nprobe)})
    return plan


def check_vectors(vectors: np.ndarray) -> None:
    """Refuse vectors that are not a finite (N, dim) array: ValidationFailed before any work."""
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValidationFailed(f"vectors must be a non-empty (N, dim) array, got shape {vectors.shape}")
    bad_rows = int((~np.isfinite(vectors).all(axis=1)).sum())
    if bad_rows:
        raise ValidationFailed(f"{bad_rows} of {vectors.shape[0]} vectors contain NaN or infinite values")


def train_index(vectors: np.ndarray, plan: IndexPlan, seed: int = 0) -> faiss.Index:
    """An empty index for `plan.factory` trained on a seeded sample (see indexer.fill.train_index)."""
    return fill.train_index(vectors, plan, seed)


def add_vectors(trained: faiss.Index, vectors: np.ndarray, num_shards: int = 1,
                chunk: int = 65_536) -> list[faiss.Index]:
    """Fill `num_shards` copies of the trained index; shard s gets a contiguous range of internal ids."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    assigner = fill.CoarseAssigner.for_index(trained)
    return [fill.fill_shard(trained, vectors, ids, chunk=chunk, assigner=assigner)
            for ids in np.array_split(np.arange(len(vectors), dtype=np.int64), num_shards)]


def recall_at_k(xb: np.ndarray, xq: np.ndarray, I: np.ndarray, k: int) -> float:  # noqa: E741
    """Share of exact top-k neighbours found in I (tie-aware: a result scoring >= the k-th exact score counts)."""
    exact = faiss.IndexFlatIP(xb.shape[1])
    exact.add(xb)
    D_true, I_true = exact.search(xq, k)
    hits = 0
    for row in range(len(xq)):
        found = I[row][I[row] >= 0]
        scores = xb[found] @ xq[row]
        hits += int(np.sum(np.isin(found, I_true[row]) | (scores >= D_true[row, -1] - 1e-5)))
    return hits / float(len(xq) * k)


def build_index_from_vectors(
    vectors: np.ndarray, products: Sequence[Product], index_root: str | Path, model_fingerprint: str,
    model_path: str | Path, factory: str | None = None, *, nprobe: int | None = None, num_shards: int = 1,
    seed: int = 0, validation_queries: int = 256, min_recall_at_10: float = 0.95, tune_search: bool = True,
    publish: bool = True,
    build_config: dict | None = None, catalog_report: dict | None = None, extra_manifest: dict | None = None,
    name: str | None = None, keep_versions: int | None = None, digests: np.ndarray | None = None,
    plan: IndexPlan | None = None, trained: faiss.Index | None = None, memory_budget: int | None = None,
) -> Path:
    """Plan, train, add, write, validate and (when validation passes) publish a version from arrays.

    `plan` + `trained` (an empty trained index) reuse an existing quantizer (incremental updates).
    Returns the new version's path. On ValidationFailed nothing is written and CURRENT is untouched.
    """
    vectors = np.asarray(vectors)
    check_vectors(vectors)
    if len(products) != len(vectors):
        raise ValueError(f"{len(products)} products but {len(vectors)} vectors")
    n, dim = vectors.shape
    vectors16 = np.ascontiguousarray(vectors, dtype=np.float16)  # what the version stores and re-ranks with
    plan = plan or plan_for(n, dim, factory, nprobe, memory_budget=memory_budget, num_shards=num_shards)
    logger.info("index plan for %d x %d: %s (%s)", n, dim, plan.factory, plan.to_json())
    queries = sample_rows(n, validation_queries, seed + 1)
    if trained is None:
        exclude = queries if n - len(queries) >= plan.train_size else None
        trained = fill.train_index(vectors16, plan, seed, exclude=exclude)
    numbers = assign_shards([p.product_id for p in products], num_shards)
    shards = fill_shards(trained, vectors16, numbers, num_shards)
    fields = {
        "model_fingerprint": model_fingerprint, "model_path": str(Path(model_path).resolve()), "dim": dim,
        "factory": plan.factory, "plan": plan.to_json(),
        "search_defaults": {"nprobe": plan.nprobe, "rerank_factor": plan.rerank_factor},
        "sharding": {"scheme": "sha1(product_id)[:8] mod num_shards", "num_shards": num_shards},
        "build_config": build_config or {}, "catalog": catalog_report or {}, **(extra_manifest or {}),
    }
    product_ids = [p.product_id for p in products]

    def check(version: IndexVersion) -> dict:
        report = validate_version(version, vectors16, product_ids, exact=plan.is_exact, query_rows=queries,
                                  min_recall_at_10=min_recall_at_10, tune=tune_search,
                                  model_fingerprint=model_fingerprint)
        return {"validation": report, "search_defaults": report["search_defaults"]}  # maybe tuned

    path = write_built_version(index_root, shards=shards, products=products, vectors=vectors16, fields=fields,
                               digests=digests, name=name, check=check)
    logger.info("wrote index version %s (%s, %d vectors)", path, plan.factory, n)
    if publish:
        publish_version(index_root, path.name, keep_versions)
    return path
