"""ITQ binary codes: fewer sign flips than plain sign bits, stored beside the weights, used by the Embedder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from model.binary import BINARY_FILE, fit_itq, load_rotation, pack_signs, quantization_error, save_rotation

REPO = Path(__file__).resolve().parents[1]


def _embeddings(n: int = 3000, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Correlated, off-centre unit vectors (like a trained embedding: a few dominant directions)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)) @ rng.standard_normal((8, dim)) + 0.3 * rng.standard_normal((n, dim)) + 0.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_itq_rotation_is_orthogonal_and_lowers_the_quantization_error(tmp_path: Path) -> None:
    x = _embeddings()
    rotation = fit_itq(x[:2000], iterations=30)
    np.testing.assert_allclose(rotation.rotation @ rotation.rotation.T, np.eye(32), atol=1e-4)
    assert quantization_error(x[2000:], rotation) < 0.9 * quantization_error(x[2000:], None)  # held-out rows
    codes = rotation.codes(x)
    assert codes.shape == (3000, 4) and codes.dtype == np.uint8
    assert not np.array_equal(codes, pack_signs(x))
    save_rotation(tmp_path, rotation, {"method": "itq"})
    loaded = load_rotation(tmp_path)
    assert loaded is not None and np.array_equal(loaded.codes(x), codes)
    assert load_rotation(tmp_path / "nowhere") is None


def test_binarize_cli_writes_the_rotation_the_embedder_uses(tmp_path: Path) -> None:
    from indexer_fixtures import make_inputs

    from model.embedder import Embedder

    shards, checkpoint = make_inputs(tmp_path, 60)
    run = subprocess.run([sys.executable, "-m", "vitrine", "binarize", "--model", str(checkpoint), "--shards",
                          str(shards), "--splits", "train,test,val"], capture_output=True, text=True, cwd=REPO,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout[run.stdout.index("{"):])
    assert report["images"] == 60 and report["quantization_error"]["itq"] < report["quantization_error"]["sign"]
    assert (checkpoint / BINARY_FILE).is_file()
    embedder = Embedder.load(checkpoint)
    vectors = embedder.embed_bytes([(REPO / "data" / "mini-catalog" / "images" / "28625.jpg").read_bytes()])
    assert embedder.binary is not None
    assert np.array_equal(embedder.binary_codes(vectors), embedder.binary.codes(vectors))
    too_few = subprocess.run([sys.executable, "-m", "vitrine", "binarize", "--model", str(checkpoint), "--shards",
                              str(shards), "--splits", "nosuchsplit"], capture_output=True, text=True, cwd=REPO)
    assert too_few.returncode == 2 and "nothing to fit on" in too_few.stderr
