"""Experiment: how far below the model's input may a JPEG's reduced-scale decode go? (DECODE_MARGIN)

Each of 12 mini-catalog photos is upscaled (bicubic, Gaussian noise sigma 4, JPEG quality 90) so that libjpeg's
1/8 scale lands at 2, 2.5, 3 or 4 times the default model's 96x128 input; the default model embeds the 1/8-scale
decode and the full decode, and the cosine of the two embeddings is printed (min, median). Quoted in
benchmarks/RESULTS.md ("Why three times"); not part of the default path.

    python benchmarks/exp_decode_margin.py
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    from PIL import Image

    from model.checkpoint import default_model_path
    from model.embedder import Embedder
    from model.images import decode_image

    embedder = Embedder.load(default_model_path(), precision="fp32")
    rng = np.random.default_rng(0)
    paths = sorted((REPO / "data" / "mini-catalog" / "images").glob("*.jpg"))[:12]
    for ratio in (2, 2.5, 3, 4):
        width, height = int(96 * ratio * 8), int(128 * ratio * 8)
        cosines = []
        for path in paths:
            photo = Image.open(path).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
            noisy = np.asarray(photo, dtype=np.int16) + rng.normal(0, 4, (height, width, 3)).astype(np.int16)
            buffer = io.BytesIO()
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
            reduced = decode_image(buffer.getvalue(), min_size=(1, 1))
            assert reduced.size == (width // 8, height // 8)
            a = embedder.embed_images([reduced])[0]
            b = embedder.embed_images([decode_image(buffer.getvalue())])[0]
            cosines.append(float(a @ b))
        print(f"1/8 scale at {ratio}x the input ({width}x{height}): cosine min {min(cosines):.4f} "
              f"median {np.median(cosines):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
