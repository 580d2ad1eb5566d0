"""The optimisation loop: DDP wrapping, AdamW with warm-up + cosine, clipping, autocast, resumable state.

The training state (weights, optimizer, step, epoch, batches done in the epoch, the config) is written
atomically to `<work_dir>/state.pt` every `checkpoint_every` steps by rank 0. A new run with the same
config finds it and continues: the epoch's first batches are read again but not trained on, and since
every example's augmentation is seeded by (seed, epoch, record), the resumed run trains on exactly the
same batches as an uninterrupted one (bit-identical weights on CPU in one process).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

STATE_FILE = "state.pt"


@dataclass
class LoopState:
    """Everything the loop needs (built by model.train.train)."""

    config: Any  # model.train.TrainConfig
    model: nn.Module
    loader: DataLoader
    dataset: Any  # model.data.shards.ShardDataset
    loss_fn: nn.Module
    steps_per_epoch: int
    work_dir: Path
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bf16: bool = False
    memory_format: torch.memory_format = torch.preserve_format  # channels_last for convolutional trunks


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _save_state(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_state(state: LoopState, optimizer: torch.optim.Optimizer) -> tuple[int, int, int, float, int]:
    """(step, epoch, batches done in that epoch, seconds trained, images seen) from a saved state, or zeros."""
    path = state.work_dir / STATE_FILE
    if not path.is_file():
        return 0, 0, 0, 0.0, 0
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved["config"] != state.config.to_json():
        raise ValueError(f"{path} belongs to a run with another config; delete {state.work_dir} to start over "
                         "or run again with the same settings to resume")
    state.model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return (int(saved["step"]), int(saved["epoch"]), int(saved["batch_in_epoch"]), float(saved.get("seconds", 0.0)),
            int(saved.get("images_seen", 0)))


def _trim_metrics(path: Path, steps: int) -> None:
    """Keep the first `steps` rows of metrics.jsonl (rows written after the last state are redone)."""
    if path.is_file():
        rows = path.read_text(encoding="utf-8").splitlines()[:steps]
        path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")


def run_epochs(state: LoopState) -> dict[str, Any]:
    """Train for config.epochs (resuming when a state exists); returns summary metrics."""
    config = state.config
    state.work_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(state.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, first_epoch, skip, prior_seconds, prior_seen = _load_state(state, optimizer)  # earlier sessions

    ddp: nn.Module = state.model
    if state.world > 1:
        ddp = nn.parallel.DistributedDataParallel(state.model, find_unused_parameters=True)
    total_steps = state.steps_per_epoch * config.epochs
    warmup_steps = max(1, int(config.warmup * total_steps))
    metrics_path = state.work_dir / "metrics.jsonl"
    _trim_metrics(metrics_path, step)
    seen, start = 0, time.perf_counter()
    recent: list[float] = []
    bar = tqdm(total=total_steps, initial=step, desc=f"train {config.stage}", unit="step",
               disable=not config.progress or state.rank != 0)
    join = ddp.join() if state.world > 1 else contextlib.nullcontext()  # type: ignore[operator]
    with open(metrics_path, "a", encoding="utf-8") as metrics_file, join:
        for epoch in range(first_epoch, config.epochs):
            state.dataset.set_epoch(epoch)
            ddp.train()
            for batch_index, (images, targets) in enumerate(state.loader):
                if epoch == first_epoch and batch_index < skip:
                    continue  # done before the resume
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, total_steps, warmup_steps)
                with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=state.bf16):
                    outputs = ddp(images.to(state.device, non_blocking=True, memory_format=state.memory_format))
                losses = state.loss_fn(outputs, {k: v.to(state.device) for k, v in targets.items()})
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
                optimizer.step()
                step, seen = step + 1, seen + len(images)
                rate = seen * state.world / max(time.perf_counter() - start, 1e-9)
                row = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                       "grad_norm": float(grad_norm), "images_per_s": round(rate, 2),
                       **{k: round(float(v.detach()), 5) for k, v in losses.items()}}
                if state.rank == 0:
                    metrics_file.write(json.dumps(row) + "\n")
                recent = (recent + [row["loss"]])[-state.steps_per_epoch:]
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{rate:.0f}")
                if config.checkpoint_every and step % config.checkpoint_every == 0 and state.rank == 0:
                    metrics_file.flush()
                    _save_state(state.work_dir / STATE_FILE, {
                        "config": config.to_json(), "model": state.model.state_dict(),
                        "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                        "batch_in_epoch": batch_index + 1,
                        "seconds": prior_seconds + time.perf_counter() - start, "images_seen": prior_seen + seen})
            skip = 0
    bar.close()
    session = time.perf_counter() - start
    seen_all = _sum_over_ranks(seen, state)
    seconds = prior_seconds + session  # every session of this run (resumes included), up to its last state
    return {"final_train_loss": float(np.mean(recent)) if recent else float("nan"), "steps": step,
            "images_seen": prior_seen + seen_all, "train_seconds": round(seconds, 3),
            "images_per_s": round(seen_all / max(session, 1e-9), 2), "skipped_records": dict(state.dataset.skipped)}


def _sum_over_ranks(value: int, state: LoopState) -> int:
    if state.world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(tensor)
    return int(tensor.item())
