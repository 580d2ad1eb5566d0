#!/usr/bin/env bash
# Reproduce vitrine's default model (model/default/) from the fashion-product-images-small catalog.
# Every step is resumable: run it again after an interruption and it continues where it stopped.
# Usage: scripts/train_default_model.sh [WORK_DIR]   (default work/default-model; needs ../shared/datasets)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-work/default-model}
DATA=${VITRINE_DATA:-../shared/datasets/fashion-product-images-small}
V=${VITRINE:-.venv/bin/vitrine}
mkdir -p "$WORK"
echo '{"split_column": null, "split_file": "splits.csv"}' > "$WORK/catalog.json"
# 1. ingest: CSV + images -> LMDB shards (parallel decoding; ~30 s)
[ -f "$WORK/shards/manifest.json" ] || $V ingest --csv "$DATA/styles.csv" --images "$DATA/images" \
    --out "$WORK/shards" --catalog-config "$WORK/catalog.json" > "$WORK/ingest.json"
# 2. weak labels from the training split's titles (~10 s)
[ -f "$WORK/weak_labels.json" ] || $V annotate --shards "$WORK/shards" --out "$WORK/weak_labels.json" --splits train
# 3. stage 1: pretrain the ViT on the weak labels. The ViT is a hybrid: its patch embedding is EfficientNet-Lite0's
#    ImageNet conv stem + first 5 blocks (stride 16: 8x6 tokens at 128x96); the conv stem and blocks 0-2 stay
#    frozen, blocks 3-4, the 1x1 projection and the 6 transformer blocks (width 192, 3 heads) train.
ARCH=(--backbone vit-hybrid --stem-blocks 5 --stem-frozen-blocks 3 --image-size 128x96 --width 192 --depth 6
      --heads 3 --embedding-dim 256 --batch-size 128 --lr 1e-3 --precision auto --workers 1 --checkpoint-every 100)
[ -f "$WORK/pretrain/model_card.json" ] || $V train --stage pretrain --shards "$WORK/shards" \
    --weak-labels "$WORK/weak_labels.json" --epochs ${PRETRAIN_EPOCHS:-1} "${ARCH[@]}" --out "$WORK/pretrain"
# 4. stage 2: multi-task fine-tune of the unified embedding, from the pretrained trunk (7 epochs: the whole script
#    took 42-55 minutes on 2 quiet cores of bf16 CPUs, ingest to ITQ; 1 + 7 epochs is what fits the 60-minute budget).
#    Eight heads: seven label columns and the joint articleType+baseColour (each type-colour pair one class)
[ -f "$WORK/model/model_card.json" ] || $V train --stage finetune --shards "$WORK/shards" \
    --init-from "$WORK/pretrain" \
    --tasks articleType,baseColour,gender,usage,season,masterCategory,subCategory,articleType+baseColour \
    --epochs ${FINETUNE_EPOCHS:-7} "${ARCH[@]}" --out "$WORK/model"
# 5. the ITQ rotation of the binary codes, fitted on the training split's embeddings (~3 min in bf16)
[ -f "$WORK/model/binary.npz" ] || $V binarize --model "$WORK/model" --shards "$WORK/shards" --splits train
echo "default model: $WORK/model"
