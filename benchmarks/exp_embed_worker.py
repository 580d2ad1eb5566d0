"""Experiment: where does one embed-stage worker's time go, and what do two of them reach side by side?

Runs the loop a DataLoader worker of `indexer.embed` runs with `--forward workers` (one torch thread: read the
record from LMDB, decode, preprocess, collate, embed a batch of 64 in bf16), in this process, over the first
2,560 records of a shards folder (the first 3 batches warm up and are not timed), and prints the milliseconds
per image of each part. `--processes 2` starts two such loops at once (as the stage's two workers on two cores)
and prints each one's images/s. Quoted in benchmarks/RESULTS.md ("On a CPU with AMX"); not part of the default
path.

    python benchmarks/exp_embed_worker.py --shards work/default-model-s12/shards [--processes 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCH = 64
BATCHES = 40
WARM = 3


def worker_loop(shards: str, precision: str) -> str:
    """The worker's loop, timed by part; returns one line of results."""
    import numpy as np
    import torch

    torch.set_num_threads(1)  # as a DataLoader worker
    from indexer.embed import RecordImages, collate
    from model.checkpoint import default_model_path
    from model.data.shards import load_shards_manifest
    from model.embedder import Embedder

    embedder = Embedder.load(default_model_path(), precision=precision)
    dataset = RecordImages(Path(shards), load_shards_manifest(shards)["shards"], embedder.preprocess_uint8,
                           embedder.decode_size())
    batches = [list(range(i, i + BATCH)) for i in range(0, BATCH * BATCHES, BATCH)]
    items_s = collate_s = forward_s = 0.0
    for number, batch in enumerate(batches):
        start = time.perf_counter()
        items = [dataset[i] for i in batch]
        read = time.perf_counter()
        collated = collate(items)
        stacked = time.perf_counter()
        embedder.embed_pixels(collated["pixels"]).astype(np.float16)
        done = time.perf_counter()
        if number >= WARM:
            items_s += read - start
            collate_s += stacked - read
            forward_s += done - stacked
    n = BATCH * (BATCHES - WARM)
    return (f"read + decode + preprocess {items_s / n * 1e3:.3f} ms/image, collate {collate_s / n * 1e3:.3f}, "
            f"forward ({precision}, 1 thread) {forward_s / n * 1e3:.3f}: {n / (items_s + collate_s + forward_s):.1f} "
            "images/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="an ingest's shards folder (at least 2,560 records)")
    parser.add_argument("--processes", type=int, default=1, help="worker loops run at the same time")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        for number, line in enumerate(pool.starmap(worker_loop, [(args.shards, args.precision)] * args.processes)):
            print(f"loop {number + 1} of {args.processes}: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
