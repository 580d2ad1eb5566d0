"""The CNN teacher for distillation: linear probes on the frozen ImageNet EfficientNet-Lite0 features.

For each task a multinomial logistic regression (scikit-learn) is fitted on the training records' frozen
CNN embeddings; its logits for every record are saved (`teacher.npz`: ids, logits/<task>, classes/<task>),
and the fine-tune stage distils them into the ViT (model.losses.distillation_loss). Teacher outputs are
computed once on the un-augmented image, so distillation costs nothing per training step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from model.catalog import Product
from model.data.shards import iter_shard_records, product_label
from model.embedder import Embedder
from model.images import ImageDecodeError, decode_image


def embed_shards(embedder: Embedder, shards_dir: str | Path, batch_size: int = 32,
                 cache: Path | None = None) -> tuple[list[str], np.ndarray]:
    """(product ids, (n, dim) float32 embeddings) of every shard record; cached in `cache` (.npz)."""
    if cache is not None and cache.is_file():
        data = np.load(cache, allow_pickle=False)
        if str(data["fingerprint"]) == embedder.fingerprint:
            return [str(i) for i in data["ids"]], data["vectors"]
    ids: list[str] = []
    parts: list[np.ndarray] = []
    batch: list[Any] = []
    records = list(iter_shard_records(shards_dir))
    for position, record in enumerate(tqdm(records, desc="teacher embed", unit="img", mininterval=2.0)):
        try:
            batch.append(decode_image(record.image_bytes))
            ids.append(record.product.product_id)
        except ImageDecodeError:
            pass
        if len(batch) == batch_size or (position == len(records) - 1 and batch):
            parts.append(embedder.embed_images(batch, batch_size=batch_size))
            batch = []
    vectors = np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype=np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, ids=np.array(ids), vectors=vectors, fingerprint=np.array(embedder.fingerprint))
    return ids, vectors


def _check_tasks(products: Iterable[Product], tasks: Sequence[str], train_splits: Sequence[str],
                 shards_dir: str | Path) -> None:
    """ValueError when a task is not a label column of the shards, or has fewer than two classes to learn among
    the training records (a probe cannot be fitted then: sklearn's error came after the whole embedding)."""
    from model.data.shards import label_columns, unknown_label_columns

    products = list(products)
    if not tasks:
        raise ValueError("no --tasks: name the label columns the teacher's probes learn")
    known = label_columns(products)
    unknown = unknown_label_columns(tasks, known)
    if unknown:
        raise ValueError(f"--tasks {', '.join(unknown)}: not a label column of {shards_dir} (its label columns: "
                         f"{', '.join(sorted(known))})")
    training = [p for p in products if p.split is None or p.split in train_splits]
    for task in tasks:
        classes = {product_label(p, task) for p in training} - {""}
        if len(classes) < 2:
            raise ValueError(f"task {task!r} has {len(classes)} class(es) among the {len(training)} training records "
                             f"of {shards_dir} (splits {list(train_splits)} or none): a probe needs at least two")


def build_teacher_logits(shards_dir: str | Path, out_path: str | Path, tasks: Sequence[str], teacher: str | Path,
                         train_splits: Sequence[str] = ("train",), regularization: float = 10.0,
                         cache: Path | None = None) -> dict[str, Any]:
    """Fit one linear probe per task on the teacher's features of the training records; save every record's
    logits to `out_path` (.npz) and a report (probe accuracy on the held-out records) beside it."""
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    products = {r.product.product_id: r.product for r in iter_shard_records(shards_dir)}
    _check_tasks(products.values(), tasks, train_splits, shards_dir)  # before minutes of embedding, not after
    embedder = Embedder.load(teacher)
    ids, vectors = embed_shards(embedder, shards_dir, cache=cache)
    is_train = np.array([products[i].split is None or products[i].split in train_splits for i in ids])
    arrays: dict[str, np.ndarray] = {"ids": np.array(ids)}
    report: dict[str, Any] = {"teacher": str(teacher), "teacher_fingerprint": embedder.fingerprint,
                              "records": len(ids), "train_records": int(is_train.sum()), "tasks": {}}
    for task in tasks:
        labels = np.array([product_label(products[i], task) for i in ids], dtype=object)
        fit_rows = is_train & (labels != "")
        probe = LogisticRegression(C=regularization, max_iter=300)
        probe.fit(vectors[fit_rows], labels[fit_rows].astype(str))
        logits = probe.decision_function(vectors).astype(np.float32)
        held_out = ~is_train & (labels != "")
        accuracy = round(float((probe.predict(vectors[held_out]) == labels[held_out].astype(str)).mean()), 4) \
            if held_out.any() else None  # no held-out record (a catalog without splits): null, not NaN in the JSON
        arrays[f"logits/{task}"] = logits
        arrays[f"classes/{task}"] = np.array(probe.classes_)
        report["tasks"][task] = {"classes": len(probe.classes_), "held_out_accuracy": accuracy}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path.with_suffix(".tmp.npz"), **arrays)  # type: ignore[arg-type]
    out_path.with_suffix(".tmp.npz").replace(out_path)
    report["seconds"] = round(time.perf_counter() - start, 1)
    out_path.with_suffix(".json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
