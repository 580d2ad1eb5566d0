#!/usr/bin/env bash
# GPU check of vitrine (run on a machine with a CUDA GPU, from anywhere; results in benchmarks/results/gpu_*):
#   1. tests/test_cuda.py: embedding, index build, training (plain and torchrun/NCCL) and serving on CUDA give the
#      CPU's results to bf16 rounding (these tests skip on machines without a GPU, so CI never runs them);
#   2. bare forward throughput on CUDA, bf16 autocast: the default model and two synthetic ViTs, by batch size;
#   3. the indexer's embed stage on CUDA with the default model (bench_embed: LMDB reads, JPEG decoding in
#      DataLoader workers, forward, float16 chunks) against the bare forward at the same batch size; and on a
#      catalog of large photos (1200x1600 JPEGs), decoded at the model's scale against in full;
#   4. the training step on CUDA (default architecture, forward + backward + AdamW), fp32 against bf16 autocast;
#   5. when Faiss with GPU support is importable: a 1M-vector (dim 256) IVF-PQ build on GPU against the CPU.
# The lent GPU machine of our workplace has torch and timm but no Faiss GPU build (the faiss-gpu wheel and its
# CUDA 12 libraries are larger than what can be carried there): step 5 then says so, and the script still exits
# 0 unless a test of step 1 or a benchmark failed.
# Usage: benchmarks/gpu_check.sh [python]   (default: python3; the Python needs vitrine's dependencies)
set -u
PY=${1:-python3}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p benchmarks/results
status=0
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
echo "$(nproc) CPU cores"
"$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}')"
# one check for the whole script: steps 2-4 measure CUDA and say so when there is none
CUDA=$("$PY" -c "import torch; print(1 if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)

echo "== 1. CUDA tests (tests/test_cuda.py)"
"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py || status=1

echo "== 2. bare forward throughput (bf16 autocast, inference_mode)"
if [ "$CUDA" != 1 ]; then echo "no CUDA GPU visible: the forward pass on CUDA was NOT measured"
else "$PY" - <<'PYEOF' || status=1
import json, time
import torch
results = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
import timm
from model.checkpoint import default_model_path
from model.embedder import Embedder
default = Embedder.load(default_model_path(), device="cuda", precision="bf16")
models = {"default model (hybrid ViT, 128x96)": (default.model, tuple(default.model.config.image_size)),
          "demo ViT (4 blocks, width 128, 80x64)": (timm.create_model(
              "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=(80, 64), patch_size=8,
              embed_dim=128, depth=4, num_heads=4).cuda().eval(), (80, 64)),
          "ViT-B/16 224": (timm.create_model("vit_base_patch16_224", pretrained=False,
                                             num_classes=0).cuda().eval(), (224, 224))}
results["embedding"] = []
for name, (model, size) in models.items():
    for batch in (64, 256, 1024):
        x = torch.randn(batch, 3, *size, device="cuda")
        if name.startswith("default"):
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                model(x)
            torch.cuda.synchronize()
            rates = []
            for _ in range(5):
                start, reps = time.perf_counter(), 10
                for _ in range(reps):
                    out = model(x)
                    out = out["embedding"] if isinstance(out, dict) else out
                    torch.nn.functional.normalize(out.float(), dim=1).cpu()
                rates.append(batch * reps / (time.perf_counter() - start))
        rate = sorted(rates)[len(rates) // 2]
        print(f"{name:40s} batch {batch:5d}: {rate:10.0f} images/s (median of 5)")
        results["embedding"].append({"model": name, "batch": batch, "images_per_s": rate})
with open("benchmarks/results/gpu_check.json", "w") as f:
    json.dump(results, f, indent=2)
PYEOF
fi

echo "== 3. embed stage on CUDA, default model (bench_embed)"
if [ "$CUDA" != 1 ]; then
    echo "no CUDA GPU visible: the embed stage on CUDA was NOT measured"
else for batch in 256 1024; do
    "$PY" benchmarks/bench_embed.py --device cuda --model model/default --precision bf16 --batch-size $batch \
        --workers "$(( $(nproc) > 12 ? 12 : $(nproc) ))" --tile 40 --name "gpu_embed_default_b$batch" || status=1
done
# a catalog of large product photos (1200x1600 JPEGs): JPEG decoding at the model's scale against in full
for decode in reduced full; do
    "$PY" benchmarks/bench_embed.py --device cuda --model model/default --precision bf16 --batch-size 256 \
        --workers "$(( $(nproc) > 12 ? 12 : $(nproc) ))" --images 1000 --tile 4 --photo-size 1200x1600 \
        $([ $decode = full ] && echo --full-decode) --name "gpu_embed_photos_$decode" || status=1
done; fi

echo "== 4. training step on CUDA (default architecture, random inputs)"
if [ "$CUDA" != 1 ]; then echo "no CUDA GPU visible: the training step on CUDA was NOT measured"
else "$PY" - <<'PYEOF' || status=1
import json
import torch
from benchmarks.bench_loader import model_rate
from benchmarks.common import write_result
from model.checkpoint import default_model_path, load_model_card
card = load_model_card(default_model_path())
arch = {k: v for k, v in card["model_config"].items() if k != "image_size"}
size = tuple(card["model_config"]["image_size"])
rows, lines = [], ["| batch | fp32 (img/s) | bf16 autocast (img/s) | bf16 / fp32 |", "|---|---|---|---|"]
for batch in (128, 512):
    r = {p: model_rate(batch, size, p == "bf16", steps=10, repeats=3, arch=arch, device="cuda")
         for p in ("fp32", "bf16")}
    rows.append({"batch": batch, **r})
    lines.append(f"| {batch} | {r['fp32']['images_per_s']:.0f} | {r['bf16']['images_per_s']:.0f} | "
                 f"{r['bf16']['images_per_s'] / r['fp32']['images_per_s']:.2f} |")
print("\n".join(lines))
write_result("gpu_train_step", {"arch": arch, "image_size": list(size), "gpu": torch.cuda.get_device_name(0)},
             {"rows": rows}, "\n".join(lines))
PYEOF
fi

echo "== 5. Faiss GPU build (1M x 256)"
"$PY" - <<'PYEOF' || status=1
import json, time
try:
    import faiss
except ImportError:
    faiss = None
    print("faiss is not installed on this machine: the GPU-vs-CPU index build was NOT measured")
    outcome = "not installed"
if faiss is not None:
    import numpy as np
    from indexer.fill import faiss_gpu_count, fill_shard, train_index
    from indexer.plan import plan_index
    if faiss_gpu_count() == 0:
        print(f"faiss {faiss.__version__} has no GPU support or sees no GPU: the GPU-vs-CPU index build was NOT "
              "measured (install faiss-gpu and rerun this script to measure it)")
        outcome = f"faiss {faiss.__version__} without GPU support"
    else:
        rng = np.random.default_rng(0)
        centers = rng.standard_normal((10_000, 256)).astype(np.float32)
        xb = centers[rng.integers(10_000, size=1_000_000)] + 0.5 * rng.standard_normal((1_000_000, 256), dtype=np.float32)
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        xb16 = xb.astype(np.float16)
        plan = plan_index(len(xb), 256)
        outcome = {"factory": plan.factory}
        for device, use_gpu in (("gpu", True), ("cpu", False)):
            start = time.perf_counter()
            trained = train_index(xb16, plan, use_gpu=use_gpu)
            trained_s = time.perf_counter() - start
            fill_shard(trained, xb16, np.arange(len(xb), dtype=np.int64), use_gpu=use_gpu)
            total = time.perf_counter() - start
            print(f"{plan.factory} {device}: train {trained_s:.1f} s, train+add {total:.1f} s")
            outcome[device] = {"train_s": trained_s, "total_s": total}
try:
    results = json.load(open("benchmarks/results/gpu_check.json"))
except (OSError, ValueError):
    results = {}
results["faiss"] = outcome
with open("benchmarks/results/gpu_check.json", "w") as f:
    json.dump(results, f, indent=2)
print("written benchmarks/results/gpu_check.json")
PYEOF
echo "== gpu_check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
