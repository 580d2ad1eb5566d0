"""Checkpoints: a folder with model.pt (state dict) and model_card.json, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from model.files import sha256_file
from model.networks import ModelConfig, VitrineModel, create_model

WEIGHTS_FILE = "model.pt"
CARD_FILE = "model_card.json"
CARD_FORMAT = "vitrine-model/1"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"  # the committed default model


def default_model_path() -> Path:
    """The committed default model (used when no model is named); a clear error when it is missing."""
    if not (DEFAULT_MODEL_DIR / CARD_FILE).is_file() or not (DEFAULT_MODEL_DIR / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no default model at {DEFAULT_MODEL_DIR}: name a checkpoint with --model, or "
                                "reproduce the default with scripts/train_default_model.sh")
    return DEFAULT_MODEL_DIR


def card_resize_mode(card: dict[str, Any]) -> str:
    """A card's resize_mode (model.images.fit_aspect); cards written before the key existed stretched images."""
    return str(card.get("resize_mode", "stretch"))


def model_fingerprint(folder: str | Path) -> str:
    """A checkpoint's fingerprint (what index versions record and servers check): what makes its vectors.

    The SHA-256 of its weights file, combined with the card's resize_mode when that is not "stretch" (the
    preprocessing of every card written before resize modes existed), so that two cards with the same weights
    but different preprocessing never share an index, while older checkpoints keep their fingerprints.
    """
    folder = Path(folder)
    weights = sha256_file(folder / WEIGHTS_FILE)
    card = folder / CARD_FILE
    mode = card_resize_mode(json.loads(card.read_text(encoding="utf-8")) if card.is_file() else {})
    if mode == "stretch":
        return weights
    return hashlib.sha256(f"{weights}:resize_mode={mode}".encode()).hexdigest()


def save_checkpoint(folder: str | Path, model: VitrineModel, card: dict[str, Any]) -> Path:
    """Write model.pt and model_card.json into `folder` (via a temporary folder renamed at the end).

    The card is completed with the format, the model config, the timm name/kwargs and the weights' sha256.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, tmp / WEIGHTS_FILE)
    config = model.config
    full_card = {"format": CARD_FORMAT, **card, "model_config": config.to_json(), "timm_name": config.timm_name,
                 "timm_kwargs": {**config.timm_kwargs(), "img_size": list(config.image_size)},
                 "input_size": list(config.image_size), "embedding_dim": model.embedding_dim,
                 "weights_sha256": sha256_file(tmp / WEIGHTS_FILE)}
    (tmp / CARD_FILE).write_text(json.dumps(full_card, indent=2, sort_keys=True), encoding="utf-8")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def load_model_card(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's model card."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no model card at {path}: is {folder} a vitrine checkpoint folder?")
    card = json.loads(path.read_text(encoding="utf-8"))
    if card.get("format") != CARD_FORMAT:
        raise ValueError(f"{path} has format {card.get('format')!r}, expected {CARD_FORMAT!r}")
    return card


def load_checkpoint(folder: str | Path) -> tuple[VitrineModel, dict[str, Any]]:
    """Rebuild the model from the card and load its weights; returns (model in eval mode, card)."""
    card = load_model_card(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights}")
    model = create_model(ModelConfig.from_json(card["model_config"]), pretrained_weights=False)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), card
