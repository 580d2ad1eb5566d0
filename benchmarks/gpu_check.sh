#!/usr/bin/env bash
# GPU check of the indexer (run on a machine with a CUDA GPU, from the repository root):
#   1. embedding throughput on CUDA with bf16 autocast (bare forward and the embed stage's forward path),
#   2. when faiss with GPU support is importable: a 1M-vector (dim 256) IVF-PQ build on GPU against the CPU.
# The lent GPU machine has torch and timm but no Faiss: step 2 then says so and the script still exits 0.
# Usage: benchmarks/gpu_check.sh [python]   (default: python3). Output: plain text + results/gpu_check.json
set -u
PY=${1:-python3}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p benchmarks/results
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PY" - <<'PYEOF'
import json, time
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
results = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
if not torch.cuda.is_available():
    print("no CUDA GPU visible: nothing to measure here")
else:
    import timm
    print("== embedding throughput (bf16 autocast, inference_mode)")
    models = {"demo ViT (4 blocks, width 128, 80x64)": dict(model_name="vit_tiny_patch16_224", pretrained=False,
                                                           num_classes=0, img_size=(80, 64), patch_size=8,
                                                           embed_dim=128, depth=4, num_heads=4),
              "ViT-B/16 224": dict(model_name="vit_base_patch16_224", pretrained=False, num_classes=0)}
    results["embedding"] = []
    for name, kwargs in models.items():
        model = timm.create_model(**kwargs).cuda().eval()
        size = kwargs.get("img_size", (224, 224))
        for batch in (64, 256):
            x = torch.randn(batch, 3, *size, device="cuda")
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(3):
                    model(x)
                torch.cuda.synchronize()
                start, reps = time.perf_counter(), 20
                for _ in range(reps):
                    torch.nn.functional.normalize(model(x).float(), dim=1).cpu()
                torch.cuda.synchronize()
            rate = batch * reps / (time.perf_counter() - start)
            print(f"{name:40s} batch {batch:4d}: {rate:10.0f} images/s")
            results["embedding"].append({"model": name, "batch": batch, "images_per_s": rate})
print("== Faiss GPU build (1M x 256)")
try:
    import faiss
except ImportError:
    print("faiss is not installed on this machine: the GPU-vs-CPU index build was NOT measured "
          "(install faiss-gpu and rerun this script to measure it)")
    results["faiss"] = "not installed"
else:
    import numpy as np
    from indexer.fill import faiss_gpu_count, fill_shard, train_index
    from indexer.plan import plan_index
    if faiss_gpu_count() == 0:
        print(f"faiss {faiss.__version__} has no GPU support or sees no GPU: only the CPU path exists here")
        results["faiss"] = "no GPU support"
    else:
        rng = np.random.default_rng(0)
        centers = rng.standard_normal((10_000, 256)).astype(np.float32)
        xb = centers[rng.integers(10_000, size=1_000_000)] + 0.5 * rng.standard_normal((1_000_000, 256), dtype=np.float32)
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        xb16 = xb.astype(np.float16)
        plan = plan_index(len(xb), 256)
        results["faiss"] = {"factory": plan.factory}
        for device, use_gpu in (("gpu", True), ("cpu", False)):
            start = time.perf_counter()
            trained = train_index(xb16, plan, use_gpu=use_gpu)
            trained_s = time.perf_counter() - start
            fill_shard(trained, xb16, np.arange(len(xb), dtype=np.int64), use_gpu=use_gpu)
            total = time.perf_counter() - start
            print(f"{plan.factory} {device}: train {trained_s:.1f} s, train+add {total:.1f} s")
            results["faiss"][device] = {"train_s": trained_s, "total_s": total}
with open("benchmarks/results/gpu_check.json", "w") as f:
    json.dump(results, f, indent=2)
print("written benchmarks/results/gpu_check.json")
PYEOF
