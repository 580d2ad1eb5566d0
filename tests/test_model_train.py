"""A tiny training run -> checkpoint -> Embedder: shapes, normalisation, determinism, round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.catalog import CatalogConfig
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import build_shards, iter_shard_records
from model.embedder import Embedder
from model.images import ImageDecodeError
from model.losses import NormalizedSoftmaxLoss
from model.networks import ModelConfig, create_model
from model.train import TrainConfig, lr_factor, train

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"


def _tiny_config(shards: Path, out: Path, **overrides: object) -> TrainConfig:
    values = {"max_records": 200, "epochs": 1, "batch_size": 50, "width": 64, "depth": 1, "num_heads": 2,
              "embedding_dim": 32, "progress": False, "seed": 7, **overrides}
    return TrainConfig(shards_dir=shards, out_dir=out, **values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint trained for one epoch on 200 train-split records of the mini catalog."""
    root = tmp_path_factory.mktemp("train")
    build_shards(MINI / "styles.csv", MINI / "images", root / "shards", CatalogConfig(), progress=False)
    return train(_tiny_config(root / "shards", root / "model"))


def test_train_writes_checkpoint_card_and_metrics(checkpoint: Path) -> None:
    card = json.loads((checkpoint / "model_card.json").read_text())
    assert card["input_size"] == [80, 64] and card["embedding_dim"] == 32
    assert card["timm_kwargs"]["pretrained"] is False and card["timm_kwargs"]["num_classes"] == 0
    assert len(card["label_maps"]["articleType"]) >= 15 and card["train_records"] == 200
    assert len(card["data_fingerprint"]) == 64 and card["config"]["train_splits"] == ["train"]
    assert math.isfinite(card["metrics"]["final_train_loss"]) and card["timings"]["train_seconds"] > 0
    rows = [json.loads(line) for line in (checkpoint / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"loss", "loss/articleType", "lr", "images_per_s"} <= set(rows[0])
    assert not any(p.name.startswith(".") for p in checkpoint.parent.iterdir())


def test_embedder_gives_unit_float32_rows_deterministically(checkpoint: Path) -> None:
    embedder = Embedder.load(checkpoint)
    paths = sorted((MINI / "images").glob("*.jpg"))[:5]
    datas = [p.read_bytes() for p in paths]
    vectors = embedder.embed_bytes(datas, batch_size=2)
    assert vectors.shape == (5, embedder.dim) == (5, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors, Embedder.load(checkpoint).embed_bytes(datas, batch_size=2))
    np.testing.assert_allclose(vectors, embedder.embed_bytes(datas, batch_size=64), atol=1e-6)
    images = [Image.open(p) for p in paths]
    np.testing.assert_allclose(embedder.embed_images(images), vectors, atol=1e-6)
    assert embedder.embed_images([]).shape == (0, 32)
    assert len(embedder.fingerprint) == 64 and embedder.fingerprint == embedder.model_card["weights_sha256"]
    with pytest.raises(ImageDecodeError):
        embedder.embed_bytes([b"nope"])


def test_training_is_deterministic_under_the_seed(checkpoint: Path, tmp_path: Path) -> None:
    shards = checkpoint.parent / "shards"
    again = train(_tiny_config(shards, tmp_path / "again"))
    assert Embedder.load(again).fingerprint == Embedder.load(checkpoint).fingerprint


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = create_model(ModelConfig(width=64, depth=1, num_heads=2, embedding_dim=16, heads={"articleType": 3}))
    folder = save_checkpoint(tmp_path / "ckpt", model, {"mean": [0.5] * 3, "std": [0.5] * 3})
    loaded, card = load_checkpoint(folder)
    assert card["model_config"]["heads"] == {"articleType": 3}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    save_checkpoint(folder, loaded, card)  # overwriting an existing checkpoint folder works
    x = torch.randn(2, 3, 80, 64)
    model.eval()
    torch.testing.assert_close(loaded.embed(x), model.embed(x))
    with pytest.raises(FileNotFoundError, match="model card"):
        load_checkpoint(tmp_path)


def test_loss_and_model_outputs() -> None:
    model = create_model(ModelConfig(width=64, depth=1, num_heads=2, embedding_dim=16, heads={"a": 4, "b": 2}))
    outputs = model(torch.randn(3, 3, 80, 64))
    assert outputs["logits/a"].shape == (3, 4) and outputs["logits/a"].abs().max() <= 1 / 0.05 + 1e-4
    losses = NormalizedSoftmaxLoss({"a": 1.0, "b": 0.5})(outputs, {"a": torch.tensor([0, 1, 3]),
                                                                    "b": torch.tensor([1, -1, 0])})
    assert set(losses) == {"loss", "loss/a", "loss/b"}
    torch.testing.assert_close(losses["loss"], losses["loss/a"] + 0.5 * losses["loss/b"])


@pytest.mark.parametrize("step, expected", [(0, 0.25), (3, 1.0), (4, 1.0), (14, 0.5), (24, 0.0)])
def test_lr_schedule_warms_up_then_decays(step: int, expected: float) -> None:
    assert lr_factor(step, total_steps=24, warmup_steps=4) == pytest.approx(expected, abs=0.01)


def test_records_iterate_in_stable_order(checkpoint: Path) -> None:
    ids = [r.product.product_id for r in iter_shard_records(checkpoint.parent / "shards")]
    assert len(ids) == len(set(ids)) >= 1000
