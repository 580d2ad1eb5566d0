"""What do glibc's malloc thresholds (`model.runtime.tune_malloc`) buy torch on the CPU?

Question: with glibc's defaults every activation buffer above its mmap threshold is mapped, zero-filled
by the kernel and unmapped on each pass; with vitrine's thresholds freed buffers stay in the process and
are reused. How much faster are the default model's inference and training step, and at what memory?

Method: each measurement runs in a fresh Python process (the setting is process-wide and inherited), with
``VITRINE_MALLOC=0`` (glibc's defaults: the baseline) or unset (vitrine's thresholds), alternating the two
in ``--rounds`` rounds so that drift of the machine hits both alike. Per process: the model's batch forward
(``Embedder.embed_pixels``, fp32 and bf16) or its training step (``benchmarks.bench_loader.train_step``:
forward + backward + AdamW, bf16 autocast), ``--windows`` timed windows after a warm-up; reported: the
median images/s over all windows of all rounds, user and system CPU seconds per image, and peak RSS.
Usage: python benchmarks/bench_malloc.py [--model model/default] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import write_result  # noqa: E402

WORKLOADS = ("forward-fp32", "forward-bf16", "train-bf16")

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
workload, model, batch, steps, windows = {workload!r}, {model!r}, {batch}, {steps}, {windows}
import torch
from model.runtime import tune_malloc
applied = tune_malloc()
if workload.startswith("forward"):
    from model.embedder import Embedder
    embedder = Embedder.load(model, precision=workload.split("-")[1])
    h, w = embedder.input_size
    pixels = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8)
    def step():
        embedder.embed_pixels(pixels)
else:
    from benchmarks.bench_loader import train_step
    from model.checkpoint import load_checkpoint
    net, card = load_checkpoint(model)
    net.train()
    if net.config.channels_last:  # as model.train runs it
        net = net.to(memory_format=torch.channels_last)
    step = train_step(net, batch, tuple(net.config.image_size), bf16=True)
for _ in range(2):
    step()
rates = []
cpu0 = os.times()
for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    rates.append(steps * batch / (time.perf_counter() - start))
cpu1 = os.times()
images = windows * steps * batch
print(json.dumps({{"applied": applied, "rates": rates, "user_ms_per_image": 1e3 * (cpu1.user - cpu0.user) / images,
                  "sys_ms_per_image": 1e3 * (cpu1.system - cpu0.system) / images,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(workload: str, tuned: bool, args: argparse.Namespace) -> dict:
    batch, steps = (args.batch_size, 5) if workload.startswith("forward") else (args.train_batch_size, 2)
    code = CHILD.format(repo=str(REPO), workload=workload, model=str(args.model), batch=batch, steps=steps,
                        windows=args.windows)
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    env.pop("VITRINE_MALLOC", None)
    if not tuned:
        env["VITRINE_MALLOC"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{workload} ({'tuned' if tuned else 'glibc defaults'}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "model" / "default"), help="checkpoint folder")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (baseline, tuned) per workload")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per process")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--train-batch-size", type=int, default=128, help="images per training step")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--name", default="bench_malloc", help="result file name in benchmarks/results")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}: choose from {', '.join(WORKLOADS)}")

    runs: dict[str, dict[str, list[dict]]] = {w: {"baseline": [], "tuned": []} for w in workloads}
    for workload in workloads:
        for round_ in range(args.rounds):
            for tuned in (False, True):
                result = measure(workload, tuned, args)
                runs[workload]["tuned" if tuned else "baseline"].append(result)
                print(f"{workload} round {round_ + 1} {'tuned   ' if tuned else 'baseline'}: "
                      f"{statistics.median(result['rates']):.1f} images/s, sys {result['sys_ms_per_image']:.2f} "
                      f"ms/image", flush=True)

    summary: dict[str, dict] = {}
    lines = ["| workload | glibc defaults (images/s) | tuned (images/s) | speed-up | user + sys CPU ms/image, "
             "defaults | tuned | peak RSS MiB, defaults | tuned |", "|---|---|---|---|---|---|---|---|"]
    for workload, pair in runs.items():
        row = {}
        for arm, results in pair.items():
            row[arm] = {
                "images_per_s": statistics.median([r for res in results for r in res["rates"]]),
                "user_ms_per_image": statistics.median([res["user_ms_per_image"] for res in results]),
                "sys_ms_per_image": statistics.median([res["sys_ms_per_image"] for res in results]),
                "peak_rss_mib": max(res["peak_rss_mib"] for res in results),
                "applied": results[0]["applied"],
            }
        row["speedup"] = row["tuned"]["images_per_s"] / row["baseline"]["images_per_s"]
        summary[workload] = row
        b, t = row["baseline"], row["tuned"]
        lines.append(f"| {workload} | {b['images_per_s']:.1f} | {t['images_per_s']:.1f} | **{row['speedup']:.2f}x** | "
                     f"{b['user_ms_per_image']:.2f} + {b['sys_ms_per_image']:.2f} | {t['user_ms_per_image']:.2f} + "
                     f"{t['sys_ms_per_image']:.2f} | {b['peak_rss_mib']:.0f} | {t['peak_rss_mib']:.0f} |")
    markdown = "\n".join(lines)
    path = write_result(args.name, vars(args), {"summary": summary, "runs": runs}, markdown)
    print(markdown)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
