"""The validation gate: a written (not yet published) version is checked before CURRENT may point at it.

Checks: counts match the embedded catalog; no NaN or infinite stored vector, and the stored float16
vectors equal the embeddings; internal ids unique and exactly 0..N-1 across the shards; catalog rows
line up with the products; the model fingerprint recorded; recall@10 against exact search at the
version's default search parameters **with exact re-ranking**, fetching exactly the candidates the engine
fetches (`rerank_candidates`: k * rerank_factor + 1, at least 100), re-scoring them from the float16
vectors and keeping the best k: at least a floor (1.0 for exact indices). When the plan's defaults miss
the floor, the gate tunes them like autofaiss does: it tries larger re-rank factors (x2, x4) and then
larger nprobe (x2, x4, x8), cheapest first, and the first pair that reaches the floor becomes the
version's `search_defaults` (the trials are in the validation report); the gate fails only when none does.
Queries are catalog embeddings held out of the quantizer's training sample. Exact search streams the
vectors in chunks, so the check's memory stays bounded on millions of vectors.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import faiss
import numpy as np

from indexer.errors import ValidationFailed
from indexer.version import IndexVersion

logger = logging.getLogger("vitrine.indexer")

_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
RERANK_MIN_CANDIDATES = 100  # fewest candidates re-scored exactly (PQ orders near neighbours coarsely)
MIN_RERANK_FACTOR = 4  # candidates per wanted hit, at least
NPROBE_STEPS = (1, 2, 4, 8)  # multipliers of the planned nprobe tried by the tuner (outer loop)
FACTOR_STEPS = (1, 2, 4)  # multipliers of the planned re-rank factor (inner loop: cheaper than more lists)


def rerank_candidates(k: int, rerank_factor: int, count: int) -> int:
    """Candidates the engine fetches to return k re-ranked hits: k * factor + 1 (a spare for an excluded
    product), at least RERANK_MIN_CANDIDATES, at most the index size. Shared by the gate and the engine."""
    return min(count, max(k * max(MIN_RERANK_FACTOR, rerank_factor) + 1, RERANK_MIN_CANDIDATES))


def exact_topk(vectors: np.ndarray, xq: np.ndarray, k: int, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of xq over all rows of `vectors` (float16 or float32, maybe memory-mapped)."""
    nq = len(xq)
    best_d = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        block = np.asarray(vectors[start : start + chunk], dtype=np.float32)
        scores = xq @ block.T
        kk = min(k, block.shape[0])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        d = np.concatenate([best_d, np.take_along_axis(scores, part, axis=1)], axis=1)
        i = np.concatenate([best_i, part + start], axis=1)
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)
    return best_d, best_i


def rerank(vectors: np.ndarray, xq: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: E741
    """Re-score candidate ids I (nq, k') exactly from `vectors` and keep the best k per query."""
    out_d = np.full((len(xq), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(xq), k), -1, dtype=np.int64)
    for row in range(len(xq)):
        ids = I[row][I[row] >= 0]
        if len(ids) == 0:
            continue
        order = np.sort(ids)
        scores = np.asarray(vectors[order], dtype=np.float32) @ xq[row]
        best = np.argsort(-scores, kind="stable")[:k]
        out_d[row, : len(best)], out_i[row, : len(best)] = scores[best], order[best]
    return out_d, out_i


def search_reranked(version: IndexVersion, xq: np.ndarray, k: int, nprobe: int | None = None,
                    rerank_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search as the engine does: `rerank_candidates` at nprobe, re-scored from the float16 vectors."""
    factor = version.rerank_factor if rerank_factor is None else rerank_factor
    _, I = version.search(xq, rerank_candidates(k, factor, version.count), nprobe)  # noqa: E741
    return rerank(version.vectors, xq, I, k)


def tune_search(version: IndexVersion, xq: np.ndarray, D_true: np.ndarray, floor: float,
                nlist: int) -> tuple[dict[str, int] | None, list[dict]]:
    """The cheapest (nprobe, rerank_factor) from the planned defaults up whose recall@10 reaches `floor`.

    Returns (the pair or None, every trial as {nprobe, rerank_factor, recall_at_10}), trials in cost order.
    """
    base_probe, base_factor = version.default_nprobe or 1, max(1, version.rerank_factor)
    trials: list[dict] = []
    for probe in dict.fromkeys(min(nlist, base_probe * m) for m in NPROBE_STEPS):
        for factor in (base_factor * m for m in FACTOR_STEPS):
            _, I = search_reranked(version, xq, D_true.shape[1], probe, factor)  # noqa: E741
            recall = recall_from_truth(D_true, xq, version.vectors, I)
            trials.append({"nprobe": probe, "rerank_factor": factor, "recall_at_10": round(recall, 6)})
            if recall >= floor - 1e-9:
                return {"nprobe": probe, "rerank_factor": factor}, trials
    return None, trials


def recall_from_truth(D_true: np.ndarray, xq: np.ndarray, vectors: np.ndarray, I: np.ndarray) -> float:  # noqa: E741
    """Tie-aware recall@k: a found id counts when it is an exact top-k id or scores >= the k-th exact score."""
    k = D_true.shape[1]
    hits = 0
    for row in range(len(xq)):
        found = I[row][I[row] >= 0][:k]
        scores = np.asarray(vectors[np.sort(found)], dtype=np.float32) @ xq[row]
        hits += int(np.sum(scores >= D_true[row, -1] - 1e-4))
    return hits / float(len(xq) * k)


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


def _nlist(version: IndexVersion) -> int:
    """Inverted lists of the version's IVF shards (0: not an IVF index)."""
    ivf = faiss.try_extract_index_ivf(version.shards[0]) if version.shards else None
    return int(ivf.nlist) if ivf is not None else 0


def _all_finite(array: np.ndarray, chunk: int = 65_536) -> bool:
    return all(bool(np.isfinite(array[start : start + chunk]).all()) for start in range(0, len(array), chunk))


def _structure_problems(version: IndexVersion, vectors: np.ndarray, product_ids: Sequence[str],
                        rows: np.ndarray, fingerprint: str) -> list[str]:
    n = len(vectors)
    problems = []
    if version.count != n or len(product_ids) != n:
        problems.append(f"counts differ: index {version.count}, embeddings {n}, products {len(product_ids)}")
    ids = np.sort(np.concatenate([shard_ids(shard) for shard in version.shards]))
    if not np.array_equal(ids, np.arange(n)):
        problems.append(f"shard ids are not unique 0..{n - 1} ({len(ids)} ids, {len(np.unique(ids))} distinct)")
    if not _all_finite(version.vectors):
        problems.append("stored vectors contain NaN or infinite values")
    elif not np.allclose(version.vectors_of(rows), np.asarray(vectors[rows], dtype=np.float32), atol=2e-3):
        problems.append("stored float16 vectors do not match the embeddings")
    if [p.product_id for p in version.products(rows)] != [product_ids[i] for i in rows]:
        problems.append("catalog store rows do not match the products")
    if not _FINGERPRINT_RE.match(version.model_fingerprint) or version.model_fingerprint != fingerprint:
        problems.append(f"model fingerprint {version.model_fingerprint!r} is not the embedder's {fingerprint!r}")
    return problems


def validate_version(version: IndexVersion, vectors: np.ndarray, product_ids: Sequence[str], *, exact: bool,
                     query_rows: np.ndarray, min_recall_at_10: float = 0.95, model_fingerprint: str | None = None,
                     tune: bool = True) -> dict:
    """Check a written version against the build's inputs (module docstring); ValidationFailed if bad."""
    n = len(vectors)
    rows = np.sort(np.asarray(query_rows, dtype=np.int64))
    if len(rows) == 0:
        raise ValidationFailed("validation needs at least one query row")
    problems = _structure_problems(version, vectors, product_ids, rows,
                                   model_fingerprint if model_fingerprint is not None else version.model_fingerprint)
    k = min(10, n)
    xq = np.asarray(vectors[rows], dtype=np.float32)
    D_true, _ = exact_topk(version.vectors, xq, k)
    _, I = search_reranked(version, xq, k)  # noqa: E741
    recall = recall_from_truth(D_true, xq, version.vectors, I)
    floor = 1.0 if exact else min_recall_at_10
    defaults = {"nprobe": version.default_nprobe, "rerank_factor": version.rerank_factor}
    report: dict = {"recall_at_10": round(recall, 6), "queries": len(rows), "k": k, **defaults,
                    "min_recall_at_10": floor, "count": n, "model_fingerprint": version.model_fingerprint,
                    "passed": False, "search_defaults": defaults}
    nlist = _nlist(version)
    if recall < floor - 1e-9 and nlist and not exact and tune:
        tuned, trials = tune_search(version, xq, D_true, floor, nlist)
        report["tuning"] = {"planned": defaults, "trials": trials}
        if tuned is not None:
            recall = trials[-1]["recall_at_10"]
            logger.info("validation tuned the search defaults from %s to %s: recall@10 %.4f (%d trials)",
                        defaults, tuned, recall, len(trials))
            report.update(recall_at_10=recall, search_defaults=tuned, **tuned)
    if recall < floor - 1e-9:
        tried = f"; tuning tried {len(report['tuning']['trials'])} settings up to nprobe " \
                f"{report['tuning']['trials'][-1]['nprobe']}" if "tuning" in report else ""
        problems.append(f"recall@10 {recall:.4f} is below the floor {floor} (nprobe {report['nprobe']}, "
                        f"re-rank x{report['rerank_factor']}{tried})")
    if problems:
        raise ValidationFailed("validation failed: " + "; ".join(problems), {**report, "problems": problems})
    logger.info("validation passed: recall@10 %.4f over %d held-out queries (nprobe %s, re-rank x%d)", recall,
                len(rows), report["nprobe"], report["rerank_factor"])
    return {**report, "passed": True}
