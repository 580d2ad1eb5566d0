"""Is the embed stage bound by the model? Embed-stage throughput against the bare forward rate.

Question: does the indexer's embed stage (LMDB reads, JPEG decoding and preprocessing in DataLoader
workers, forward passes, float16 chunk files) keep the model busy? Target: >= 85% of the bare model's
forward rate at the same batch size.

- bare forward: `Embedder.embed_pixels` (the one forward path of every embedding: memory format and
  precision as the stage runs them) on a preprocessed batch already in memory (median of repeats);
- embed stage: `indexer.embed.embed_chunks` over the real mini-catalog images ingested into LMDB shards,
  model loaded beforehand, all chunks written (images/s of the whole stage).

Model: the demo architecture (ViT, 4 blocks, width 128, patch 8, input 80x64, dim 128) with random
weights, or --model CHECKPOINT; --precision fp32|bf16|auto, and --contiguous to run a convolutional trunk
without channels-last (to measure what that layout buys). Usage: python benchmarks/bench_embed.py
[--batch-size 64] [--workers 2] [--model model/default --precision bf16 --name bench_embed_default_bf16]
On a GPU: --device cuda --batch-size 256 --workers 12 --tile 40 (as benchmarks/gpu_check.sh runs it).
Catalogs of large photos: --photo-size 1200x1600 stores each image upscaled to that size (noise added, JPEG
quality 90; `benchmarks.bench_phone_photos.phone_jpeg`), and --full-decode turns off the reduced-scale JPEG
decoding (`Embedder.decode_size`) to measure what it buys; --max-side 384 ingests them as `vitrine ingest
--max-side 384` does (re-encoded once, at ingest, to the 288x384 the default model decodes anyway), moving the
decoding of the full photo out of the nightly embed stage (the ingest's time per image is reported).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import time_repeated, write_result  # noqa: E402
from indexer.embed_options import FORWARD_PLACES  # noqa: E402
from model.precision import PRECISIONS  # noqa: E402


def make_checkpoint(folder: Path) -> Path:
    from model.checkpoint import save_checkpoint
    from model.networks import ModelConfig, create_model

    card = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "label_maps": {}, "metrics": {}}
    return save_checkpoint(folder / "model", create_model(ModelConfig()), card)


def tiled_rows(rows: list[list[str]], tile: int, images_dir: Path | None = None) -> list[list[str]]:
    """Header + each catalog row `tile` times with ids <id>-<copy>, every copy naming the row's own image file
    (in the mini catalog's images folder, or `images_dir`)."""
    from tests.indexer_fixtures import MINI

    images_dir = images_dir or MINI / "images"
    header, body = rows[0], rows[1:]
    id_at = header.index("id")
    out = [[*header, "image"]]
    for copy in range(tile):
        for row in body:
            out.append([*row[:id_at], f"{row[id_at]}-{copy}" if tile > 1 else row[id_at], *row[id_at + 1:],
                        str(images_dir / f"{row[id_at]}.jpg")])
    return out


def large_photos(size: str, folder: Path, ids: list[str]) -> Path:
    """The mini catalog's photos of products `ids` upscaled to `size` ("WxH") as phone-like JPEGs in `folder`."""
    import numpy as np
    from PIL import Image

    from benchmarks.bench_phone_photos import phone_jpeg
    from tests.indexer_fixtures import MINI

    width, height = (int(v) for v in size.lower().split("x"))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for path in (p for p in (MINI / "images" / f"{i}.jpg" for i in ids) if p.is_file()):
        (folder / path.name).write_bytes(phone_jpeg(Image.open(path), rng, (width, height)))
    return folder


def bare_forward_rate(embedder: object, images: list, batch_size: int, repeats: int) -> dict:
    import numpy as np
    import torch

    batch = torch.from_numpy(np.stack([embedder.preprocess(im) for im in images[:batch_size]]))  # type: ignore[attr-defined]

    def forward() -> None:
        embedder.embed_pixels(batch)  # type: ignore[attr-defined]

    timing = time_repeated(forward, repeats=repeats, warmup=2)
    return {**timing, "images_per_s": batch_size / timing["median_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--images", type=int, default=1007, help="catalog images embedded (mini catalog: 1007)")
    parser.add_argument("--tile", type=int, default=1,
                        help="list each of the --images rows this many times, each copy its own product (a larger "
                             "catalog of the same real photos, e.g. for a GPU, whose rate small catalogs cannot show)")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: random demo architecture)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--repeats", type=int, default=10, help="timed bare forward passes")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="embedding arithmetic")
    parser.add_argument("--contiguous", action="store_true",
                        help="run a convolutional trunk in the contiguous (NCHW) layout instead of channels-last")
    parser.add_argument("--forward", default="auto", choices=FORWARD_PLACES,
                        help="where the stage runs the forward pass (indexer.embed: auto = workers when --workers >= "
                             "the cores)")
    parser.add_argument("--photo-size", default=None, metavar="WxH",
                        help="store every image upscaled to this size (a catalog of large photos), e.g. 1200x1600")
    parser.add_argument("--full-decode", action="store_true",
                        help="decode every JPEG at full size (without Embedder.decode_size's reduced DCT scale)")
    parser.add_argument("--max-side", type=int, default=None, metavar="PIXELS",
                        help="ingest as `vitrine ingest --max-side` does: larger images are re-encoded once at ingest "
                             "to this longest side (the ingest time is reported), and the stage decodes those")
    parser.add_argument("--name", default="bench_embed", help="result file name in benchmarks/results")
    parser.add_argument("--shards", default=None,
                        help="embed these catalog shards (e.g. the full catalog's, as scripts/train_default_model.sh "
                             "ingests them) instead of --images mini-catalog images: on a small set the DataLoader "
                             "workers' start-up (each imports torch) weighs on the stage's rate")
    args = parser.parse_args(argv)

    import torch

    from indexer.embed import EmbedSettings, embed_chunks
    from model.catalog import CatalogConfig
    from model.data import build_shards, iter_shard_records
    from model.embedder import Embedder
    from tests.indexer_fixtures import MINI, catalog_rows, write_catalog_rows

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = Path(args.shards) if args.shards else work / "shards"
        if not args.shards:
            rows = catalog_rows(args.images)
            images_dir = None if args.photo_size is None else large_photos(
                args.photo_size, work / "images", [row[rows[0].index("id")] for row in rows[1:]])
            write_catalog_rows(work / "styles.csv", tiled_rows(rows, args.tile, images_dir))
            ingest_start = time.perf_counter()
            ingest = build_shards(work / "styles.csv", MINI / "images", shards, CatalogConfig(image_column="image"),
                                  progress=False, workers=args.workers, max_side=args.max_side)
            ingest_s = time.perf_counter() - ingest_start
        checkpoint = Path(args.model) if args.model else make_checkpoint(work)
        embedder = Embedder.load(checkpoint, device=args.device, precision=args.precision)
        if args.full_decode:
            embedder.decode_size = lambda region=None: None  # type: ignore[method-assign,assignment,return-value]
        if args.contiguous and embedder.channels_last:
            embedder.channels_last = False
            embedder.model.to(memory_format=torch.contiguous_format)
        records = iter_shard_records(shards)
        images = [embedder.decode(next(records).image_bytes) for _ in range(args.batch_size)]
        records.close()  # closes its LMDB environment: the DataLoader workers open their own
        bare = bare_forward_rate(embedder, images, args.batch_size, args.repeats)
        settings = EmbedSettings(batch_size=args.batch_size, num_workers=args.workers,  # default chunk_rows, as builds
                                 device=args.device, precision=args.precision, forward=args.forward)
        (work / "embed").mkdir()
        start = time.perf_counter()
        stage = embed_chunks(shards, embedder, work / "embed", settings)
        stage_s = time.perf_counter() - start
    stage_rate = stage["embedded_this_run"] / stage_s
    ratio = stage_rate / bare["images_per_s"]
    results = {"bare_forward": bare, "embed_stage": {**stage, "wall_s": stage_s, "images_per_s": stage_rate},
               "ratio": ratio, "target_ratio": 0.85, "meets_target": ratio >= 0.85}
    if not args.shards:  # what ingest (validation, and the re-encode with --max-side) cost, per image
        results["ingest"] = {"wall_s": ingest_s, "records": ingest.records, "workers": args.workers,
                             "ms_per_image": 1000 * ingest_s / max(ingest.records, 1)}
    config = {**vars(args), "model_card": embedder.model_card.get("model_config", embedder.model_card.get("timm_name")),
              "resolved_precision": embedder.precision, "channels_last": embedder.channels_last}
    markdown = "\n".join([
        "| model | images | precision | layout | batch | workers | forward in | bare forward (img/s) "
        "| embed stage (img/s) | ratio | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {args.model or 'demo ViT (random)'} | {stage['records']:,} | {embedder.precision} | "
        f"{'channels-last' if embedder.channels_last else 'contiguous'} | {args.batch_size} | {args.workers} | "
        f"{stage['forward']} | "
        f"{bare['images_per_s']:.1f} | {stage_rate:.1f} | {ratio:.2f} | 0.85 |",
    ])
    path = write_result(args.name, config, results, markdown)
    print(markdown)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
