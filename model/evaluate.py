"""Held-out evaluation of a checkpoint: what its model card reports under "evaluation".

`vitrine train` runs it when a stage ends (and `vitrine evaluate` on any checkpoint and shards): the records of
the shards that the run did not train on (split not in its train_splits; a catalog without splits has none,
and then a sample of the training records is used and the card says so) are embedded as the index build
would embed them, and the card gets

- per task head: accuracy of the head's prediction on the records whose label the head knows, and how many
  records carry a label it never saw in training (or none);
- per task: top-1 relevance within the evaluated records -- the nearest other record (exact inner product)
  has the same label -- a quick proxy of `benchmarks/bench_relevance.py`, whose gallery is the whole catalog;
- the embedding's spread: the mean cosine of random pairs of records. An embedding that cannot tell images
  apart (too little training, a broken catalog) has every pair near 1 and every search returns arbitrary
  products; the evaluation logs a warning then.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("vitrine.model")

MAX_RECORDS = 10_000  # records evaluated at most (an even sample of the held-out ones beyond)
COLLAPSED_COSINE = 0.9  # mean cosine of random pairs above which the embedding is reported as collapsed


def embed_record_images(embedder: Any, records: Sequence[Any], batch_size: int = 256,
                        desc: str = "embed", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n_ok, dim) float32, kept (n_ok,) positions into `records`): each record's image embedded;
    records whose image does not decode are left out (a batch with one is redone one image at a time)."""
    from tqdm import tqdm

    from model.images import ImageDecodeError

    parts: list[np.ndarray] = [np.zeros((0, embedder.dim), dtype=np.float32)]
    kept: list[int] = []
    for begin in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = records[begin:begin + batch_size]
        try:
            parts.append(embedder.embed_bytes([r.image_bytes for r in batch]))
            kept.extend(range(begin, begin + len(batch)))
        except ImageDecodeError:
            for offset, record in enumerate(batch):
                try:
                    parts.append(embedder.embed_bytes([record.image_bytes]))
                    kept.append(begin + offset)
                except ImageDecodeError:
                    continue
    return np.concatenate(parts), np.array(kept, dtype=np.int64)


def nearest_other(vectors: np.ndarray, block: int = 1024) -> np.ndarray:
    """(n,) row of each row's nearest other row by inner product (exact; -1 when n < 2)."""
    n = len(vectors)
    if n < 2:
        return np.full(n, -1, dtype=np.int64)
    found = np.empty(n, dtype=np.int64)
    for begin in range(0, n, block):
        scores = vectors[begin:begin + block] @ vectors.T
        rows = np.arange(begin, min(n, begin + block))
        scores[rows - begin, rows] = -np.inf
        found[begin:begin + len(rows)] = scores.argmax(axis=1)
    return found


def mean_pair_cosine(vectors: np.ndarray, pairs: int = 4096, seed: int = 0) -> float:
    """Mean cosine of random pairs of distinct rows (rows L2-normalised)."""
    n = len(vectors)
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, pairs)
    b = (a + rng.integers(1, n, pairs)) % n  # never the same row
    return float(np.einsum("ij,ij->i", vectors[a], vectors[b]).mean())


def evaluate_checkpoint(folder: str | Path, shards_dir: str | Path, *, train_splits: Sequence[str] | None = None,
                        max_records: int = MAX_RECORDS, device: str = "cpu", precision: str = "auto",
                        progress: bool = True) -> dict[str, Any]:
    """The "evaluation" section of a checkpoint's card, measured on the held-out records of `shards_dir`.

    train_splits: the splits the checkpoint was trained on (default: its card's config, else ["train"]).
    """
    import torch

    from model.data import iter_shard_records
    from model.data.shards import product_label
    from model.embedder import Embedder
    from model.networks import head_key

    if max_records < 2:
        raise ValueError(f"max_records must be >= 2, got {max_records}")
    start = time.perf_counter()
    embedder = Embedder.load(folder, device=device, precision=precision)
    card = embedder.model_card
    trained_on = list(train_splits if train_splits is not None else card.get("config", {}).get("train_splits")
                      or ["train"])
    records = list(iter_shard_records(shards_dir))
    held = [r for r in records if r.product.split is not None and r.product.split not in trained_on]
    held_out = bool(held)
    if not held_out:
        held = records
    # exactly min(max_records, n) records, spread evenly over the shards' order
    chosen = [held[int(i)] for i in np.linspace(0, len(held) - 1, min(max_records, len(held))).round()]
    vectors, kept = embed_record_images(embedder, chosen, desc="evaluate", progress=progress)
    evaluated = [chosen[i] for i in kept]
    splits = sorted({r.product.split for r in evaluated if r.product.split is not None})
    result: dict[str, Any] = {
        "held_out": held_out, "splits": splits, "records": len(evaluated),
        "of_records": len(held), "undecodable": len(chosen) - len(evaluated), "precision": embedder.precision,
    }
    if not held_out:
        result["note"] = ("no held-out records (every record's split was trained on): measured on training "
                          "records, so this flatters the model")
    nearest = nearest_other(vectors)
    tasks: dict[str, Any] = {}
    for task, names in (card.get("label_maps") or {}).items():
        labels = np.array([product_label(r.product, task) for r in evaluated], dtype=object)
        entry: dict[str, Any] = {"classes": len(names), "unlabelled": int((labels == "").sum())}
        index = {name: i for i, name in enumerate(names)}
        known = np.array([label in index for label in labels], dtype=bool)
        entry["unseen_label"] = int((~known & (labels != "")).sum())
        if head_key(task) in embedder.model.heads and known.any():
            with torch.no_grad():
                logits = embedder.model.heads[head_key(task)](torch.from_numpy(vectors[known]).to(device))
            predicted = logits.argmax(dim=1).cpu().numpy()
            truth = np.array([index[label] for label in labels[known]])
            entry["head_accuracy"] = round(float((predicted == truth).mean()), 4)
        labelled = (labels != "") & (nearest >= 0)
        if labelled.any():
            entry["top1_same_label"] = round(float((labels[nearest[labelled]] == labels[labelled]).mean()), 4)
        tasks[task] = entry
    result["tasks"] = tasks
    result["mean_pair_cosine"] = round(mean_pair_cosine(vectors), 4)
    result["collapsed"] = bool(result["mean_pair_cosine"] > COLLAPSED_COSINE)
    result["seconds"] = round(time.perf_counter() - start, 2)
    if result["collapsed"]:
        logger.warning("the embedding of %s barely separates images: random pairs of records have a mean cosine "
                       "of %.3f (above %.1f), so searches return near-arbitrary products; train longer, with more "
                       "images, or check that the shards hold the right images", folder,
                       result["mean_pair_cosine"], COLLAPSED_COSINE)
    return result


def summary_line(evaluation: dict[str, Any]) -> str:
    """One log line: records, and per task head accuracy / top-1 within the evaluated records."""
    parts = [f"{task}: head {t['head_accuracy']:.3f}" + (f", top-1 {t['top1_same_label']:.3f}"
                                                         if "top1_same_label" in t else "")
             for task, t in evaluation["tasks"].items() if "head_accuracy" in t]
    where = (f"held-out records (splits {', '.join(evaluation['splits'])})" if evaluation["held_out"]
             else "training records (none held out)")
    return (f"evaluation on {evaluation['records']} {where}: " + ("; ".join(parts) or "no task heads")
            + f"; mean cosine of random pairs {evaluation['mean_pair_cosine']:.3f}")


def write_evaluation(folder: str | Path, evaluation: dict[str, Any]) -> None:
    """Set the card's "evaluation" (the card replaced atomically; the weights and fingerprint unchanged)."""
    from model.checkpoint import CARD_FILE

    path = Path(folder) / CARD_FILE
    card = json.loads(path.read_text(encoding="utf-8"))
    card["evaluation"] = evaluation
    tmp = path.with_name(f".{CARD_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
