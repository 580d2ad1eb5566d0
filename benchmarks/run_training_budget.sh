#!/usr/bin/env bash
# The side-by-side of issue 3 at one training budget (about 12-13 minutes of one CPU core per model):
#   frozen ImageNet CNN | fine-tuned CNN | ViT from scratch | ViT + weak-label pretraining | + distillation,
#   for the pure ViT and for the hybrid ViT of the default model
# then the relevance harness over all of them. Every step is skipped when its output exists (resumable).
# Usage: benchmarks/run_training_budget.sh [WORK_DIR]  (needs the shards + weak labels of
#        scripts/train_default_model.sh in work/default-model, and ../shared/datasets)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-work/budget}
BASE=${BASE:-work/default-model}
V=${VITRINE:-.venv/bin/vitrine}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK"
TASKS=articleType,baseColour,gender,usage,season,masterCategory,subCategory
VIT=(--image-size 64x48 --patch-size 8 --width 192 --depth 6 --heads 3 --embedding-dim 256 --batch-size 128
     --lr 1e-3 --precision auto --checkpoint-every 100)
S=(--shards "$BASE/shards")
# the teacher: linear probes on the frozen CNN's features. The relevance harness embeds the whole catalog with
# the frozen CNN first (its cache), and the teacher reuses those vectors instead of embedding everything again.
[ -f work/relevance-cache/features.npz ] || $PY - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, ".")
import numpy as np
from benchmarks.bench_relevance import DEFAULT_CATALOG, FROZEN_CNN, embed_gallery, load_gallery, _embedder
from model.catalog import CatalogConfig
cache = Path("work/relevance-cache")
gallery = load_gallery(DEFAULT_CATALOG / "styles.csv", DEFAULT_CATALOG / "images",
                       CatalogConfig(split_column=None, split_file="splits.csv"), "articleType", ["baseColour"], "test")
vectors = embed_gallery("frozen-cnn", FROZEN_CNN, gallery, cache)
np.savez(cache / "features.npz", ids=np.array(gallery.ids), vectors=vectors,
         fingerprint=np.array(_embedder(FROZEN_CNN, cache).fingerprint))
PY
[ -f "$WORK/teacher.npz" ] || $V teacher "${S[@]}" --out "$WORK/teacher.npz" --work-dir work/relevance-cache
# ViT from scratch: 2 epochs of multi-task training
[ -f "$WORK/vit-scratch/model_card.json" ] || $V train "${S[@]}" --tasks $TASKS --epochs 2 "${VIT[@]}" \
    --out "$WORK/vit-scratch"
# ViT with weak-label pretraining: 1 epoch pretrain + 1 epoch multi-task fine-tune
[ -f "$WORK/vit-pretrain/model_card.json" ] || $V train --stage pretrain "${S[@]}" \
    --weak-labels "$BASE/weak_labels.json" --epochs 1 "${VIT[@]}" --out "$WORK/vit-pretrain"
[ -f "$WORK/vit-weak/model_card.json" ] || $V train "${S[@]}" --init-from "$WORK/vit-pretrain" --tasks $TASKS \
    --epochs 1 "${VIT[@]}" --out "$WORK/vit-weak"
# ... and with distillation from the CNN teacher in the fine-tune
[ -f "$WORK/vit-weak-distill/model_card.json" ] || $V train "${S[@]}" --init-from "$WORK/vit-pretrain" \
    --tasks $TASKS --epochs 1 "${VIT[@]}" --distill-from "$WORK/teacher.npz" --out "$WORK/vit-weak-distill"
# fine-tuned CNN, same recipe, same wall-clock: it is ~3.5x slower per image, so it sees 2 x 11,000 images
[ -f "$WORK/cnn-finetuned/model_card.json" ] || $V train "${S[@]}" --backbone efficientnet_lite0 \
    --image-size 128x96 --embedding-dim 256 --batch-size 64 --lr 1e-3 --precision auto --checkpoint-every 100 \
    --tasks $TASKS --epochs 2 --max-records 11000 --out "$WORK/cnn-finetuned"
# the hybrid ViT of the default model (EfficientNet-Lite0's ImageNet stem as patch embedding, 128x96), same
# budget: ~40 images/s on one core, so one pass over the 37,818 training records; with weak-label pretraining
# that pass is split in half (18,900 records pretrain + the same 18,900 fine-tune)
HYB=(--backbone vit-hybrid --stem-blocks 5 --stem-frozen-blocks 3 --image-size 128x96 --width 192 --depth 6 --heads 3
     --embedding-dim 256 --batch-size 128 --lr 1e-3 --precision auto --checkpoint-every 100)
[ -f "$WORK/hybrid-scratch/model_card.json" ] || $V train "${S[@]}" --tasks $TASKS --epochs 1 "${HYB[@]}" \
    --out "$WORK/hybrid-scratch"
[ -f "$WORK/hybrid-pretrain/model_card.json" ] || $V train --stage pretrain "${S[@]}" \
    --weak-labels "$BASE/weak_labels.json" --epochs 1 --max-records 18900 "${HYB[@]}" --out "$WORK/hybrid-pretrain"
[ -f "$WORK/hybrid-weak/model_card.json" ] || $V train "${S[@]}" --init-from "$WORK/hybrid-pretrain" --tasks $TASKS \
    --epochs 1 --max-records 18900 "${HYB[@]}" --out "$WORK/hybrid-weak"
# ... and with distillation from the CNN teacher in its fine-tune (same pretrain, same records)
[ -f "$WORK/hybrid-weak-distill/model_card.json" ] || $V train "${S[@]}" --init-from "$WORK/hybrid-pretrain" \
    --tasks $TASKS --epochs 1 --max-records 18900 "${HYB[@]}" --distill-from "$WORK/teacher.npz" \
    --out "$WORK/hybrid-weak-distill"
$PY -m benchmarks.bench_relevance --name relevance_budget --model frozen-cnn=frozen-cnn \
    --model cnn-finetuned="$WORK/cnn-finetuned" --model vit-scratch="$WORK/vit-scratch" \
    --model vit-weak="$WORK/vit-weak" --model vit-weak-distill="$WORK/vit-weak-distill" \
    --model hybrid-scratch="$WORK/hybrid-scratch" --model hybrid-weak="$WORK/hybrid-weak" \
    --model hybrid-weak-distill="$WORK/hybrid-weak-distill"
# zoom-out augmentation at the same budget (RESULTS: "Zoom-out augmentation against the scale sensitivity"): the
# hybrid-weak fine-tune again with --zoom-out 0.5, the two side by side, and both on reframed (phone-like) queries
[ -f "$WORK/hybrid-weak-zoom/model_card.json" ] || $V train "${S[@]}" --init-from "$WORK/hybrid-pretrain" \
    --tasks $TASKS --epochs 1 --max-records 18900 "${HYB[@]}" --zoom-out 0.5 --out "$WORK/hybrid-weak-zoom"
$PY -m benchmarks.bench_relevance --name relevance_zoom_out --model hybrid-weak="$WORK/hybrid-weak" \
    --model hybrid-weak-zoom-out="$WORK/hybrid-weak-zoom"
$PY benchmarks/exp_aspect.py "$WORK/hybrid-weak" --queries 1000 --name aspect_hybrid_weak
$PY benchmarks/exp_aspect.py "$WORK/hybrid-weak-zoom" --queries 1000 --name aspect_hybrid_weak_zoom_out
