"""The evaluation that ends a training run (model.evaluate): held-out records of real shards, head accuracy and
top-1 relevance checked against a computation of their own, the collapse check, and `vitrine evaluate`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from model.catalog import CatalogConfig
from model.checkpoint import model_fingerprint
from model.data import build_shards, iter_shard_records
from model.embedder import Embedder
from model.evaluate import evaluate_checkpoint, mean_pair_cosine, nearest_other
from model.networks import head_key
from model.train import TrainConfig, train
from vitrine.cli import main

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, shards): one epoch on 200 train-split records of the mini catalog, evaluated at the end."""
    root = tmp_path_factory.mktemp("evaluate")
    build_shards(MINI / "styles.csv", MINI / "images", root / "shards", CatalogConfig(), progress=False)
    config = TrainConfig(shards_dir=root / "shards", out_dir=root / "model", max_records=200, epochs=1,
                         batch_size=50, width=64, depth=1, num_heads=2, embedding_dim=32, progress=False, seed=3,
                         tasks=("articleType", "baseColour"))
    return train(config), root / "shards"


def test_a_training_run_ends_with_an_evaluation_on_the_held_out_records(trained: tuple[Path, Path]) -> None:
    checkpoint, shards = trained
    evaluation = json.loads((checkpoint / "model_card.json").read_text())["evaluation"]
    held = [r for r in iter_shard_records(shards) if r.product.split not in (None, "train")]
    assert evaluation["held_out"] and evaluation["records"] == len(held) > 50 and evaluation["undecodable"] == 0
    assert evaluation["splits"] == sorted({r.product.split for r in held})
    # the same numbers computed here, from the embedder and the heads directly
    embedder = Embedder.load(checkpoint, precision=evaluation["precision"])
    vectors = embedder.embed_bytes([r.image_bytes for r in held])
    card = embedder.model_card
    for task in ("articleType", "baseColour"):
        labels = np.array([r.product.attributes[task] for r in held], dtype=object)
        names = card["label_maps"][task]
        known = np.array([label in names for label in labels])
        with torch.no_grad():
            predicted = embedder.model.heads[head_key(task)](torch.from_numpy(vectors[known])).argmax(1).numpy()
        accuracy = float((np.array(names, dtype=object)[predicted] == labels[known]).mean())
        scores = vectors @ vectors.T
        np.fill_diagonal(scores, -np.inf)
        top1 = float((labels[scores.argmax(1)] == labels).mean())
        entry = evaluation["tasks"][task]
        assert entry["head_accuracy"] == pytest.approx(accuracy, abs=2e-3)
        assert entry["top1_same_label"] == pytest.approx(top1, abs=2e-3)
        assert entry["unseen_label"] == int((~known).sum()) and entry["classes"] == len(names)
    # a one-epoch toy ViT barely separates images yet: what the collapse flag is for
    assert 0.0 < evaluation["mean_pair_cosine"] < 1.0
    assert evaluation["collapsed"] == (evaluation["mean_pair_cosine"] > 0.9)


def test_nearest_other_and_the_pair_cosine_of_a_collapsed_embedding() -> None:
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(300, 16)).astype(np.float32)
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    scores = spread @ spread.T
    np.fill_diagonal(scores, -np.inf)
    assert (nearest_other(spread, block=64) == scores.argmax(1)).all()  # blocks change nothing
    assert abs(mean_pair_cosine(spread)) < 0.05
    collapsed = np.tile(spread[:1], (300, 1)) + 1e-3 * spread
    collapsed /= np.linalg.norm(collapsed, axis=1, keepdims=True)
    assert mean_pair_cosine(collapsed) > 0.99 and nearest_other(spread[:1]).tolist() == [-1]


def test_a_catalog_without_splits_is_evaluated_on_training_records_and_says_so(
        trained: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    checkpoint, _ = trained
    (tmp_path / "images").mkdir()
    lines = (MINI / "styles.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, column in enumerate(header) if column != "split"]
    rows = [",".join(row.split(",")[i] for i in keep) for row in lines[:81]]  # no split column, 80 products
    (tmp_path / "shop.csv").write_text("\n".join(rows) + "\n")
    build_shards(tmp_path / "shop.csv", MINI / "images", tmp_path / "shards", CatalogConfig(), progress=False)
    with caplog.at_level(logging.WARNING, logger="vitrine.model"):
        evaluation = evaluate_checkpoint(checkpoint, tmp_path / "shards", max_records=50, progress=False)
    assert not evaluation["held_out"] and "flatters" in evaluation["note"] and evaluation["splits"] == []
    assert evaluation["records"] == 50 and evaluation["of_records"] == 80  # an even sample of 50


def test_vitrine_evaluate_writes_the_card_and_keeps_the_fingerprint(trained: tuple[Path, Path],
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint, shards = trained
    before = model_fingerprint(checkpoint)
    card = json.loads((checkpoint / "model_card.json").read_text())
    assert main(["evaluate", "--model", str(checkpoint), "--shards", str(shards), "--max-records", "60"]) == 0
    out = capsys.readouterr().out
    assert "evaluation on 60 held-out records" in out and "written into" in out
    after = json.loads((checkpoint / "model_card.json").read_text())
    assert after["evaluation"]["records"] == 60 and model_fingerprint(checkpoint) == before
    assert {k: v for k, v in after.items() if k != "evaluation"} == {k: v for k, v in card.items()
                                                                     if k != "evaluation"}
    assert main(["evaluate", "--model", str(checkpoint), "--shards", str(shards), "--max-records", "1"]) == 2
    assert main(["evaluate", "--model", str(checkpoint), "--shards", str(shards / "nope")]) == 2


def test_vitrine_evaluate_leaves_the_shipped_default_card_alone(trained: tuple[Path, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from model.checkpoint import default_model_path

    _, shards = trained
    card = (default_model_path() / "model_card.json").read_bytes()
    assert main(["evaluate", "--shards", str(shards), "--max-records", "20"]) == 0
    assert "not written" in capsys.readouterr().out
    assert (default_model_path() / "model_card.json").read_bytes() == card
