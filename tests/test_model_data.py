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


def test_an_ingest_of_another_csv_is_not_reused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Re-running ingest into the same --out after fixing the CSV returned the old shards and the old report,
    silently: the output is reused only for the same CSV contents, mapping, images folder and max side."""
    from vitrine.cli import main

    lines = (MINI / "styles.csv").read_text(encoding="utf-8").splitlines()
    csv_path, out = tmp_path / "styles.csv", tmp_path / "out"
    csv_path.write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")
    first = build_shards(csv_path, MINI / "images", out, CatalogConfig(), progress=False)
    assert build_shards(csv_path, MINI / "images", out, CatalogConfig(), progress=False) == first  # reused
    csv_path.write_text("\n".join(lines[:7]) + "\n", encoding="utf-8")  # the catalog grew
    with pytest.raises(FileExistsError, match="other inputs .*the CSV's contents.* --overwrite"):
        build_shards(csv_path, MINI / "images", out, CatalogConfig(), progress=False)
    with pytest.raises(FileExistsError, match="other inputs .*max_side"):
        build_shards(csv_path, MINI / "images", out, CatalogConfig(), progress=False, max_side=64)
    args = ["ingest", "--csv", str(csv_path), "--images", str(MINI / "images"), "--out", str(out), "--workers", "1"]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["products"] == 6 == load_shards_manifest(out)["report"]["products"]


def test_bad_and_missing_images_are_named_and_their_reasons_counted_together(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each bad image made its own reason key (its byte count in it) and none was named: a catalog with a few bad
    files among thousands gave no way to find them."""
    lines = (MINI / "styles.csv").read_text(encoding="utf-8").splitlines()
    ids = [line.split(",")[0] for line in lines[1:6]]
    images = tmp_path / "images"
    images.mkdir()
    (images / f"{ids[0]}.jpg").write_bytes((MINI / "images" / f"{ids[0]}.jpg").read_bytes())
    (images / f"{ids[1]}.jpg").write_bytes(b"garbage")
    (images / f"{ids[2]}.jpg").write_bytes(b"other garbage, longer")
    good = (MINI / "images" / f"{ids[3]}.jpg").read_bytes()
    (images / f"{ids[3]}.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "styles.csv").write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="vitrine.ingest"):
        report = build_shards(tmp_path / "styles.csv", images, tmp_path / "out", CatalogConfig(), progress=False)
    assert (report.records, report.bad_images, report.missing_images) == (1, 3, 1)
    assert report.bad_image_reasons == {"not a recognised image": 2, "corrupt or truncated image": 1}
    named = {p["product_id"]: p for p in report.image_problems}
    assert sorted(named) == sorted(ids[1:5])
    assert named[ids[4]]["image"] == str(images / f"{ids[4]}.jpg") and "missing" in named[ids[4]]["problem"]
    assert "truncated" in named[ids[3]]["problem"]
    assert all(f"product {pid}: image {images / f'{pid}.jpg'}" in caplog.text for pid in ids[1:5])
    assert load_shards_manifest(tmp_path / "out")["report"]["image_problems"] == report.image_problems


@pytest.mark.parametrize("max_side", [0, -5])
def test_a_max_side_that_is_not_positive_is_refused(tmp_path: Path, max_side: int) -> None:
    """--max-side 0 (meant as "off") re-encoded every catalog image as a 1x1 pixel JPEG, without a word."""
    with pytest.raises(ValueError, match="max_side must be a positive number of pixels"):
        build_shards(MINI / "styles.csv", MINI / "images", tmp_path / "out", CatalogConfig(), progress=False,
                     max_side=max_side)
    assert not (tmp_path / "out").exists()


def test_half_written_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="no manifest"):
        build_shards(MINI / "styles.csv", MINI / "images", tmp_path / "out", CatalogConfig(), progress=False)


def test_record_encoding_round_trip(shards: Path) -> None:
    record = next(iter_shard_records(shards))
    assert decode_record(encode_record(record.product, record.image_bytes)) == (record.product, record.image_bytes)
    with pytest.raises(ValueError, match="malformed"):
        decode_record(b"\x00\x00\x01\x00{}")


def _to_tensor(image: object, seed: int) -> torch.Tensor:
    return torch.full((1,), float(seed))


def _category_targets(label_map: dict[str, int], split: str | None = "train"):  # type: ignore[no-untyped-def]
    def targets(product):  # type: ignore[no-untyped-def]
        if split is not None and product.split != split:
            return None
        return {"label/articleType": label_map[product.category], "id": product.product_id}
    return targets


def test_shard_dataset_filters_and_reshuffles_per_epoch(shards: Path) -> None:
    records = list(iter_shard_records(shards))
    label_map = {name: i for i, name in enumerate(sorted({r.product.category for r in records}))}
    train_count = sum(r.product.split == "train" for r in records)
    dataset = ShardDataset(shards, _to_tensor, _category_targets(label_map), seed=1, shuffle_buffer=100)
    examples = list(dataset)
    assert len(examples) == train_count and dataset.skipped["targets"] == len(records) - train_count
    assert set(examples[0][1]) == {"label/articleType", "id"}
    assert list(dataset) == examples  # same epoch, same order and same augmentation seeds
    dataset.set_epoch(1)
    reordered = [t["id"] for _, t in dataset]
    assert reordered != [t["id"] for _, t in examples] and sorted(reordered) == sorted(t["id"] for _, t in examples)


@pytest.mark.parametrize("world, workers", [(1, 2), (2, 1), (2, 2)])
def test_every_record_exactly_once_per_epoch_across_ranks_and_workers(shards: Path, world: int,
                                                                      workers: int) -> None:
    """4 shards over world x workers readers: the union of what every reader saw is each record once."""
    records = list(iter_shard_records(shards))
    label_map = {name: i for i, name in enumerate(sorted({r.product.category for r in records}))}
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in range(world):
            dataset = ShardDataset(shards, _to_tensor, _category_targets(label_map, split=None), seed=3,
                                   rank=rank, world_size=world, shuffle_buffer=50)
            dataset.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size=32, num_workers=workers)
            seen += [i for batch in loader for i in batch[1]["id"]]
        assert len(seen) == len(records) and set(seen) == {r.product.product_id for r in records}


def test_corrupt_record_is_counted_and_skipped(shards: Path, tmp_path: Path) -> None:
    import shutil

    import lmdb

    from model.data.shards import record_key

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    first = load_shards_manifest(copy)["shards"][0]["path"]
    env = lmdb.open(str(copy / first), map_size=1 << 30)
    with env.begin(write=True) as txn:
        product, _ = decode_record(txn.get(record_key(0)))
        txn.put(record_key(0), encode_record(product, b"not an image"))
    env.close()
    records = list(iter_shard_records(copy))
    label_map = {name: i for i, name in enumerate(sorted({r.product.category for r in records}))}
    dataset = ShardDataset(copy, _to_tensor, _category_targets(label_map, split=None), shuffle=False)
    assert len(list(dataset)) == len(records) - 1 and dataset.skipped["image"] == 1
    # counted in dataloader workers too, and visible to the trainer's process
    dataset = ShardDataset(copy, _to_tensor, _category_targets(label_map, split=None), shuffle=False)
    seen = sum(len(batch[0]) for batch in DataLoader(dataset, batch_size=50, num_workers=2))
    assert seen == len(records) - 1 and dataset.skipped == {"targets": 0, "image": 1}


def test_parallel_ingest_matches_serial_and_reencodes(tmp_path: Path) -> None:
    serial = build_shards(MINI / "styles.csv", MINI / "images", tmp_path / "a", CatalogConfig(), workers=1,
                          progress=False)
    parallel = build_shards(MINI / "styles.csv", MINI / "images", tmp_path / "b", CatalogConfig(), workers=2,
                            progress=False)
    assert serial.records == parallel.records
    # the same records in the same order (data.mdb bytes are not comparable: LMDB leaves page padding as is)
    assert [(r.product, r.image_bytes) for r in iter_shard_records(tmp_path / "a")] == \
        [(r.product, r.image_bytes) for r in iter_shard_records(tmp_path / "b")]
    small = build_shards(MINI / "styles.csv", MINI / "images", tmp_path / "c", CatalogConfig(), workers=2,
                         max_side=40, progress=False)
    assert small.records == serial.records
    from model.images import decode_image

    record = next(iter_shard_records(tmp_path / "c"))
    assert max(decode_image(record.image_bytes).size) == 40


def test_split_file_sets_the_split(tmp_path: Path) -> None:
    lines = (MINI / "styles.csv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    at = header.index("split")
    (tmp_path / "styles.csv").write_text("\n".join(
        [",".join(f for k, f in enumerate(line.split(",")) if k != at) if i == 0 else line.rsplit(",", 1)[0]
         for i, line in enumerate(lines[:6])]) + "\n", encoding="utf-8")
    ids = [line.split(",")[0] for line in lines[1:6]]
    (tmp_path / "splits.csv").write_text("id,split\n" + "".join(f"{i},{'test' if k % 2 else 'train'}\n"
                                                                for k, i in enumerate(ids)))
    table = read_catalog(tmp_path / "styles.csv", CatalogConfig(split_column=None, split_file="splits.csv"))
    assert [p.split for p in table.products] == ["train", "test", "train", "test", "train"]
    with pytest.raises(FileNotFoundError, match="split file"):
        read_catalog(tmp_path / "styles.csv", CatalogConfig(split_column=None, split_file="nope.csv"))


def test_phone_photo_catalog_of_large_heic_files(tmp_path: Path) -> None:
    """A user's catalog shot on a phone: large HEIC files (named *.heic) ingest as they are, or re-encoded
    smaller with max_side, and every stored image decodes."""
    import io

    from PIL import Image

    from model.images import decode_image

    lines = (MINI / "styles.csv").read_text(encoding="utf-8").splitlines()[:7]
    (tmp_path / "styles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "photos").mkdir()
    for line in lines[1:]:
        product_id = line.split(",")[0]
        photo = Image.open(MINI / "images" / f"{product_id}.jpg").convert("RGB").resize((1200, 1600))
        buffer = io.BytesIO()
        photo.save(buffer, format="HEIF", quality=80)
        (tmp_path / "photos" / f"{product_id}.heic").write_bytes(buffer.getvalue())
    config = CatalogConfig(image_pattern="{id}.heic")
    as_given = build_shards(tmp_path / "styles.csv", tmp_path / "photos", tmp_path / "a", config, progress=False)
    smaller = build_shards(tmp_path / "styles.csv", tmp_path / "photos", tmp_path / "b", config, max_side=200,
                           progress=False)
    assert as_given.records == smaller.records == 6
    for record in iter_shard_records(tmp_path / "a"):
        assert record.image_bytes[4:12] == b"ftypheic" and decode_image(record.image_bytes).size == (1200, 1600)
    for record in iter_shard_records(tmp_path / "b"):
        assert record.image_bytes[:2] == b"\xff\xd8" and decode_image(record.image_bytes).size == (150, 200)


def test_large_jpeg_catalog_ingests_and_trains_from_reduced_scale_decodes(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Large JPEGs: ingest validates them (a truncated one is still counted bad), `max_side` re-encodes them
    from a reduced-scale decode to the exact size, and the training reader decodes at the scale its transform
    allows (Augment.decode_size) with the full decode's pixels to within JPEG rounding."""
    import io

    from PIL import Image

    from model.images import decode_image
    from model.training_data import Augment

    lines = (MINI / "styles.csv").read_text(encoding="utf-8").splitlines()[:6]
    (tmp_path / "styles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "photos").mkdir()
    for k, line in enumerate(lines[1:]):
        product_id = line.split(",")[0]
        photo = Image.open(MINI / "images" / f"{product_id}.jpg").convert("RGB").resize((1200, 1600))
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        (tmp_path / "photos" / f"{product_id}.jpg").write_bytes(data if k else data[: len(data) // 2])
    as_given = build_shards(tmp_path / "styles.csv", tmp_path / "photos", tmp_path / "a", CatalogConfig(),
                            progress=False)
    smaller = build_shards(tmp_path / "styles.csv", tmp_path / "photos", tmp_path / "b", CatalogConfig(),
                           max_side=200, progress=False)
    assert (as_given.records, as_given.bad_images) == (smaller.records, smaller.bad_images) == (4, 1)
    assert {decode_image(r.image_bytes).size for r in iter_shard_records(tmp_path / "b")} == {(150, 200)}

    augment = Augment((128, 96), [0.5] * 3, [0.5] * 3, train=True, resize_mode="crop")
    assert augment.decode_size() == (351, 468)  # 3 x 96x128 over the smallest crop side kept, sqrt(0.75 * 0.9)
    assert Augment((128, 96), [0.5] * 3, [0.5] * 3, train=False).decode_size() == (288, 384)
    import model.data.shards as shards_module

    asked: list[object] = []

    def spy(data: bytes, **kwargs: object) -> object:
        asked.append(kwargs.get("min_size"))
        return decode_image(data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shards_module, "decode_image", spy)

    def full_decode(image: object, seed: int) -> torch.Tensor:  # no decode_size: the reader decodes in full
        return augment(image, seed)  # type: ignore[arg-type]

    label_free = lambda product: {"id": product.product_id}  # noqa: E731
    reduced = list(ShardDataset(tmp_path / "a", augment, label_free, shuffle=False))
    full = list(ShardDataset(tmp_path / "a", full_decode, label_free, shuffle=False))
    assert len(reduced) == len(full) == 4
    assert asked == [(351, 468)] * 4 + [None] * 4
    for (a, _), (b, _) in zip(reduced, full, strict=True):
        assert a.shape == (3, 128, 96) and float((a - b).abs().mean()) < 0.03  # 1% of the [-1, 1] range
