"""End to end: tiny untrained model checkpoint + ~60-image shards -> build_index -> open CURRENT and search."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

import model.images
from indexer.build import IndexBuildConfig, build_index
from indexer.version import open_current, read_current
from model.catalog import CatalogConfig
from model.checkpoint import save_checkpoint
from model.data import build_shards
from model.embedder import Embedder
from model.networks import ModelConfig, create_model

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"
N_IMAGES = 60


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(shards_dir, checkpoint folder) from the first 60 rows of data/mini-catalog and a tiny random ViT."""
    if not (MINI / "styles.csv").is_file():
        pytest.skip(f"{MINI} is missing")
    work = tmp_path_factory.mktemp("e2e")
    with open(MINI / "styles.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    with open(work / "styles.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows[: N_IMAGES + 1])
    shards = work / "shards"
    build_shards(work / "styles.csv", MINI / "images", shards, CatalogConfig(), max_records_per_shard=25,
                 progress=False)
    config = ModelConfig(image_size=(32, 32), patch_size=8, width=32, depth=1, num_heads=2, embedding_dim=16)
    card = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "label_maps": {}, "metrics": {}}
    checkpoint = save_checkpoint(work / "checkpoint", create_model(config), card)
    return shards, checkpoint


def test_build_index_end_to_end(tiny_inputs: tuple[Path, Path], tmp_path: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    shards, checkpoint = tiny_inputs
    config = IndexBuildConfig(shards_dir=str(shards), model=str(checkpoint), index_root=str(tmp_path),
                              batch_size=16, num_workers=2, validation_queries=20)
    with caplog.at_level(logging.INFO, logger="vitrine.indexer"):
        path = build_index(config)
    assert read_current(tmp_path) == path.name
    assert any("published" in r.getMessage() for r in caplog.records)
    manifest = json.loads((path / "manifest.json").read_text())
    embedder = Embedder.load(checkpoint)
    assert manifest["model_fingerprint"] == embedder.fingerprint
    assert manifest["model_path"] == str(checkpoint.resolve())
    assert manifest["factory"] == "IDMap,Flat" and manifest["dim"] == 16
    assert manifest["validation"]["recall_at_10"] == 1.0
    assert manifest["build_config"]["batch_size"] == 16
    assert manifest["catalog"] and manifest["embedding"]["embedded"] == manifest["count"]
    with open_current(tmp_path, verify_checksums=True) as version:
        assert version.count == manifest["count"] > 0
        first = version.product(0)
        assert version.internal_id(first.product_id) == 0
        image = (MINI / "images" / f"{first.product_id}.jpg").read_bytes()
        query = embedder.embed_bytes([image])
        np.testing.assert_allclose(query[0], version.vector(0), atol=1e-2)
        _, ids = version.search(query, 3)
        assert ids[0, 0] == 0


def test_embed_stage_counts_bad_images(tiny_inputs: tuple[Path, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    shards, checkpoint = tiny_inputs
    real_decode = model.images.decode_image
    calls = []

    def flaky_decode(data: bytes, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise model.images.ImageDecodeError("truncated JPEG")
        return real_decode(data)

    monkeypatch.setattr(model.images, "decode_image", flaky_decode)
    config = IndexBuildConfig(shards_dir=str(shards), model=str(checkpoint), index_root=str(tmp_path),
                              batch_size=8, num_workers=0, chunk_rows=16)
    report = build_index(config, ("embed",)) and json.loads((tmp_path / ".work" / "embed" / "done.json").read_text())
    assert report["bad_images"] == 1 and report["bad_records"] == [1]
    assert report["records"] == len(calls) == report["embedded"] + 1 == N_IMAGES
    vectors = np.load(tmp_path / ".work" / "embed" / "vectors.f16.npy")
    assert vectors.shape == (N_IMAGES - 1, 16) and vectors.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)
    path = build_index(config)  # the other stages index the 59 good images
    with open_current(tmp_path) as version:
        assert version.count == N_IMAGES - 1 and version.path == path
