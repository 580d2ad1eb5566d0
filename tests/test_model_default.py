"""The committed default model: small enough to ship, loadable, two-stage, and good on real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model.catalog import CatalogConfig, read_catalog
from model.checkpoint import default_model_path
from model.embedder import Embedder
from model.networks import binary_codes

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"


def test_default_model_is_small_and_documented() -> None:
    folder = default_model_path()
    assert (folder / "model.pt").stat().st_size <= 25 * 1024 * 1024
    card = json.loads((folder / "model_card.json").read_text())
    assert card["stage"] == "finetune" and card["init_from"] and card["init_tensors"] > 50  # two stages
    assert {"articleType", "baseColour", "gender", "usage", "season", "masterCategory", "subCategory",
            "articleType+baseColour"} == set(card["label_maps"])
    assert card["config"]["train_splits"] == ["train"] and card["timings"]["train_seconds"] > 0
    assert card["model_config"]["timm_name"].startswith("vit_")  # a hybrid ViT: ImageNet conv stem + our blocks
    assert card["model_config"]["stem_blocks"] == 5 and card["model_config"]["depth"] == 6
    evaluation = card["evaluation"]  # `vitrine evaluate` on the full catalog's 6,623 val + test records
    assert evaluation["held_out"] and evaluation["splits"] == ["test", "val"] and evaluation["records"] > 6000
    assert set(evaluation["tasks"]) == set(card["label_maps"]) and not evaluation["collapsed"]


def test_default_model_finds_the_same_article_type_on_real_photos() -> None:
    """Mini catalog: test-split photos query the other photos; the first result's type must mostly match.

    The mini catalog's test-split products were never trained on (the default model saw the train split only).
    """
    embedder = Embedder.load(default_model_path())
    table = read_catalog(MINI / "styles.csv", CatalogConfig())
    products = [p for p in table.products if (MINI / "images" / f"{p.product_id}.jpg").exists()]
    vectors = embedder.embed_bytes([(MINI / "images" / f"{p.product_id}.jpg").read_bytes() for p in products])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    queries = [i for i, p in enumerate(products) if p.split == "test"]
    scores = vectors[queries] @ vectors.T
    scores[np.arange(len(queries)), queries] = -np.inf  # the query itself is not an answer
    first = scores.argmax(axis=1)
    top1 = np.mean([products[f].category == products[q].category for q, f in zip(queries, first, strict=True)])
    assert len(queries) == 201 and top1 >= 0.85, top1  # 0.94 when committed (hybrid ViT); chance is 0.05
    codes = binary_codes(vectors)
    assert codes.shape == (len(products), embedder.dim // 8) and codes.dtype == np.uint8


def test_default_hybrid_embeds_channels_last_as_it_would_contiguous() -> None:
    """The hybrid's conv stem runs channels-last in the Embedder (faster on CPU); the embeddings are the
    plain contiguous forward's, to float rounding."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.images import decode_image

    embedder = Embedder.load(default_model_path(), precision="fp32")
    assert embedder.channels_last and embedder.model.config.channels_last
    paths = sorted((MINI / "images").glob("*.jpg"))[:16]
    pixels = np.stack([embedder.preprocess(decode_image(p.read_bytes())) for p in paths])
    plain, _ = load_checkpoint(default_model_path())
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(plain.eval().embed(torch.from_numpy(pixels)).float(), dim=-1)
    np.testing.assert_allclose(embedder.embed_pixels(pixels), expected.numpy(), atol=1e-5)


def test_precision_settings_and_bf16_embeddings_match_fp32() -> None:
    """`auto` is bf16 where oneDNN computes it natively and fp32 elsewhere; bf16 embeddings of real photos are the
    fp32 ones to bf16 rounding (interchangeable in one index); unknown settings are refused."""
    import pytest
    import torch

    from model.embedder import resolve_precision
    from model.images import decode_image

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "mps") == "fp32"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", "cpu")
    paths = sorted((MINI / "images").glob("*.jpg"))[:16]
    images = [decode_image(p.read_bytes()) for p in paths]
    full = Embedder.load(default_model_path(), precision="fp32")
    half = Embedder.load(default_model_path(), precision="bf16")
    assert (full.precision, half.precision) == ("fp32", "bf16")
    a, b = full.embed_images(images), half.embed_images(images)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.97 and np.median(cosine) > 0.995
    assert ((a @ b.T).argmax(axis=1) == np.arange(len(paths))).all()  # each bf16 photo finds its fp32 self


def test_uint8_preprocessing_gives_the_float_path_embeddings_bit_for_bit() -> None:
    """The index build ships uint8 pixels and normalises in embed_pixels; the server normalises per image in
    `preprocess`. Both must embed a photo identically (an index and its queries must agree)."""
    from model.images import decode_image

    embedder = Embedder.load(default_model_path(), precision="fp32")
    images = [decode_image(p.read_bytes()) for p in sorted((MINI / "images").glob("*.jpg"))[:8]]
    as_float = np.stack([embedder.preprocess(im) for im in images])
    as_uint8 = np.stack([embedder.preprocess_uint8(im) for im in images])
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == as_float.shape
    np.testing.assert_array_equal(embedder.embed_pixels(as_uint8), embedder.embed_pixels(as_float))


def test_large_jpegs_decode_at_reduced_scale_with_the_full_decodes_embedding() -> None:
    """Embedder.decode (the server's queries, the index build, embed_bytes) decodes a phone-sized JPEG at the
    smallest DCT scale that keeps three times the model's input; the embedding is the full decode's."""
    import io

    from PIL import Image

    from model.images import decode_image

    embedder = Embedder.load(default_model_path(), precision="fp32")
    height, width = embedder.input_size
    assert embedder.decode_size() == (3 * width, 3 * height)
    assert embedder.decode_size((0.25, 0.0, 0.5, 0.25)) == (6 * width, 12 * height)  # a crop needs more pixels
    rng = np.random.default_rng(0)
    cosines = []
    for path in sorted((MINI / "images").glob("*.jpg"))[:6]:
        photo = Image.open(path).convert("RGB").resize((1536, 2048), Image.Resampling.BICUBIC)
        noisy = np.asarray(photo, dtype=np.int16) + rng.normal(0, 4, (2048, 1536, 3)).astype(np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        reduced = embedder.decode(buffer.getvalue())
        assert reduced.size == (1536 // 4, 2048 // 4)  # 1/8 (192x256) would be under 3 x 96x128
        full = embedder.embed_images([decode_image(buffer.getvalue())])[0]
        cosines.append(float(embedder.embed_bytes([buffer.getvalue()])[0] @ full))
    assert min(cosines) > 0.995, cosines  # bf16 against fp32 arithmetic: 0.999 median, 0.976 worst (RESULTS.md)
