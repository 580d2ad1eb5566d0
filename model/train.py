"""Training: a VitrineModel on shard records with the normalized-softmax loss for one label column.

AdamW, linear warm-up then cosine decay, gradient clipping, light augmentation (mild random resized crop,
horizontal flip), per-step metrics in metrics.jsonl, deterministic under the seed (CPU, num_workers=0).
The checkpoint folder holds the weights and a model card (label map, data fingerprint, timings, metrics,
resolved config).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from model.checkpoint import save_checkpoint
from model.data.shards import ShardDataset, iter_shard_records, product_label
from model.losses import NormalizedSoftmaxLoss
from model.networks import ModelConfig, VitrineModel, create_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrainConfig:
    """One training run (paths, optimisation, model size, data selection)."""

    shards_dir: Path | str
    out_dir: Path | str  # checkpoint folder (model.pt + model_card.json + metrics.jsonl)
    label_column: str = "articleType"
    train_splits: tuple[str, ...] = ("train",)  # records whose split is in here (or who have none) are trained on
    max_records: int | None = None  # None: all matching records; else a deterministic subset of N
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of all steps spent warming up linearly
    grad_clip: float = 1.0  # max gradient L2 norm
    seed: int = 0
    num_workers: int = 0  # dataloader worker processes
    device: str = "cpu"
    timm_name: str = "vit_tiny_patch16_224"
    image_height: int = 80  # pixels
    image_width: int = 64  # pixels
    patch_size: int = 8  # pixels
    width: int = 128  # trunk token dim
    depth: int = 4
    num_heads: int = 4
    embedding_dim: int = 128
    temperature: float = 0.05
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    progress: bool = True  # tqdm bar

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings, tuples as lists)."""
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def model_config(self, num_classes: int) -> ModelConfig:
        """The ModelConfig of this run, with one head for the label column."""
        return ModelConfig(timm_name=self.timm_name, image_size=(self.image_height, self.image_width),
                           patch_size=self.patch_size, width=self.width, depth=self.depth,
                           num_heads=self.num_heads, embedding_dim=self.embedding_dim,
                           temperature=self.temperature, heads={self.label_column: num_classes})


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def scan_training_records(config: TrainConfig) -> tuple[list[str], set[str], int]:
    """(sorted label names, ids of the records to train on, their count) — a pass over the metadata.

    A record without a split (a catalog with no split column) is a training record. With `max_records`,
    a deterministic spread-out subset is kept (ids ordered by SHA-1), not the first N.
    """
    eligible: dict[str, str] = {}
    for record in iter_shard_records(config.shards_dir):
        product = record.product
        label = product_label(product, config.label_column)
        if (product.split is None or product.split in config.train_splits) and label:
            eligible[product.product_id] = label
    if not eligible:
        raise ValueError(f"no records in {config.shards_dir} with split in {config.train_splits} and a "
                         f"non-empty {config.label_column!r}: nothing to train on")
    ids = sorted(eligible, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[:config.max_records]
    return sorted({eligible[i] for i in ids}), set(ids), len(ids)


def train_transform(config: TrainConfig) -> transforms.Compose:
    """Light augmentation: mild random resized crop to (H, W), horizontal flip, normalise."""
    aspect = config.image_width / config.image_height
    return transforms.Compose([
        transforms.RandomResizedCrop((config.image_height, config.image_width), scale=(0.8, 1.0),
                                     ratio=(aspect * 0.9, aspect * 1.1), antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(config.mean, config.std),
    ])


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def data_fingerprint(shards_dir: Path | str) -> str:
    """SHA-256 of the shards manifest (it holds each shard's sha256): names the training data."""
    return hashlib.sha256((Path(shards_dir) / "manifest.json").read_bytes()).hexdigest()


def _make_loader(config: TrainConfig, label_map: dict[str, int], ids: set[str]) -> tuple[ShardDataset, DataLoader]:
    """The shuffled training dataset and its DataLoader (seeded)."""
    dataset = ShardDataset(config.shards_dir, train_transform(config), config.label_column, label_map,
                           splits=None, seed=config.seed, allowed_ids=ids)  # ids already hold the split rule
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers,
                        generator=torch.Generator().manual_seed(config.seed),
                        persistent_workers=False, drop_last=False)
    return dataset, loader


def _train_epochs(config: TrainConfig, model: VitrineModel, loader: DataLoader, dataset: ShardDataset,
                  n_records: int, metrics_path: Path) -> dict[str, Any]:
    """The optimisation loop; returns summary metrics (final loss, steps, images/s)."""
    device = torch.device(config.device)
    loss_fn = NormalizedSoftmaxLoss({config.label_column: 1.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(n_records / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = max(1, int(config.warmup * total_steps))
    step, seen, start = 0, 0, time.perf_counter()
    recent: list[float] = []
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not config.progress)
    with open(metrics_path, "w", encoding="utf-8") as metrics_file:
        for epoch in range(config.epochs):
            dataset.set_epoch(epoch)
            model.train()
            for images, labels in loader:
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, total_steps, warmup_steps)
                losses = loss_fn(model(images.to(device)), {k: v.to(device) for k, v in labels.items()})
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                step, seen = step + 1, seen + len(images)
                rate = seen / max(time.perf_counter() - start, 1e-9)
                row = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                       "grad_norm": float(grad_norm), "images_per_s": round(rate, 2),
                       **{k: float(v.detach()) for k, v in losses.items()}}
                metrics_file.write(json.dumps(row) + "\n")
                recent = (recent + [row["loss"]])[-steps_per_epoch:]
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{rate:.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    return {"final_train_loss": float(np.mean(recent)) if recent else float("nan"), "steps": step,
            "images_seen": seen, "train_seconds": round(seconds, 3),
            "images_per_s": round(seen / max(seconds, 1e-9), 2), "skipped_records": dict(dataset.skipped)}


def train(config: TrainConfig) -> Path:
    """Train a model on the shards and save a checkpoint in config.out_dir; returns that folder."""
    start = time.perf_counter()
    seed_everything(config.seed)
    labels, ids, n_records = scan_training_records(config)
    label_map = {name: index for index, name in enumerate(labels)}
    model = create_model(config.model_config(len(labels))).to(config.device)
    dataset, loader = _make_loader(config, label_map, ids)
    out_dir = Path(config.out_dir)
    scratch = out_dir.with_name(f".{out_dir.name}.metrics")
    scratch.mkdir(parents=True, exist_ok=True)
    summary = _train_epochs(config, model, loader, dataset, n_records, scratch / "metrics.jsonl")
    card = {
        "architecture": "vit + layernorm(no affine) + linear + l2norm; normalized-softmax heads",
        "mean": list(config.mean), "std": list(config.std),
        "label_maps": {config.label_column: labels},
        "data_fingerprint": data_fingerprint(config.shards_dir),
        "train_records": n_records,
        "metrics": {k: summary[k] for k in ("final_train_loss", "steps", "images_seen", "images_per_s")},
        "timings": {"train_seconds": summary["train_seconds"],
                    "total_seconds": round(time.perf_counter() - start, 3)},
        "skipped_records": summary["skipped_records"],
        "config": config.to_json(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_checkpoint(out_dir, model.cpu(), card)
    (scratch / "metrics.jsonl").replace(out_dir / "metrics.jsonl")
    scratch.rmdir()
    return out_dir
