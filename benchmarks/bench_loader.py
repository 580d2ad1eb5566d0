"""Is the data loader what limits training? Loader records/s against the model's training rate.

Measures, in one run on the same machine: (a) the shard loader alone (LMDB read, JPEG decode, seeded
augmentation, collation into batches) with 0, 1 and 2 dataloader workers; (b) the model's training step
(forward, backward, AdamW) on random tensors at the same batch size and input size, fp32 and bf16 autocast.
The loader keeps up when its rate is well above the model's. Medians of repeated timed windows.
`--model` takes the architecture, input size, resize mode and heads from a model card (e.g. the
committed default, a hybrid ViT at 128x96); without it, the earlier pure ViT at `--image-size`.

    python -m benchmarks.bench_loader --shards work/default-model/shards --model model/default
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import peak_rss_mb, write_result  # noqa: E402


def loader_rate(shards: Path, workers: int, batch_size: int, size: tuple[int, int], batches: int,
                repeats: int, resize_mode: str = "stretch") -> dict[str, float]:
    """Records/s of ShardDataset + DataLoader (median over `repeats` windows of `batches` batches)."""
    from torch.utils.data import DataLoader

    from model.data.shards import ShardDataset
    from model.train import IMAGENET_MEAN, IMAGENET_STD
    from model.training_data import Augment, make_targets, scan_label_maps

    label_maps, ids = scan_label_maps(shards, ("articleType", "baseColour"), ("train",))
    dataset = ShardDataset(shards, Augment(size, IMAGENET_MEAN, IMAGENET_STD, resize_mode=resize_mode),
                           make_targets(label_maps, ids))
    rates = []
    for repeat in range(repeats):
        dataset.set_epoch(repeat)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        iterator = iter(loader)
        next(iterator)  # worker start-up and the first shard open are not the steady state
        start, seen = time.perf_counter(), 0
        for images, _ in itertools.islice(iterator, batches):
            seen += len(images)
        rates.append(seen / (time.perf_counter() - start))
        del iterator, loader
    return {"records_per_s": round(statistics.median(rates), 1), "min": round(min(rates), 1),
            "max": round(max(rates), 1)}


def train_step(model: Any, batch_size: int, size: tuple[int, int], bf16: bool,
               device: str = "cpu") -> Callable[[], None]:
    """One timed training step of `model` on a fixed random batch: forward (bf16 autocast when asked), the
    articleType loss, backward and AdamW over the trainable parameters, in training mode and the memory format
    that `vitrine train` uses (channels-last for a conv stem). On CUDA the step ends with a synchronize, so
    that timing it times the GPU's work."""
    import torch

    model.to(device)
    model.train()
    images = torch.randn(batch_size, 3, *size, device=device)
    if model.config.channels_last:  # as model.train runs convolutional trunks (the hybrid's conv stem)
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    labels = torch.randint(0, 40, (batch_size,), device=device)
    cuda = torch.device(device).type == "cuda"

    def step() -> None:
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
        loss = torch.nn.functional.cross_entropy(out["logits/articleType"].float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    return step


def model_rate(batch_size: int, size: tuple[int, int], bf16: bool, steps: int, repeats: int,
               arch: dict[str, Any], device: str = "cpu") -> dict[str, float]:
    """Training images/s of the default architecture on random inputs (forward + backward + AdamW)."""
    from model.networks import ModelConfig, create_model

    model = create_model(ModelConfig(**{"heads": {"articleType": 142, "baseColour": 46}, **arch, "image_size": size}),
                         pretrained_weights=False)  # random weights time the same
    step = train_step(model, batch_size, size, bf16, device)
    step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return {"images_per_s": round(statistics.median(rates), 1), "min": round(min(rates), 1),
            "max": round(max(rates), 1)}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=REPO / "work" / "default-model" / "shards")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", default="64x48", help="HxW")
    p.add_argument("--batches", type=int, default=30, help="batches per timed loader window")
    p.add_argument("--steps", type=int, default=5, help="steps per timed model window")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", type=Path, default=None,
                   help="model folder whose card gives the architecture, input size, resize mode and heads "
                        "(default: the earlier pure ViT, patch 8, width 192, depth 6, at --image-size)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="training-step arithmetic to time, comma-separated (bf16 without native support is "
                        "emulated and slow: leave it out there)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--name", default="loader", help="result file name")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.image_size.split("x"))
    arch: dict[str, Any] = {"patch_size": 8, "width": 192, "depth": 6, "num_heads": 3, "embedding_dim": 256}
    resize_mode = "stretch"
    if args.model is not None:
        from model.checkpoint import card_resize_mode, load_model_card

        card = load_model_card(args.model)
        arch = {k: v for k, v in card["model_config"].items() if k != "image_size"}
        size = tuple(card["model_config"]["image_size"])
        resize_mode = card_resize_mode(card)
    loaders = {w: loader_rate(args.shards, w, args.batch_size, size, args.batches, args.repeats,  # type: ignore[arg-type]
                              resize_mode) for w in (0, 1, 2)}
    precisions = [name.strip() for name in args.precisions.split(",") if name.strip()]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        p.error(f"--precisions takes fp32 and/or bf16, got {args.precisions!r}")
    models = {name: model_rate(args.batch_size, size, name == "bf16", args.steps, args.repeats, arch)  # type: ignore[arg-type]
              for name in precisions}
    fastest_model = max(m["images_per_s"] for m in models.values())
    lines = [f"Batch {args.batch_size}, input {size[0]}x{size[1]} ({resize_mode}), model "
             f"{args.model or 'pure ViT'}, {torch.get_num_threads()} torch threads; medians of {args.repeats} "
             "windows.", "", "| what | rate (images/s) | vs fastest model step |", "|---|---|---|"]
    for workers, r in loaders.items():
        lines.append(f"| loader, {workers} workers | {r['records_per_s']:.0f} | "
                     f"{r['records_per_s'] / fastest_model:.1f}x |")
    for name, r in models.items():
        lines.append(f"| model train step, {name} | {r['images_per_s']:.0f} | "
                     f"{r['images_per_s'] / fastest_model:.2f}x |")
    table = "\n".join(lines)
    write_result(args.name, {"shards": str(args.shards), "batch_size": args.batch_size, "image_size": list(size),
                             "model": str(args.model) if args.model else None, "resize_mode": resize_mode,
                             "arch": arch, "threads": torch.get_num_threads()},
                 {"loader": loaders, "model": models, "peak_rss_mb": round(peak_rss_mb(), 1)}, table, args.out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
