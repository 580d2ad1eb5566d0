"""Incremental update: adds, changes and deletes from a new catalog CSV against the live version, reusing the
trained quantizer and the embeddings of unchanged products; validated and published like a full build."""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.job import IndexBuildConfig, build_index
from indexer.validate import search_reranked
from indexer.version import list_versions, open_current, open_version, read_current
from model.embedder import Embedder
from tests.indexer_fixtures import MINI, catalog_rows, make_inputs, write_catalog_rows
from vitrine.cli import main

BASE = 60


def _centroids(version_path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open_version(version_path) as version:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(version.shards[0]))
        return ivf.quantizer.reconstruct_n(0, ivf.nlist), faiss.vector_to_array(ivf.pq.centroids)


def test_update_applies_adds_changes_deletes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    shards, checkpoint = make_inputs(tmp_path, BASE)
    root = tmp_path / "index"
    base = build_index(IndexBuildConfig(shards_dir=shards, model=checkpoint, index_root=root, chunk_rows=32,
                                        num_workers=0, factory="IVF4,PQ8x4", nprobe=4, num_shards=2,
                                        min_recall_at_10=0.5, validation_queries=20))
    rows = catalog_rows(BASE + 10)
    header, old, new = rows[0], rows[1 : BASE + 1], rows[BASE + 1 :]
    title = header.index("productDisplayName")
    images = tmp_path / "images"
    images.mkdir()
    for row in rows[1:]:
        shutil.copyfile(MINI / "images" / f"{row[0]}.jpg", images / f"{row[0]}.jpg")
    deleted = [row[0] for row in old[:5]]
    meta_changed, image_changed = old[5], old[6]
    meta_changed[title] = "Renamed " + meta_changed[title]
    shutil.copyfile(MINI / "images" / f"{old[7][0]}.jpg", images / f"{image_changed[0]}.jpg")  # a new photo
    write_catalog_rows(tmp_path / "new.csv", [header, *old[5:], *new])

    events: list[int] = []  # 0: an image decoded; n > 0: a batch of n embedded
    real_embed, real_decode = Embedder.embed_pixels, Embedder.decode
    monkeypatch.setattr(Embedder, "embed_pixels", lambda self, pixels: events.append(len(pixels))
                        or real_embed(self, pixels))
    monkeypatch.setattr(Embedder, "decode", lambda self, data, *a, **k: events.append(0) or real_decode(self, data))
    argv = ["index", "update", "--csv", str(tmp_path / "new.csv"), "--images", str(images), "--index-root", str(root),
            "--min-recall", "0.5", "--validation-queries", "20", "--batch-size", "4"]
    assert main(argv) == 0
    assert '"added": 10' in capsys.readouterr().out
    assert sum(events) == 11, "only the 10 new products and the 1 changed image are embedded"
    # batch by batch: never more decoded images waiting than one batch (an update of many photos held them all)
    assert events == [0, 0, 0, 0, 4, 0, 0, 0, 0, 4, 0, 0, 0, 3]
    with open_current(root, verify_checksums=True) as live, open_version(base) as before:
        assert live.name != before.name and list_versions(root) == [before.name, live.name]
        assert live.count == BASE - 5 + 10 and live.manifest["validation"]["passed"]
        report = live.manifest["update"]
        assert (report["added"], report["deleted"], report["image_changed"], report["metadata_changed"],
                report["unchanged"]) == (10, 5, 1, 1, BASE - 7)
        assert all(live.internal_id(pid) is None for pid in deleted)
        assert live.product(live.internal_id(meta_changed[0])).title.startswith("Renamed ")
        for pid in (old[10][0], old[30][0], meta_changed[0]):  # unchanged image: the stored embedding, bit for bit
            np.testing.assert_array_equal(live.vectors[live.internal_id(pid)], before.vectors[before.internal_id(pid)])
        moved = live.vector(live.internal_id(image_changed[0]))
        np.testing.assert_allclose(moved, before.vector(before.internal_id(old[7][0])), atol=2e-3)
        assert len(live.shards) == 2 and live.factory == "IVF4,PQ8x4"
        added = live.internal_id(new[3][0])
        query = live.vector(added)
        scores, ids = search_reranked(live, query[None, :], 10)  # as the engine does
        assert added in ids[0] or scores[0, -1] >= float(query @ query) - 1e-3, "found, or tied (tiny random model)"
    for a, b in zip(_centroids(base), _centroids(root / read_current(root)), strict=True):
        np.testing.assert_array_equal(a, b)  # the trained quantizer and PQ codebooks are reused


def test_update_refuses_an_empty_catalog(tmp_path: Path) -> None:
    shards, checkpoint = make_inputs(tmp_path, 30)
    root = tmp_path / "index"
    build_index(IndexBuildConfig(shards_dir=shards, model=checkpoint, index_root=root, num_workers=0,
                                 validation_queries=10))
    live = read_current(root)
    write_catalog_rows(tmp_path / "empty.csv", [catalog_rows(1)[0]])
    argv = ["index", "update", "--csv", str(tmp_path / "empty.csv"), "--images", str(MINI / "images"),
            "--index-root", str(root)]
    assert main(argv) == 2
    assert read_current(root) == live and list_versions(root) == [live]


def test_update_refuses_to_take_most_products_out_of_the_index(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated export (a third of its rows) or an images folder synced by a third looked like a catalog
    change: the update published a version without most of the shop. Over --max-removed (default half of the
    live products) it now fails like a gate, CURRENT untouched."""
    shards, checkpoint = make_inputs(tmp_path, 30)
    root = tmp_path / "index"
    build_index(IndexBuildConfig(shards_dir=shards, model=checkpoint, index_root=root, num_workers=0,
                                 validation_queries=10))
    live = read_current(root)
    rows = catalog_rows(30)
    write_catalog_rows(tmp_path / "truncated.csv", rows[:11])
    partial = tmp_path / "half-synced"  # only 10 of the 30 images arrived
    partial.mkdir()
    for row in rows[1:11]:
        shutil.copyfile(MINI / "images" / f"{row[0]}.jpg", partial / f"{row[0]}.jpg")
    update = ["index", "update", "--index-root", str(root), "--validation-queries", "10"]
    assert main([*update, "--csv", str(tmp_path / "truncated.csv"), "--images", str(MINI / "images")]) == 1
    assert "would take 20 of the 30 products" in capsys.readouterr().err
    write_catalog_rows(tmp_path / "all.csv", rows)
    assert main([*update, "--csv", str(tmp_path / "all.csv"), "--images", str(partial)]) == 1
    assert "would take 20 of the 30 products" in capsys.readouterr().err
    assert read_current(root) == live and list_versions(root) == [live]
    assert main([*update, "--csv", str(tmp_path / "truncated.csv"), "--images", str(MINI / "images"),
                 "--max-removed", "1"]) == 0
    with open_current(root) as version:
        assert version.count == 10


def _live_index_and_update_argv(tmp_path: Path) -> tuple[Path, Path, Path, str, list[str]]:
    """Shards and checkpoint of 30 products, their index published under tmp_path/index, the live version's name and
    the argv of an `index update` from a CSV of the same 30 products."""
    shards, checkpoint = make_inputs(tmp_path, 30)
    root = tmp_path / "index"
    build_index(IndexBuildConfig(shards_dir=shards, model=checkpoint, index_root=root, num_workers=0,
                                 validation_queries=10))
    write_catalog_rows(tmp_path / "all.csv", catalog_rows(30))
    update = ["index", "update", "--index-root", str(root), "--validation-queries", "10", "--csv",
              str(tmp_path / "all.csv"), "--images", str(MINI / "images")]
    return shards, checkpoint, root, read_current(root), update


def test_bad_keep_or_max_removed_is_refused_before_anything_is_published(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`--keep 0` was checked only when pruning, after CURRENT had moved: the command said "error" (exit 2) and yet
    published the update. `--max-removed 2` named the config field, not the flag. Both now stop before any work."""
    shards, checkpoint, root, live, update = _live_index_and_update_argv(tmp_path)
    for flags, message in ((["--keep", "0"], "keep_versions (--keep) must be at least 1, got 0"),
                           (["--max-removed", "2"], "max_removed_fraction (--max-removed) must lie in [0, 1]")):
        assert main([*update, *flags]) == 2
        assert message in capsys.readouterr().err
        assert read_current(root) == live and list_versions(root) == [live]
    build = ["index", "build", "--shards", str(shards), "--model", str(checkpoint), "--index-root", str(root),
             "--workers", "0", "--validation-queries", "10", "--fresh"]
    assert main([*build, "--keep", "0"]) == 2
    assert "keep_versions (--keep) must be at least 1" in capsys.readouterr().err
    assert read_current(root) == live and list_versions(root) == [live]


def test_an_update_waits_for_no_build_or_update_running_on_the_root(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Two updates at once, or an update during a long full rebuild, all published, in the order they finished:
    whichever catalog each had read (yesterday's rebuild overwrote tonight's update). An update now takes the
    lock a build holds in the root's work folder, and is refused (exit 2, CURRENT untouched) while it is held."""
    import fcntl

    _, _, root, live, update = _live_index_and_update_argv(tmp_path)
    with open(root / ".work" / ".lock", "a") as running:  # what a running build (or update) holds
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(update) == 2
        assert "another build or update is running" in capsys.readouterr().err
        assert read_current(root) == live and list_versions(root) == [live]
    assert main(update) == 0
    assert read_current(root) != live


def test_update_reports_the_catalog_rows_it_could_not_use(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Rows without an id or repeating one were dropped by the CSV reader and counted only in the new manifest:
    the update's printed report and log said nothing of them (ingest prints them). Now both do."""
    import json
    import logging

    shards, checkpoint = make_inputs(tmp_path, 30)
    root = tmp_path / "index"
    build_index(IndexBuildConfig(shards_dir=shards, model=checkpoint, index_root=root, num_workers=0,
                                 validation_queries=10))
    rows = catalog_rows(30)
    rows[1][0] = ""  # no id
    rows.append(list(rows[5]))  # the same id twice
    write_catalog_rows(tmp_path / "new.csv", rows)
    with caplog.at_level(logging.WARNING, logger="vitrine.indexer"):
        assert main(["index", "update", "--index-root", str(root), "--validation-queries", "10", "--csv",
                     str(tmp_path / "new.csv"), "--images", str(MINI / "images")]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert report["catalog"]["rows_bad/missing_id"] == 1 and report["catalog"]["duplicate_ids"] == 1
    assert report["deleted"] == 1 and report["count"] == 29
    assert any("catalog rows with problems" in r.getMessage() and "missing_id" in r.getMessage()
               for r in caplog.records)


def test_update_whose_model_has_moved_says_to_pass_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The live version records its model's folder; moved (a new release directory, another checkout), the update
    stopped with "no model card at <old path>/model_card.json", not saying where the path came from nor that
    --model names the checkpoint's new place. It now says both, and --model with the moved folder works."""
    shards, checkpoint = make_inputs(tmp_path, 30)
    root = tmp_path / "index"
    build_index(IndexBuildConfig(shards_dir=shards, model=checkpoint, index_root=root, num_workers=0,
                                 validation_queries=10))
    live = read_current(root)
    moved = tmp_path / "models" / "release-2"
    moved.parent.mkdir()
    checkpoint.rename(moved)
    write_catalog_rows(tmp_path / "all.csv", catalog_rows(30))
    update = ["index", "update", "--index-root", str(root), "--validation-queries", "10", "--csv",
              str(tmp_path / "all.csv"), "--images", str(MINI / "images")]
    assert main(update) == 2
    err = capsys.readouterr().err
    assert f"built with the model {checkpoint.resolve()}, which is not there any more: pass --model" in err
    assert read_current(root) == live
    assert main([*update, "--model", str(moved)]) == 0 and read_current(root) != live


def test_update_sees_photos_reencoded_at_ingest_as_unchanged(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Ingest with --max-side stores re-encoded bytes; it records the source file's SHA-1 beside them, so the next
    update of the same catalog reuses every embedding (it re-embedded every downscaled photo, every night)."""
    import hashlib

    import lmdb

    from model.catalog import CatalogConfig
    from model.checkpoint import save_checkpoint
    from model.data import build_shards, decode_record, load_shards_manifest
    from model.data.shards import record_key, source_digest_key
    from model.networks import ModelConfig, create_model

    write_catalog_rows(tmp_path / "styles.csv", catalog_rows(12))
    shards = tmp_path / "shards"
    build_shards(tmp_path / "styles.csv", MINI / "images", shards, CatalogConfig(), max_side=64, progress=False)
    entry = load_shards_manifest(shards)["shards"][0]
    env = lmdb.open(str(shards / entry["path"]), readonly=True, lock=False)
    with env.begin() as txn:  # the 60x80 photos were re-encoded to 48x64; their files' digests are kept
        product, stored = decode_record(txn.get(record_key(0)))
        source = (MINI / "images" / f"{product.product_id}.jpg").read_bytes()
        assert stored != source
        assert txn.get(source_digest_key(0)).decode() == hashlib.sha1(source).hexdigest()
    env.close()
    config = ModelConfig(image_size=(32, 32), patch_size=8, width=32, depth=1, num_heads=2, embedding_dim=16)
    checkpoint = save_checkpoint(tmp_path / "checkpoint", create_model(config),
                                 {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "label_maps": {},
                                  "metrics": {}})
    root = tmp_path / "index"
    build_index(IndexBuildConfig(shards_dir=shards, model=checkpoint, index_root=root, num_workers=0,
                                 validation_queries=6))
    capsys.readouterr()
    assert main(["index", "update", "--csv", str(tmp_path / "styles.csv"), "--images", str(MINI / "images"),
                 "--index-root", str(root), "--validation-queries", "6"]) == 0
    out = capsys.readouterr().out
    assert '"unchanged": 12' in out and '"image_changed": 0' in out and '"added": 0' in out

def test_update_counts_a_bad_image_once(tmp_path: Path) -> None:
    """A product whose image does not decode is counted as `bad_image` only; it was also counted as `added` (or
    `image_changed`) in every nightly report, so the report's counts did not add up to the catalog's rows."""
    shards, checkpoint = make_inputs(tmp_path, 30)
    root = tmp_path / "index"
    build_index(IndexBuildConfig(shards_dir=shards, model=checkpoint, index_root=root, num_workers=0,
                                 validation_queries=10))
    rows = catalog_rows(33)  # the 30 live products and 3 new ones
    images = tmp_path / "images"
    images.mkdir()
    for row in rows[1:]:
        shutil.copyfile(MINI / "images" / f"{row[0]}.jpg", images / f"{row[0]}.jpg")
    broken_live, broken_new = rows[4][0], rows[32][0]  # a live product's photo and a new product's photo
    for pid in (broken_live, broken_new):
        (images / f"{pid}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    write_catalog_rows(tmp_path / "new.csv", rows)
    update = ["index", "update", "--csv", str(tmp_path / "new.csv"), "--images", str(images), "--index-root",
              str(root), "--validation-queries", "10"]
    counted = ("unchanged", "metadata_changed", "image_changed", "added", "missing_image", "bad_image",
               "duplicate_ids")
    assert main(update) == 0
    with open_current(root) as live:
        report = live.manifest["update"]
        assert (report["added"], report["image_changed"], report["bad_image"], report["unchanged"]) == (2, 0, 2, 29)
        assert sum(report[key] for key in counted) == 33 and live.count == 31
        assert live.internal_id(broken_live) is None and live.internal_id(broken_new) is None
    assert main(update) == 0  # the next night, nothing changed: the two bad images are still only bad images
    with open_current(root) as live:
        report = live.manifest["update"]
        assert (report["added"], report["image_changed"], report["bad_image"], report["unchanged"]) == (0, 0, 2, 31)
        assert sum(report[key] for key in counted) == 33 and live.count == 31
