"""Ingest -> LMDB shards -> records round trip on the real mini catalog; the ShardDataset reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from model.catalog import CatalogConfig, read_catalog
from model.data import (
    ShardDataset,
    build_shards,
    decode_record,
    encode_record,
    iter_shard_records,
    load_shards_manifest,
)
from model.files import sha256_file

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mini catalog ingested into shards of at most 300 records."""
    out = tmp_path_factory.mktemp("ingest") / "shards"
    build_shards(MINI / "styles.csv", MINI / "images", out, CatalogConfig(), max_records_per_shard=300,
                 progress=False)
    return out


def test_round_trip_counts_match_report(shards: Path) -> None:
    manifest = load_shards_manifest(shards)
    report = manifest["report"]
    records = list(iter_shard_records(shards))
    table = read_catalog(MINI / "styles.csv", CatalogConfig(), images_dir=MINI / "images")
    assert len(records) == manifest["records"] == report["records"]
    assert report["records"] + report["missing_images"] + report["bad_images"] == report["products"]
    assert report["missing_images"] == table.report["missing_images"] >= 1
    assert report["catalog"]["rows_repaired_overflow"] >= 2
    assert [e["records"] for e in manifest["shards"]] == [300, 300, 300, report["records"] - 900]
    for entry in manifest["shards"]:
        assert entry["sha256"] == sha256_file(shards / entry["path"] / "data.mdb")
    first = records[0]
    assert first.image_bytes == (MINI / "images" / f"{first.product.product_id}.jpg").read_bytes()
    assert first.product == table.products[0]
    assert [r.product.product_id for r in records] == [r.product.product_id for r in iter_shard_records(shards)]
    assert not any(p.name.startswith(".") for p in shards.parent.iterdir())


def test_finished_ingest_is_reused_and_bad_images_counted(shards: Path, tmp_path: Path) -> None:
    again = build_shards(MINI / "styles.csv", MINI / "images", shards, CatalogConfig(), progress=False)
    assert again.records == load_shards_manifest(shards)["records"]
    images = tmp_path / "images"
    images.mkdir()
    ids = [r.product.product_id for r in iter_shard_records(shards)][:3]
    (images / f"{ids[0]}.jpg").write_bytes((MINI / "images" / f"{ids[0]}.jpg").read_bytes())
    (images / f"{ids[1]}.jpg").write_bytes(b"garbage")
    csv_path = tmp_path / "styles.csv"
    lines = (MINI / "styles.csv").read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.split(",")[0] in ids]
    csv_path.write_text("\n".join(lines[:1] + kept) + "\n", encoding="utf-8")
    report = build_shards(csv_path, images, tmp_path / "out", CatalogConfig(), progress=False)
    assert (report.records, report.bad_images, report.missing_images) == (1, 1, 1)
    assert json.loads(json.dumps(report.to_json()))["bad_image_reasons"]


def test_half_written_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="no manifest"):
        build_shards(MINI / "styles.csv", MINI / "images", tmp_path / "out", CatalogConfig(), progress=False)


def test_record_encoding_round_trip(shards: Path) -> None:
    record = next(iter_shard_records(shards))
    assert decode_record(encode_record(record.product, record.image_bytes)) == (record.product, record.image_bytes)
    with pytest.raises(ValueError, match="malformed"):
        decode_record(b"\x00\x00\x01\x00{}")


def _to_tensor(image: object) -> torch.Tensor:
    return torch.zeros(3, 4, 4)


def test_shard_dataset_filters_splits_and_splits_shards_over_workers(shards: Path) -> None:
    records = list(iter_shard_records(shards))
    labels = sorted({r.product.category for r in records})
    label_map = {name: i for i, name in enumerate(labels)}
    train_count = sum(r.product.split == "train" for r in records)
    dataset = ShardDataset(shards, _to_tensor, "articleType", label_map, splits=("train",), seed=1)
    examples = list(dataset)
    assert len(examples) == train_count and dataset.skipped["split"] == len(records) - train_count
    assert set(examples[0][1]) == {"articleType"}
    loader = DataLoader(dataset, batch_size=64, num_workers=2)
    assert sum(len(batch[1]["articleType"]) for batch in loader) == train_count
    dataset.set_epoch(1)
    reordered = [label["articleType"] for _, label in dataset]
    assert reordered != [label["articleType"] for _, label in examples]
