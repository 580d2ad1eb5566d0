"""Training: both stages of the paper's recipe on shard records, single process or `torchrun` DDP.

Stage "pretrain": the trunk learns the weak labels mined from text (model.annotate) with a multi-label
head. Stage "finetune": the unified embedding learns every task at once (articleType, baseColour, ...),
each a normalized-softmax head on the same L2-normalised embedding, tasks mixed in every batch, losses
masked where a record lacks a label, then summed; optionally distilled from a CNN teacher's logits.
AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast where the hardware has it,
seeded per-example augmentation, a training state every `checkpoint_every` steps and an exact resume,
a progress bar with loss and images/s, per-step metrics in metrics.jsonl, and a checkpoint folder with a
model card (config, label maps, data fingerprint, timings, metrics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from model.annotate import load_weak_labels
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data.shards import ShardDataset, load_shards_manifest
from model.images import RESIZE_MODES
from model.losses import MultiTaskLoss
from model.networks import IMAGENET_LITE0, LITE0_MEAN, LITE0_STD, ModelConfig, VitrineModel, create_model
from model.runtime import tune_malloc
from model.train_loop import LoopState, run_epochs
from model.training_data import Augment, load_teacher, make_targets, scan_label_maps

logger = logging.getLogger("vitrine.model")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_TASKS = ("articleType", "baseColour", "gender", "usage", "season", "masterCategory", "subCategory")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (paths, stage, optimisation, model size, data selection)."""

    shards_dir: Path | str
    out_dir: Path | str  # checkpoint folder (model.pt + model_card.json + metrics.jsonl)
    stage: str = "finetune"  # "pretrain" (weak labels) or "finetune" (multi-task)
    tasks: tuple[str, ...] = ("articleType",)  # label columns of the finetune stage (one head each)
    task_weights: tuple[float, ...] = ()  # per task; empty: 1.0 each
    weak_labels: Path | str | None = None  # model.annotate output (required by the pretrain stage)
    init_from: Path | str | None = None  # checkpoint whose trunk (and neck) start this run (stage 2)
    distill_from: Path | str | None = None  # teacher logits .npz (model.distill); None: no distillation
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    train_splits: tuple[str, ...] = ("train",)  # records whose split is in here (or who have none) are trained on
    max_records: int | None = None  # None: all matching records; else a deterministic subset of N
    min_class_count: int = 1  # classes with fewer training records are not learned
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of all steps spent warming up linearly
    grad_clip: float = 1.0  # max gradient L2 norm
    label_smoothing: float = 0.0
    seed: int = 0
    num_workers: int = 0  # dataloader worker processes per rank
    shuffle_buffer: int = 8192  # records
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "auto" (bf16 where the hardware has it)
    checkpoint_every: int = 200  # steps between training states (resume points); 0: never
    timm_name: str = "vit_tiny_patch16_224"
    pretrained: str = ""  # "" or model.networks.IMAGENET_LITE0 (the CNN trunk)
    image_height: int = 80  # pixels
    image_width: int = 64  # pixels
    resize_mode: str = "crop"  # how an image of another aspect ratio meets HxW: crop (centre), pad or stretch
    zoom_out: float = 0.0  # probability of the zoom-out augmentation (product shrunk to 40-100%, on white)
    patch_size: int = 8  # pixels
    width: int = 128  # trunk token dim
    depth: int = 4
    num_heads: int = 4
    embedding_dim: int = 128
    temperature: float = 0.05
    stem_blocks: int = 0  # > 0: hybrid ViT whose patch embedding is EfficientNet-Lite0's stem + this many blocks
    stem_frozen_blocks: int = -1  # hybrid: conv stem + this many blocks frozen (-1: none)
    progress: bool = True  # tqdm bar
    evaluate: bool = True  # measure the checkpoint on the held-out records into its card (model.evaluate)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings, tuples as lists)."""
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (LITE0_MEAN, LITE0_STD) if self.pretrained == IMAGENET_LITE0 else (IMAGENET_MEAN, IMAGENET_STD)

    def model_config(self, label_maps: dict[str, list[str]], weak_labels: int) -> ModelConfig:
        """The ModelConfig of this run: one head per task (finetune) or the weak-label head (pretrain)."""
        return ModelConfig(timm_name=self.timm_name, image_size=(self.image_height, self.image_width),
                           patch_size=self.patch_size, width=self.width, depth=self.depth,
                           num_heads=self.num_heads, embedding_dim=self.embedding_dim,
                           temperature=self.temperature, pretrained=self.pretrained,
                           stem_blocks=self.stem_blocks, stem_frozen_blocks=self.stem_frozen_blocks,
                           heads={t: len(c) for t, c in label_maps.items()}, weak_labels=weak_labels)

    def validate(self) -> None:
        """Raise ValueError on a config that cannot run, before any work."""
        if not 0.0 <= self.zoom_out <= 1.0:
            raise ValueError(f"zoom_out is a probability in [0, 1], got {self.zoom_out}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.stage not in ("pretrain", "finetune"):
            raise ValueError(f"stage must be 'pretrain' or 'finetune', got {self.stage!r}")
        if self.stage == "pretrain" and not self.weak_labels:
            raise ValueError("the pretrain stage needs weak labels: run `vitrine annotate` and pass --weak-labels")
        if self.stage == "finetune" and not self.tasks:
            raise ValueError("the finetune stage needs at least one task (a label column)")
        if self.task_weights and len(self.task_weights) != len(self.tasks):
            raise ValueError(f"{len(self.task_weights)} task weights for {len(self.tasks)} tasks")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be fp32, bf16 or auto, got {self.precision!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(f"max_records must be >= 1 (or unset: every record), got {self.max_records}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"a task is named twice in {list(self.tasks)}: one head per label column")
        if self.timm_name.startswith("vit") and (self.num_heads < 1 or self.width % self.num_heads):
            raise ValueError(f"the ViT width ({self.width}) must be a multiple of its attention heads "
                             f"({self.num_heads}): change --width or --heads")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_fingerprint(shards_dir: Path | str) -> str:
    """Names the training data: SHA-256 of the shards' format and of each shard's record count and SHA-256, in
    order. Not of the whole manifest: it also holds the ingest's timings and the folders it read, so the same
    catalog ingested twice had two fingerprints."""
    manifest = load_shards_manifest(shards_dir)
    identity = {"format": manifest.get("format"),
                "shards": [[entry["records"], entry["sha256"]] for entry in manifest["shards"]]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def resolve_device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if config.device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(config.device)


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: asked for, or "auto" on a CUDA GPU with bf16 or a CPU with AVX512-BF16/AMX."""
    if config.precision == "bf16":
        return True
    if config.precision == "auto":
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _init_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, device


def _warm_start(model: VitrineModel, checkpoint: Path | str) -> dict[str, Any]:
    """Copy the trunk (and the neck when shapes match) of a checkpoint into the model; heads start fresh."""
    source, card = load_checkpoint(checkpoint)
    own = model.state_dict()
    taken = {k: v for k, v in source.state_dict().items()
             if k.startswith(("trunk.", "neck.")) and k in own and own[k].shape == v.shape}
    if not any(k.startswith("trunk.") for k in taken):
        raise ValueError(f"{checkpoint} has no trunk matching this model ({model.config.timm_name}): "
                         "init_from must be a checkpoint of the same architecture")
    model.load_state_dict(taken, strict=False)
    return {"init_from": str(checkpoint), "init_weights_sha256": card.get("weights_sha256"),
            "init_tensors": len(taken)}


def _build_model(config: TrainConfig, label_maps: dict[str, list[str]], n_weak: int) -> tuple[VitrineModel, dict]:
    model = create_model(config.model_config(label_maps, n_weak))
    init = _warm_start(model, config.init_from) if config.init_from else {}
    return model, init


def train(config: TrainConfig) -> Path:
    """Run one stage and save a checkpoint in config.out_dir (rank 0); returns that folder.

    A run interrupted after a training state was written resumes from it when started again with the same
    config (exactly, in a single process).
    """
    config.validate()
    tune_malloc()  # activation and gradient buffers reused instead of mapped per step (model.runtime)
    start = time.perf_counter()
    rank, world, device = _init_distributed(config)
    seed_everything(config.seed)
    pretrain = config.stage == "pretrain"
    tasks = () if pretrain else config.tasks
    label_maps, ids = scan_label_maps(config.shards_dir, tasks, config.train_splits, config.max_records,
                                      config.min_class_count)  # no tasks (pretrain): only the record ids
    weak = load_weak_labels(config.weak_labels) if pretrain and config.weak_labels else None
    if weak is not None and not weak.labels:
        raise ValueError(f"the weak labels {config.weak_labels} hold no label (nothing to pretrain on): rerun "
                         "`vitrine annotate` with other --text-fields / --splits or a lower --min-count")
    teacher = load_teacher(config.distill_from, label_maps) if config.distill_from else None
    model, init = _build_model(config, label_maps, len(weak.labels) if weak else 0)
    model.to(device)
    if model.config.channels_last:
        model.to(memory_format=torch.channels_last)
    mean, std = config.mean_std
    dataset = ShardDataset(config.shards_dir, Augment((config.image_height, config.image_width), mean, std,
                                                       resize_mode=config.resize_mode, zoom_out=config.zoom_out),
                           make_targets(label_maps, ids, weak, teacher), seed=config.seed,
                           shuffle_buffer=config.shuffle_buffer)
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers,
                        persistent_workers=False, drop_last=False)
    weights = config.task_weights or (1.0,) * len(tasks)
    loss_fn = MultiTaskLoss(dict(zip(tasks, weights, strict=True)), weak_weight=1.0 if pretrain else 0.0,
                            distill_weight=config.distill_weight if teacher else 0.0,
                            distill_temperature=config.distill_temperature, label_smoothing=config.label_smoothing)
    out_dir = Path(config.out_dir)
    work = out_dir.with_name(f".{out_dir.name}.work")
    state = LoopState(config=config, model=model, loader=loader, dataset=dataset, loss_fn=loss_fn,
                      steps_per_epoch=math.ceil(len(ids) / world / config.batch_size), work_dir=work, rank=rank,
                      world=world, device=device, bf16=use_bf16(config, device),
                      memory_format=torch.channels_last if model.config.channels_last else torch.preserve_format)
    summary = run_epochs(state)
    if rank == 0:
        card = {
            "architecture": f"{config.timm_name} + layernorm(no affine) + linear + l2norm; normalized-softmax "
                            "heads" + ("; weak-label multi-label head" if pretrain else ""),
            "stage": config.stage, "mean": list(mean), "std": list(std), "resize_mode": config.resize_mode,
            "label_maps": label_maps,
            "weak_labels": {"path": str(config.weak_labels), "labels": len(weak.labels)} if weak else None,
            "distillation": {"teacher": str(config.distill_from), "weight": config.distill_weight,
                             "temperature": config.distill_temperature} if teacher else None,
            **init, "data_fingerprint": data_fingerprint(config.shards_dir), "train_records": len(ids),
            "world_size": world, "device": str(device), "bf16": state.bf16,
            "metrics": {k: summary[k] for k in ("final_train_loss", "steps", "images_seen", "images_per_s")},
            "timings": {"train_seconds": summary["train_seconds"],
                        "total_seconds": round(time.perf_counter() - start, 3)},
            "skipped_records": summary["skipped_records"], "config": config.to_json(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        save_checkpoint(out_dir, model.cpu(), card)
        (work / "metrics.jsonl").replace(out_dir / "metrics.jsonl")
        shutil.rmtree(work, ignore_errors=True)
        if config.evaluate:
            _evaluate_into_card(out_dir, config, device)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return out_dir


def _evaluate_into_card(out_dir: Path, config: TrainConfig, device: torch.device) -> None:
    """The card's "evaluation" on the held-out records (model.evaluate); the checkpoint is already saved, so an
    evaluation that fails is logged and recorded in the card, and the trained model is kept."""
    from model.evaluate import MAX_RECORDS, evaluate_checkpoint, summary_line, write_evaluation

    try:
        # a pretrained trunk has no task heads: only the embedding's spread is measured, on fewer records
        evaluation = evaluate_checkpoint(out_dir, config.shards_dir, train_splits=config.train_splits,
                                         max_records=2000 if config.stage == "pretrain" else MAX_RECORDS,
                                         device=str(device), progress=config.progress)
        logger.info(summary_line(evaluation))
    except Exception as exc:  # noqa: BLE001 - never lose a finished training to its evaluation
        logger.warning("evaluation of %s failed (the checkpoint is saved): %s", out_dir, exc)
        evaluation = {"error": str(exc)}
    write_evaluation(out_dir, evaluation)


def config_summary(config: TrainConfig) -> str:
    """One line naming the run (logged at start)."""
    return json.dumps({k: v for k, v in config.to_json().items() if v not in (None, "", [], ())})
