"""Shared inputs of the indexer job tests: real mini-catalog images in LMDB shards and a tiny ViT checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"
REPO = Path(__file__).resolve().parents[1]


def write_catalog_rows(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def catalog_rows(n: int) -> list[list[str]]:
    """Header + the first n rows of data/mini-catalog/styles.csv."""
    if not (MINI / "styles.csv").is_file():
        pytest.skip(f"{MINI} is missing")
    with open(MINI / "styles.csv", newline="", encoding="utf-8") as f:
        return list(csv.reader(f))[: n + 1]


def make_inputs(work: Path, n: int) -> tuple[Path, Path]:
    """(shards_dir, checkpoint) from the first n mini-catalog rows and a tiny random ViT (dim 16)."""
    from model.catalog import CatalogConfig
    from model.checkpoint import save_checkpoint
    from model.data import build_shards
    from model.networks import ModelConfig, create_model

    write_catalog_rows(work / "styles.csv", catalog_rows(n))
    shards = work / "shards"
    build_shards(work / "styles.csv", MINI / "images", shards, CatalogConfig(), max_records_per_shard=40,
                 progress=False)
    config = ModelConfig(image_size=(32, 32), patch_size=8, width=32, depth=1, num_heads=2, embedding_dim=16)
    card = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "label_maps": {}, "metrics": {}}
    checkpoint = save_checkpoint(work / "checkpoint", create_model(config), card)
    return shards, checkpoint


def corrupt_record(shards: Path, record: int) -> None:
    """Replace the image bytes of `record` in its LMDB shard with garbage (a bad image the build must skip)."""
    import lmdb

    from model.data import decode_record, load_shards_manifest
    from model.data.shards import encode_record, record_key

    env = lmdb.open(str(shards / load_shards_manifest(shards)["shards"][0]["path"]), map_size=1 << 30)
    with env.begin(write=True) as txn:
        product, _ = decode_record(txn.get(record_key(record)))
        txn.put(record_key(record), encode_record(product, b"not an image"))
    env.close()
