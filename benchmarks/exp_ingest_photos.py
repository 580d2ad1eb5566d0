"""Experiment: ingest of 12-megapixel phone JPEGs, reduced-scale decoding (now) against full decoding (before).

`model.data.ingest.prepare_image` on 40 phone-like JPEGs (`benchmarks.bench_phone_photos.phone_jpeg` of
mini-catalog photos), with `--max-side 512` and without (validation only), the two decodings alternating per
photo; medians printed. Quoted in benchmarks/RESULTS.md ("Ingest and training"); not part of the default path.

    python benchmarks/exp_ingest_photos.py
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    from PIL import Image

    import model.data.ingest as ingest
    from benchmarks.bench_phone_photos import phone_jpeg

    rng = np.random.default_rng(1)
    folder = Path(tempfile.mkdtemp())
    files = []
    for path in sorted((REPO / "data" / "mini-catalog" / "images").glob("*.jpg"))[:40]:
        (folder / path.name).write_bytes(phone_jpeg(Image.open(path), rng))
        files.append(str(folder / path.name))
    reduced_decode = ingest.decode_image

    def full_decode(data: bytes, **kwargs: object) -> Image.Image:
        kwargs.pop("min_size", None)
        return reduced_decode(data, **kwargs)  # type: ignore[arg-type]

    for max_side in (512, None):
        seconds: dict[str, list[float]] = {"reduced": [], "full": []}
        for number, path in enumerate(files):
            for how in ("reduced", "full") if number % 2 == 0 else ("full", "reduced"):
                ingest.decode_image = reduced_decode if how == "reduced" else full_decode  # type: ignore[assignment]
                start = time.perf_counter()
                data, error = ingest.prepare_image(path, max_side)
                seconds[how].append(time.perf_counter() - start)
                assert not error and data is not None
                if max_side is not None:
                    assert Image.open(io.BytesIO(data)).size == (384, 512)
        ingest.decode_image = reduced_decode
        for how, values in seconds.items():
            print(f"max_side {max_side}: {how} decoding, median {statistics.median(values) * 1e3:.0f} ms/photo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
