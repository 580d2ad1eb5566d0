"""The network: a timm ViT trunk (num_classes=0), an embedding neck and a ModuleDict of task heads.

Following "Classification is a strong baseline for deep metric learning" (BMVC 2019): LayerNorm without
affine before the embedding Linear, L2-normalised embedding, and per task a normalized-softmax head
(cosine similarity to L2-normalised class proxies divided by a temperature of 0.05).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a VitrineModel; saved in the model card so the checkpoint can be rebuilt."""

    timm_name: str = "vit_tiny_patch16_224"
    image_size: tuple[int, int] = (80, 64)  # (H, W) pixels fed to the trunk
    patch_size: int = 8  # pixels
    width: int = 128  # trunk token dim
    depth: int = 4  # transformer blocks
    num_heads: int = 4
    global_pool: str = "avg"  # timm pooling of the trunk's tokens: "avg" (mean of patch tokens) or "token" (CLS)
    embedding_dim: int = 128
    temperature: float = 0.05  # normalized-softmax temperature
    heads: dict[str, int] = field(default_factory=dict)  # task (label column) -> number of classes

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments given to timm.create_model (besides the name)."""
        return {"pretrained": False, "num_classes": 0, "img_size": tuple(self.image_size),
                "patch_size": self.patch_size, "embed_dim": self.width, "depth": self.depth,
                "num_heads": self.num_heads, "global_pool": self.global_pool}

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        """Config from a `to_json` dict."""
        values = dict(data)
        values["image_size"] = tuple(values["image_size"])
        values["heads"] = {str(k): int(v) for k, v in values.get("heads", {}).items()}
        return cls(**values)


class NormalizedSoftmaxHead(nn.Module):
    """Logits = cosine(embedding, class proxy) / temperature."""

    def __init__(self, embedding_dim: int, num_classes: int, temperature: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a head needs at least one class, got {num_classes}")
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)
        self.temperature = temperature

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embedding, dim=-1), F.normalize(self.proxies, dim=-1)) / self.temperature


class VitrineModel(nn.Module):
    """Trunk + embedding neck + task heads; `embed` gives L2-normalised embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = timm.create_model(config.timm_name, **config.timm_kwargs())
        features: int = self.trunk.num_features  # type: ignore[assignment]
        self.neck = nn.Sequential(nn.LayerNorm(features, elementwise_affine=False),
                                  nn.Linear(features, config.embedding_dim))
        self.tasks = tuple(config.heads)
        self.heads = nn.ModuleDict({head_key(task): NormalizedSoftmaxHead(config.embedding_dim, n, config.temperature)
                                    for task, n in config.heads.items()})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (batch, embedding_dim) of normalised image tensors (batch, 3, H, W)."""
        return F.normalize(self.neck(self.trunk(images)).float(), dim=-1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"embedding": (B, D), "logits/<task>": (B, classes) for each head}."""
        embedding = self.embed(images)
        outputs = {"embedding": embedding}
        for task in self.tasks:
            outputs[f"logits/{task}"] = self.heads[head_key(task)](embedding)
        return outputs


def head_key(task: str) -> str:
    """ModuleDict key of a task's head: a label column may be any CSV name ("type", "a.b"), a key may not."""
    return "task_" + task.replace(".", "_")


def create_model(config: ModelConfig) -> VitrineModel:
    """Build a VitrineModel with randomly initialised weights (never downloads pretrained weights)."""
    return VitrineModel(config)
