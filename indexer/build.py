"""The index build job: embed the catalog -> plan -> train -> add to shards -> validate -> publish.

Each stage is a named function a test (or a later resumable/distributed driver) can call alone:
`embed_catalog`, `plan_for`, `train_index`, `add_vectors`, `validate_version`, and
`build_index_from_vectors` which writes the version (indexer.version) and publishes CURRENT only
when validation passed. `build_index(config)` runs them all from LMDB shards and a checkpoint.

The model readers and the Embedder (torch, timm) are imported inside the stages that use them, so
`build_index_from_vectors` (used by tests and the engine's test fixtures) stays light.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from indexer.errors import ValidationFailed
from indexer.plan import IndexPlan, plan_from_factory, plan_index
from indexer.version import IndexVersion, publish_current, write_version
from model.catalog import Product

logger = logging.getLogger("vitrine.indexer")

__all__ = [
    "IndexBuildConfig", "Embeddings", "ValidationFailed", "embed_catalog", "plan_for", "train_index",
    "add_vectors", "validate_version", "build_index_from_vectors", "build_index",
]


@dataclass(frozen=True)
class IndexBuildConfig:
    """Configuration of one index build; saved as build_config in the version's manifest."""

    shards_dir: str | Path  # catalog shards folder (manifest.json + shard-*.lmdb) from model.data ingest
    model: str | Path  # checkpoint folder (model.pt + model_card.json)
    index_root: str | Path  # versions are written to <index_root>/<version>/, CURRENT beside them
    batch_size: int = 64  # images per embedder forward pass
    factory: str | None = None  # Faiss factory string; None: plan_index(n, dim)
    nprobe: int | None = None  # default lists probed per query; None: the plan's default
    num_shards: int = 1  # Faiss shards, contiguous ranges of internal ids
    num_workers: int = 2  # threads decoding images while the model embeds (0: decode inline)
    device: str = "cpu"  # torch device of the embedder
    seed: int = 0  # seeds training sample, k-means and validation query sample
    validation_queries: int = 256  # catalog vectors used as validation queries
    min_recall_at_10: float = 0.5  # validation floor for approximate indices (exact ones need 1.0)
    publish: bool = True  # point CURRENT at the new version when validation passes


@dataclass
class Embeddings:
    """Output of the embedding stage: one row per decodable catalog image."""

    vectors: np.ndarray  # float32 (N, dim), rows L2-normalised
    products: list[Product]  # row i's product
    model_fingerprint: str  # Embedder.fingerprint (sha256 of the weights)
    model_path: str  # absolute checkpoint folder
    report: dict[str, Any] = field(default_factory=dict)  # records, embedded, bad_images, images_per_s


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _decode_or_none(record: Any) -> Any:
    """Decoded PIL image of a shard record, or None (logged) when its bytes are not a usable image."""
    from model.images import ImageDecodeError, decode_image

    try:
        return decode_image(record.image_bytes)
    except ImageDecodeError as exc:
        logger.warning("skipping product %s: bad image: %s", record.product.product_id, exc)
        return None


def embed_catalog(config: IndexBuildConfig) -> Embeddings:
    """Embed every image of the catalog shards with the checkpoint's Embedder (stable shard order).

    Undecodable images are skipped, logged and counted in the report (never silently dropped).
    """
    from model.data import iter_shard_records, load_shards_manifest
    from model.embedder import Embedder

    embedder = Embedder.load(config.model, device=config.device)
    total = load_shards_manifest(config.shards_dir).get("records")
    parts: list[np.ndarray] = []
    products: list[Product] = []
    bad = 0
    start = time.perf_counter()
    pool = ThreadPoolExecutor(config.num_workers) if config.num_workers > 0 else None
    with tqdm(total=total, unit="img", desc="embed", mininterval=2.0) as bar:
        for batch in _batched(iter_shard_records(config.shards_dir), config.batch_size):
            images = list(pool.map(_decode_or_none, batch)) if pool else [_decode_or_none(r) for r in batch]
            good = [(record, image) for record, image in zip(batch, images, strict=True) if image is not None]
            bad += len(batch) - len(good)
            if good:
                parts.append(embedder.embed_images([image for _, image in good], batch_size=config.batch_size))
                products.extend(record.product for record, _ in good)
            bar.update(len(batch))
    if pool:
        pool.shutdown()
    seconds = time.perf_counter() - start
    if not products:
        raise ValueError(f"no decodable images in {config.shards_dir} ({bad} bad): nothing to index")
    vectors = np.concatenate(parts).astype(np.float32, copy=False)
    report = {"records": len(products) + bad, "embedded": len(products), "bad_images": bad,
              "seconds": round(seconds, 3), "images_per_s": round(len(products) / max(seconds, 1e-9), 2)}
    logger.info("embedded %d images (%d bad) in %.1f s, %.1f images/s, dim %d",
                len(products), bad, seconds, report["images_per_s"], vectors.shape[1])
    return Embeddings(vectors, products, embedder.fingerprint, str(Path(config.model).resolve()), report)


def plan_for(n: int, dim: int, factory: str | None = None, nprobe: int | None = None) -> IndexPlan:
    """The index plan: `plan_index` unless a factory string is given; nprobe overrides the default."""
    plan = plan_index(n, dim) if factory is None else plan_from_factory(factory, n, dim)
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
    """An empty index for `plan.factory`, trained on a seeded sample of plan.train_size vectors.

    Polysemous PQ training is switched off (see below); k-means and PQ seeds are set from `seed`.
    """
    dim = vectors.shape[1]
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    base_ivf = faiss.try_extract_index_ivf(index)
    ivf: Any = None if base_ivf is None else faiss.downcast_index(base_ivf)  # IndexIVFPQ, not IndexIVF: reach .pq
    if ivf is not None:
        ivf.cp.seed = seed
    for part in (ivf, index):
        if part is not None and hasattr(part, "do_polysemous_training"):
            # Polysemous codes only help Hamming-filtered search, which we do not use; its training is
            # simulated annealing that costs far more than the PQ k-means itself.
            part.do_polysemous_training = False
        if part is not None and hasattr(part, "pq"):
            part.pq.cp.seed = seed
    if index.is_trained:
        return index
    rng = np.random.default_rng(seed)
    size = min(plan.train_size or len(vectors), len(vectors))
    sample = np.sort(rng.choice(len(vectors), size=size, replace=False))
    start = time.perf_counter()
    index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    logger.info("trained %s on %d vectors in %.1f s", plan.factory, size, time.perf_counter() - start)
    return index


def add_vectors(trained: faiss.Index, vectors: np.ndarray, num_shards: int = 1,
                chunk: int = 65_536) -> list[faiss.Index]:
    """Fill `num_shards` copies of the trained index; shard s gets a contiguous range of internal ids."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    shards = []
    for ids in np.array_split(np.arange(len(vectors), dtype=np.int64), num_shards):
        shard = faiss.clone_index(trained)
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            shard.add_with_ids(np.ascontiguousarray(vectors[part], dtype=np.float32), part)
        shards.append(shard)
    logger.info("added %d vectors to %d shard(s) of %s", len(vectors), num_shards, type(trained).__name__)
    return shards


def shard_ids(index: faiss.Index) -> np.ndarray:
    """All internal ids stored in one shard (IndexIDMap or IVF inverted lists)."""
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise ValueError(f"cannot list ids of a {type(index).__name__}: wrap it in IDMap")
    invlists = ivf.invlists
    assert invlists is not None
    parts = [faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst)).copy()
             for lst in range(ivf.nlist) if invlists.list_size(lst)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


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


def _all_finite(array: np.ndarray, chunk: int = 65_536) -> bool:
    """np.isfinite(array).all() in row chunks, so a memory-mapped matrix is not loaded at once."""
    return all(bool(np.isfinite(array[start : start + chunk]).all()) for start in range(0, len(array), chunk))


def validate_version(version: IndexVersion, vectors: np.ndarray, products: Sequence[Product], *,
                     exact: bool, queries: int = 256, min_recall_at_10: float = 0.5, seed: int = 0) -> dict:
    """Check a written (not yet published) version against the build's inputs; ValidationFailed if bad.

    Checks: counts match, stored vectors finite and equal to the inputs (float16), ids unique and
    0..N-1, catalog rows line up, recall@10 against exact IndexFlatIP search on a sample of the
    catalog vectors as queries (>= min_recall_at_10; exactly 1.0 for an exact index).
    """
    n = len(vectors)
    problems = []
    if version.count != n or len(products) != n:
        problems.append(f"counts differ: index {version.count}, vectors {n}, products {len(products)}")
    ids = np.sort(np.concatenate([shard_ids(shard) for shard in version.shards]))
    if not np.array_equal(ids, np.arange(n)):
        problems.append(f"shard ids are not unique 0..{n - 1} ({len(ids)} ids, {len(np.unique(ids))} distinct)")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    stored = version.vectors_of(rows)
    if not _all_finite(version.vectors) or not np.allclose(stored, vectors[rows], atol=2e-3):
        problems.append("stored float16 vectors are not finite or do not match the embeddings")
    if [p.product_id for p in version.products(rows)] != [products[i].product_id for i in rows]:
        problems.append("catalog store rows do not match the products")
    k = min(10, n)
    xq = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    _, I = version.search(xq, k)  # noqa: E741
    recall = recall_at_k(np.ascontiguousarray(vectors, dtype=np.float32), xq, I, k)
    floor = 1.0 if exact else min_recall_at_10
    report = {"recall_at_10": round(recall, 6), "queries": len(rows), "k": k, "nprobe": version.default_nprobe,
              "min_recall_at_10": floor, "count": n, "passed": False}
    if recall < floor - 1e-9:
        problems.append(f"recall@10 {recall:.4f} is below the floor {floor}")
    if problems:
        raise ValidationFailed("validation failed: " + "; ".join(problems), {**report, "problems": problems})
    logger.info("validation passed: recall@10 %.4f over %d queries (nprobe %s)", recall, len(rows), report["nprobe"])
    return {**report, "passed": True}


def build_index_from_vectors(
    vectors: np.ndarray, products: Sequence[Product], index_root: str | Path, model_fingerprint: str,
    model_path: str | Path, factory: str | None = None, *, nprobe: int | None = None, num_shards: int = 1,
    seed: int = 0, validation_queries: int = 256, min_recall_at_10: float = 0.5, publish: bool = True,
    build_config: dict | None = None, catalog_report: dict | None = None, extra_manifest: dict | None = None,
    name: str | None = None,
) -> Path:
    """Plan, train, add, write, validate and (when validation passes) publish a version from arrays.

    Returns the new version's path. On ValidationFailed nothing is written and CURRENT is untouched.
    """
    vectors = np.asarray(vectors)
    check_vectors(vectors)
    if len(products) != len(vectors):
        raise ValueError(f"{len(products)} products but {len(vectors)} vectors")
    n, dim = vectors.shape
    plan = plan_for(n, dim, factory, nprobe)
    logger.info("index plan for %d x %d: %s (%s), about %.1f MiB", n, dim, plan.factory, plan.to_json(),
                plan.bytes_per_vector(dim) * n / 2**20)
    shards = add_vectors(train_index(vectors, plan, seed), vectors, num_shards)
    fields = {
        "model_fingerprint": model_fingerprint, "model_path": str(Path(model_path).resolve()), "dim": dim,
        "factory": plan.factory, "plan": plan.to_json(), "search_defaults": {"nprobe": plan.nprobe},
        "build_config": build_config or {}, "catalog": catalog_report or {}, **(extra_manifest or {}),
    }

    def check(version: IndexVersion) -> dict:
        report = validate_version(version, vectors, products, exact=plan.is_exact, queries=validation_queries,
                                  min_recall_at_10=min_recall_at_10, seed=seed)
        return {"validation": report}

    path = write_version(index_root, shards=shards, products=products, vectors=vectors, fields=fields,
                         name=name, check=check)
    logger.info("wrote index version %s (%s, %d vectors)", path, plan.factory, n)
    if publish:
        publish_current(index_root, path.name)
        logger.info("published %s as CURRENT under %s", path.name, index_root)
    return path


def build_index(config: IndexBuildConfig) -> Path:
    """The whole nightly build from catalog shards and a checkpoint; returns the new version's path."""
    from model.data import load_shards_manifest

    embeddings = embed_catalog(config)
    shards_manifest = load_shards_manifest(config.shards_dir)
    build_config = json.loads(json.dumps(asdict(config), default=str))  # paths as strings in the manifest
    return build_index_from_vectors(
        embeddings.vectors, embeddings.products, config.index_root, embeddings.model_fingerprint,
        embeddings.model_path, config.factory, nprobe=config.nprobe, num_shards=config.num_shards,
        seed=config.seed, validation_queries=config.validation_queries, min_recall_at_10=config.min_recall_at_10,
        publish=config.publish, build_config=build_config, catalog_report=shards_manifest.get("report", {}),
        extra_manifest={"embedding": embeddings.report},
    )
