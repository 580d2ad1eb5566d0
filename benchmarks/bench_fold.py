"""Batch norms folded into convolutions (`model.networks.fold_batchnorm`): what it saves, and that it changes nothing.

An eval-mode batch norm is a fixed per-channel affine map, so the convolution before it can absorb it. vitrine
folds every such pair in each Embedder (inference: the index build's embed stage, the server's queries) and,
while training, in the frozen part of the hybrid ViT's conv stem. This benchmark times, in one process and
alternating the two variants repeat by repeat (so that drift on a shared machine hits both alike):

- inference: the model's forward (`embed`, eval mode, channels-last, fp32) on a batch of real catalog images,
  unfolded against folded, for the default model and the frozen ImageNet EfficientNet-Lite0 baseline;
- training: one step of `benchmarks.bench_loader.train_step` (the default architecture, fp32, channels-last,
  batch 128) with the frozen stem as before (batch norms unfolded, the batch in one pass), folded, and folded
  in the passes of `model.networks.lite0_passes` (what `vitrine train` runs);

and measures the embeddings' difference (max |a - b|, min cosine) over real images. Medians of --repeats.

    python -m benchmarks.bench_fold [--model model/default] [--images 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import peak_rss_mb, write_result  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "fashion-product-images-small" / "images"
MINI = REPO / "data" / "mini-catalog" / "images"


def real_batch(embedder: Any, count: int) -> Any:
    """`count` real catalog photos preprocessed as the Embedder does (the dataset's, else the mini catalog's)."""
    import torch

    folder = DATA if DATA.is_dir() else MINI
    paths = sorted(folder.glob("*.jpg"))[:count]
    pixels = np.stack([embedder.preprocess(embedder.decode(p.read_bytes())) for p in paths])
    return torch.from_numpy(pixels).contiguous(memory_format=torch.channels_last)


def alternate(variants: dict[str, Any], repeats: int) -> dict[str, dict[str, float]]:
    """Median / min / max seconds of each zero-argument callable, run in turn `repeats` times after one warm-up."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for name, t in times.items()}


def inference(folder: Path | None, images: int, batch: int, repeats: int) -> dict[str, Any]:
    """Forward rate of one checkpoint unfolded vs folded (None: the frozen CNN baseline), and the difference."""
    import torch

    from model.baselines import save_frozen_cnn
    from model.checkpoint import load_checkpoint
    from model.embedder import Embedder
    from model.networks import LITE0_TIMM_NAME, lite0_passes

    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return inference(save_frozen_cnn(Path(tmp) / "frozen-cnn"), images, batch, repeats)
    embedder = Embedder.load(folder, precision="fp32")  # folded
    unfolded, _ = load_checkpoint(folder)
    unfolded = unfolded.eval().to(memory_format=torch.channels_last)
    x = real_batch(embedder, images)
    with torch.inference_mode():
        a = torch.cat([unfolded.embed(x[i:i + batch]) for i in range(0, len(x), batch)])
        b = torch.cat([embedder.model.embed(x[i:i + batch]) for i in range(0, len(x), batch)])
        one = x[:batch]
        timed = alternate({"unfolded": lambda: unfolded.embed(one), "folded": lambda: embedder.model.embed(one),
                           "embedder": lambda: embedder.embed_pixels(one)}, repeats)
    cosine = torch.nn.functional.cosine_similarity(a, b)
    rates = {name: batch / t["median_s"] for name, t in timed.items()}
    passes = lite0_passes(one) if embedder.model.config.timm_name == LITE0_TIMM_NAME else 1
    return {"model": str(folder), "batch": batch, "folded_batchnorms": embedder.folded_batchnorms,
            "passes": passes, "images_per_s": {k: round(v, 1) for k, v in rates.items()},
            "speedup": round(rates["folded"] / rates["unfolded"], 3),
            "speedup_embedder": round(rates["embedder"] / rates["unfolded"], 3), "times": timed,
            "max_abs_diff": float((a - b).abs().max()), "min_cosine": float(cosine.min()), "images": len(x)}


def training(folder: Path, batch: int, repeats: int) -> dict[str, Any]:
    """The default architecture's fp32 training step: the frozen stem as before (unfolded, one pass), folded, and
    folded in the passes of `lite0_passes` (vitrine's training)."""
    from benchmarks.bench_loader import train_step
    from model import networks
    from model.checkpoint import load_model_card
    from model.networks import Lite0Stem, ModelConfig, create_model

    config = ModelConfig.from_json(load_model_card(folder)["model_config"])
    size = tuple(config.image_size)
    model = create_model(config)  # the ImageNet stem weights: its batch norms are the real ones
    stems = [m for m in model.modules() if isinstance(m, Lite0Stem)]
    if not stems or stems[0].frozen_blocks < 0:
        return {"skipped": "the model has no frozen conv stem"}
    stem = stems[0]
    step = train_step(model, batch, size, bf16=False)  # type: ignore[arg-type]
    import torch

    passes = networks.lite0_passes(torch.empty(batch, 3, *size))

    chunk_bytes = networks.ACTIVATION_CHUNK_BYTES

    def run(fold: bool, chunked: bool) -> None:
        stem.fold_frozen = fold
        networks.ACTIVATION_CHUNK_BYTES = chunk_bytes if chunked else 1 << 62  # one pass
        step()

    try:
        timed = alternate({"unfolded": lambda: run(False, False), "folded": lambda: run(True, False),
                           "folded_chunked": lambda: run(True, True)}, repeats)
    finally:
        networks.ACTIVATION_CHUNK_BYTES = chunk_bytes
    rates = {name: batch / t["median_s"] for name, t in timed.items()}
    return {"batch": batch, "image_size": list(size), "frozen_passes": passes,
            "images_per_s": {k: round(v, 1) for k, v in rates.items()},
            "speedup": round(rates["folded"] / rates["unfolded"], 3),
            "speedup_chunked": round(rates["folded_chunked"] / rates["unfolded"], 3), "times": timed}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "model" / "default")
    p.add_argument("--images", type=int, default=256, help="real images whose embeddings are compared")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch")
    p.add_argument("--train-batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--name", default="fold")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    results = {"inference_default": inference(args.model, args.images, args.batch_size, args.repeats),
               "inference_frozen_cnn": inference(None, args.images, args.batch_size, args.repeats),
               "training_default": training(args.model, args.train_batch_size, max(3, args.repeats // 2)),
               "peak_rss_mb": round(peak_rss_mb(), 1)}
    lines = [f"{torch.get_num_threads()} torch threads, fp32, channels-last; medians of {args.repeats} alternating "
             "repeats (training: of " f"{max(3, args.repeats // 2)}). Images/s; *now* is what vitrine runs: the "
             "Embedder's `embed_pixels` (inference) and `vitrine train`'s step (training).", "",
             "| what | before: unfolded, one pass | folded, one pass | now: folded, in passes | now / before | "
             "max abs diff / min cosine |", "|---|---|---|---|---|---|"]
    for key, label, now in (
            ("inference_default", f"default model forward, batch {args.batch_size}", "embedder"),
            ("inference_frozen_cnn", f"frozen EfficientNet-Lite0 forward, batch {args.batch_size}", "embedder"),
            ("training_default", f"default architecture training step, batch {args.train_batch_size}",
             "folded_chunked")):
        r = results[key]
        if "skipped" in r:
            lines.append(f"| {label} | | | | | {r['skipped']} |")
            continue
        rates = r["images_per_s"]
        passes = r.get("passes", r.get("frozen_passes"))
        diff = (f"{r['max_abs_diff']:.1e} / {r['min_cosine']:.7f} ({r['images']} images, "
                f"{r['folded_batchnorms']} batch norms)" if "max_abs_diff" in r else "")
        lines.append(f"| {label} | {rates['unfolded']:.1f} | {rates['folded']:.1f} | {rates[now]:.1f} ({passes} "
                     f"pass{'es' if passes != 1 else ''}) | {rates[now] / rates['unfolded']:.2f}x | {diff} |")
    table = "\n".join(lines)
    write_result(args.name, {**{k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads()},
                 results, table, args.out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
