"""A tiny training run -> checkpoint -> Embedder: shapes, normalisation, determinism, round trips."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
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
from model.train import TrainConfig, train
from model.train_loop import lr_factor

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"


def _tiny_config(shards: Path, out: Path, **overrides: object) -> TrainConfig:
    values = {"max_records": 200, "epochs": 1, "batch_size": 50, "width": 64, "depth": 1, "num_heads": 2,
              "embedding_dim": 32, "progress": False, "seed": 7, "tasks": ("articleType",), **overrides}
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


def test_data_fingerprint_names_the_data_not_the_ingest_run(checkpoint: Path, tmp_path: Path) -> None:
    """The same catalog ingested again (another folder, another run time) has the same fingerprint; other data
    has another."""
    from model.train import data_fingerprint

    card = json.loads((checkpoint / "model_card.json").read_text())
    assert data_fingerprint(checkpoint.parent / "shards") == card["data_fingerprint"]
    build_shards(MINI / "styles.csv", MINI / "images", tmp_path / "again", CatalogConfig(), progress=False)
    assert data_fingerprint(tmp_path / "again") == card["data_fingerprint"]
    build_shards(MINI / "styles.csv", MINI / "images", tmp_path / "smaller", CatalogConfig(), progress=False,
                 max_records_per_shard=500)
    assert data_fingerprint(tmp_path / "smaller") != card["data_fingerprint"]


def test_training_and_embedder_see_the_same_pixels(checkpoint: Path) -> None:
    """The training loader (evaluation mode) and the Embedder preprocess a photo of another aspect alike."""
    from model.training_data import Augment

    embedder = Embedder.load(checkpoint)
    photo = Image.open(sorted((MINI / "images").glob("*.jpg"))[0]).convert("RGB").resize((160, 90))  # 16:9
    card = embedder.model_card
    augment = Augment(embedder.input_size, card["mean"], card["std"], train=False, resize_mode=card["resize_mode"])
    np.testing.assert_allclose(augment(photo, seed=0).numpy(), embedder.preprocess(photo), atol=1e-6)
    # cropped, not squeezed: the centred window of the input's aspect (4:5 here: 72x90 of the 160x90 photo)
    height, width = embedder.input_size
    assert (height, width) == (80, 64)
    window = photo.crop((44, 0, 116, 90))
    np.testing.assert_allclose(embedder.preprocess(window), embedder.preprocess(photo), atol=1e-6)
    stretched = Embedder.load(checkpoint)
    stretched.resize_mode = "stretch"
    assert not np.allclose(stretched.preprocess(photo), embedder.preprocess(photo))


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
    # a new card crops images to the input's aspect (resize_mode "crop"): the fingerprint covers weights and mode
    import hashlib

    assert embedder.model_card["resize_mode"] == embedder.resize_mode == "crop"
    weights = embedder.model_card["weights_sha256"]
    assert embedder.fingerprint == hashlib.sha256(f"{weights}:resize_mode=crop".encode()).hexdigest()
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


def test_multitask_loss_masks_missing_labels_and_sums_tasks() -> None:
    from model.losses import IGNORE_LABEL, MultiTaskLoss

    model = create_model(ModelConfig(width=64, depth=1, num_heads=2, embedding_dim=16, heads={"a": 4, "b": 2},
                                     weak_labels=5))
    outputs = model(torch.randn(3, 3, 80, 64))
    weak = torch.tensor([[1.0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    targets = {"label/a": torch.tensor([0, 1, 3]), "label/b": torch.full((3,), IGNORE_LABEL), "weak": weak}
    losses = MultiTaskLoss({"a": 1.0, "b": 1.0}, weak_weight=0.5)(outputs, targets)
    assert float(losses["loss/b"].detach()) == 0.0 and torch.isfinite(losses["loss"])
    torch.testing.assert_close(losses["loss"], losses["loss/a"] + 0.5 * losses["loss/weak"])
    # the image without weak labels does not count: same loss as the two labelled rows alone
    alone = MultiTaskLoss({}, weak_weight=1.0)({"logits/weak": outputs["logits/weak"][[0, 2]]},
                                               {"weak": weak[[0, 2]]})
    torch.testing.assert_close(alone["loss"], losses["loss/weak"])


def test_two_stages_weak_label_pretrain_then_multitask_finetune(checkpoint: Path, tmp_path: Path) -> None:
    from model.annotate import WeakLabelConfig, build_weak_labels, save_weak_labels

    shards = checkpoint.parent / "shards"
    weak = build_weak_labels((r.product for r in iter_shard_records(shards)),
                             WeakLabelConfig(min_count=3, head_min_count=30, tail_clusters=4))
    save_weak_labels(weak, tmp_path / "weak.json")
    pre = train(_tiny_config(shards, tmp_path / "pre", stage="pretrain", weak_labels=tmp_path / "weak.json"))
    pre_card = json.loads((pre / "model_card.json").read_text())
    assert pre_card["stage"] == "pretrain" and pre_card["model_config"]["weak_labels"] == len(weak.labels)
    fine = train(_tiny_config(shards, tmp_path / "fine", init_from=pre, tasks=("articleType", "baseColour", "usage")))
    card = json.loads((fine / "model_card.json").read_text())
    assert set(card["label_maps"]) == {"articleType", "baseColour", "usage"} and card["init_tensors"] > 10
    assert card["init_weights_sha256"] == pre_card["weights_sha256"]
    rows = [json.loads(line) for line in (fine / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/articleType", "loss/baseColour", "loss/usage"} <= set(rows[-1])
    assert Embedder.load(fine).embed_bytes([(MINI / "images" / "28625.jpg").read_bytes()]).shape == (1, 32)
    with pytest.raises(ValueError, match="weak labels"):
        train(_tiny_config(shards, tmp_path / "bad", stage="pretrain"))


def test_a_joint_task_learns_each_pair_of_values_as_one_class(checkpoint: Path, tmp_path: Path) -> None:
    """`--tasks articleType+baseColour`: one head whose classes are the (type, colour) pairs seen in training; a
    record without a colour has no label for it (masked), and the model card's evaluation scores it like any head."""
    from model.data.shards import label_columns, product_label, unknown_label_columns

    shards = checkpoint.parent / "shards"
    products = [r.product for r in iter_shard_records(shards)]
    joint = "articleType+baseColour"
    assert unknown_label_columns([joint, "articleType+nope"], label_columns(products)) == ["articleType+nope"]
    model = train(_tiny_config(shards, tmp_path / "joint", tasks=("articleType", joint)))
    card = json.loads((model / "model_card.json").read_text())
    classes = card["label_maps"][joint]
    assert classes and all(c.count("+") == 1 for c in classes)
    pairs = {f"{p.attributes.get('articleType')}+{p.attributes.get('baseColour')}" for p in products}
    assert set(classes) <= pairs and len(classes) > len(card["label_maps"]["articleType"])
    first = products[0]
    assert product_label(first, joint) == f"{first.attributes['articleType']}+{first.attributes['baseColour']}"
    assert product_label(dataclasses.replace(first, attributes={"articleType": "Tshirts"}), joint) == ""
    assert 0.0 <= card["evaluation"]["tasks"][joint]["head_accuracy"] <= 1.0


def _train_cli(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vitrine", "train", "--shards", str(shards), "--out", str(out),
            "--label-column", "articleType", "--max-records", "100", "--epochs", "2", "--batch-size", "20",
            "--width", "64", "--depth", "1", "--heads", "2", "--embedding-dim", "32", "--image-size", "160x128",
            "--seed", "5", "--checkpoint-every", "3", *extra]


def test_killed_run_resumes_exactly(checkpoint: Path, tmp_path: Path) -> None:
    """SIGKILL a training process after its first training state; rerunning it gives the same weights as a
    run that was never interrupted."""
    import signal
    import subprocess
    import time

    shards = checkpoint.parent / "shards"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(_train_cli(shards, tmp_path / "whole"), env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "resumed"
    state = tmp_path / ".resumed.work" / "state.pt"
    process = subprocess.Popen(_train_cli(shards, out), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (out / "model.pt").exists()
    killed_at = torch.load(state, weights_only=False)["step"]
    assert 3 <= killed_at < 10
    again = subprocess.run(_train_cli(shards, out), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    whole_state = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    resumed_state = torch.load(out / "model.pt", weights_only=True)
    for key, value in whole_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=0)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 10
    assert not (tmp_path / ".resumed.work").exists()


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo): shards split over ranks, every record trained on once per epoch."""
    import subprocess

    shards = tmp_path / "shards"
    build_shards(MINI / "styles.csv", MINI / "images", shards, CatalogConfig(), max_records_per_shard=100,
                 progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vitrine", "train", "--shards", str(shards), "--out", str(tmp_path / "ddp"),
               "--label-column", "articleType", "--epochs", "1", "--batch-size", "64", "--width", "32",
               "--depth", "1", "--heads", "2", "--embedding-dim", "16"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((tmp_path / "ddp" / "model_card.json").read_text())
    assert card["world_size"] == 2 and card["metrics"]["images_seen"] == card["train_records"] > 700
    assert Embedder.load(tmp_path / "ddp").dim == 16


def test_zoom_out_augmentation_shrinks_onto_white_deterministically() -> None:
    from model.training_data import Augment

    photo = Image.open(sorted((MINI / "images").glob("*.jpg"))[0]).convert("RGB")
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    plain = Augment((80, 60), mean, std)
    zoomed = Augment((80, 60), mean, std, zoom_out=1.0)
    for seed in range(5):
        out = zoomed(photo, seed).numpy() * 0.5 + 0.5  # back to [0, 1]
        np.testing.assert_array_equal(out, zoomed(photo, seed).numpy() * 0.5 + 0.5)  # seeded: the same again
        white = (out > 0.999).all(axis=0)
        assert white.any(axis=0).all() or white.any(axis=1).all()  # a white margin around the shrunk photo
        assert not white.all()
    # probability 0 draws nothing extra: the same pixels as before the option existed
    np.testing.assert_array_equal(Augment((80, 60), mean, std, zoom_out=0.0)(photo, 3).numpy(), plain(photo, 3).numpy())
    with pytest.raises(ValueError, match="zoom_out"):
        Augment((80, 60), mean, std, zoom_out=1.5)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"num_heads": 3}, "must be a multiple of its attention heads"),  # was an AssertionError traceback in timm
    ({"max_records": -5}, "max_records must be >= 1"),  # silently trained on all records but the last 5
    ({"max_records": 0}, "max_records must be >= 1"),  # blamed the task column ("no record ... has a value")
    ({"tasks": ("articleType", "articleType")}, "named twice"),  # silently trained two heads of one column
])
def test_config_that_cannot_train_is_refused_before_any_work(tmp_path: Path, overrides: dict[str, object],
                                                             message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tiny_config(tmp_path / "no-shards", tmp_path / "out", **overrides).validate()
