"""What a training run reads: label maps per task, the per-product targets, teacher logits, augmentation."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.annotate import WeakLabels
from model.catalog import Product
from model.data.shards import Targets, iter_shard_records, product_label
from model.images import decode_size_for, fit_aspect
from model.losses import IGNORE_LABEL


def scan_label_maps(shards_dir: str | Path, tasks: Sequence[str], train_splits: Sequence[str],
                    max_records: int | None = None, min_class_count: int = 1,
                    ) -> tuple[dict[str, list[str]], set[str]]:
    """({task: sorted class names}, ids of the records to train on) — one pass over the metadata.

    A record is trained on when its split is in `train_splits` or it has no split (a catalog without a
    split column). Classes seen fewer than `min_class_count` times are left out (their records keep the
    other tasks' labels). With `max_records`, a deterministic spread-out subset (ids ordered by SHA-1).
    """
    values: dict[str, dict[str, str]] = {}
    for record in iter_shard_records(shards_dir):
        product = record.product
        if product.split is None or product.split in train_splits:
            values[product.product_id] = {t: product_label(product, t) for t in tasks}
    if not values:
        raise ValueError(f"no records in {shards_dir} with split in {list(train_splits)} (or without a split): "
                         "nothing to train on")
    ids = sorted(values, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[:max_records]
    label_maps: dict[str, list[str]] = {}
    for task in tasks:
        counts = Counter(values[i][task] for i in ids if values[i][task])
        label_maps[task] = sorted(c for c, n in counts.items() if n >= min_class_count)
        if not label_maps[task]:
            raise ValueError(f"no record to train on has a value in column {task!r}: check the task names "
                             f"(the catalog's attribute columns) — got tasks {list(tasks)}")
    return label_maps, set(ids)


def load_teacher(path: str | Path, label_maps: dict[str, list[str]]) -> dict[str, dict[str, np.ndarray]]:
    """{product id: {task: teacher logits in this run's class order}} from a teacher .npz (model.distill)."""
    data = np.load(path, allow_pickle=False)
    ids = [str(i) for i in data["ids"]]
    out: dict[str, dict[str, np.ndarray]] = {i: {} for i in ids}
    for task, classes in label_maps.items():
        if f"logits/{task}" not in data:
            continue
        teacher_classes = [str(c) for c in data[f"classes/{task}"]]
        position = {c: k for k, c in enumerate(teacher_classes)}
        logits = data[f"logits/{task}"]
        # classes the teacher never saw get a very low logit, so they get ~0 probability
        columns = np.array([position.get(c, -1) for c in classes])
        aligned = np.where(columns[None, :] >= 0, logits[:, np.maximum(columns, 0)], -30.0).astype(np.float32)
        for row, product_id in enumerate(ids):
            out[product_id][task] = aligned[row]
    return out


def make_targets(label_maps: dict[str, list[str]], allowed_ids: set[str] | None,
                 weak: WeakLabels | None = None,
                 teacher: dict[str, dict[str, np.ndarray]] | None = None) -> Targets:
    """The function giving a product's training targets (None: not a training record)."""
    index = {task: {c: k for k, c in enumerate(classes)} for task, classes in label_maps.items()}
    n_weak = len(weak.labels) if weak is not None else 0

    def targets(product: Product) -> dict[str, Any] | None:
        if allowed_ids is not None and product.product_id not in allowed_ids:
            return None
        out: dict[str, Any] = {f"label/{t}": m.get(product_label(product, t), IGNORE_LABEL) for t, m in index.items()}
        if weak is not None:
            hot = torch.zeros(n_weak)
            hot[weak.product_labels.get(product.product_id, [])] = 1.0
            out["weak"] = hot
        if teacher is not None:
            logits = teacher.get(product.product_id, {})
            for task, classes in label_maps.items():
                out[f"teacher/{task}"] = torch.from_numpy(logits[task]) if task in logits \
                    else torch.zeros(len(classes))
        return out

    return targets


ZOOM_OUT_MIN_SCALE = 0.4  # the smallest a zoomed-out product gets: 40% of the frame's width and height


class Augment:
    """Seeded light augmentation: random resized crop (scale 0.75-1) to (H, W), horizontal flip, optionally
    zoom-out (with probability `zoom_out`, the result shrunk to 40-100% and placed at random on white), normalise.

    The image is first brought to the H:W aspect ratio the way the model card says (`resize_mode`, see
    model.images.fit_aspect), so training sees what the Embedder sees at indexing and query time.

    The seed comes with each example (model.data.shards.example_seed), so the result does not depend on the
    reader process or on a resume. A picklable class, so dataloader workers can use it.
    """

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 train: bool = True, resize_mode: str = "stretch", zoom_out: float = 0.0,
                 zoom_out_min_scale: float = ZOOM_OUT_MIN_SCALE) -> None:
        if not 0.0 <= zoom_out <= 1.0 or not 0.0 < zoom_out_min_scale <= 1.0:
            raise ValueError(f"zoom_out must be a probability and its min scale in (0, 1], got {zoom_out}, "
                             f"{zoom_out_min_scale}")
        self.size = size  # (H, W)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.train = train
        self.resize_mode = resize_mode  # model.images.fit_aspect, as Embedder.preprocess applies it
        self.zoom_out = zoom_out  # probability of showing the product smaller, centred anywhere on white
        self.zoom_out_min_scale = zoom_out_min_scale

    def decode_size(self) -> tuple[int, int]:
        """(width, height) a training image may be decoded down to (`model.images.decode_image(min_size=...)`):
        DECODE_MARGIN times the input, as the Embedder decodes, divided by the smallest side a random crop keeps
        (sqrt(0.75 * 0.9) of the image's width: area scale 0.75 at the narrowest aspect jitter)."""
        keep = (0.75 * 0.9) ** 0.5 if self.train else 1.0
        return decode_size_for(self.size, keep, keep)

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        height, width = self.size
        image = fit_aspect(image, width, height, self.resize_mode)
        box = (0, 0, image.width, image.height)
        if self.train:
            rng = random.Random(seed)
            scale = rng.uniform(0.75, 1.0)
            aspect = (image.width / image.height) * rng.uniform(0.9, 1.1)
            area = image.width * image.height * scale
            w = min(image.width, max(1, round((area * aspect) ** 0.5)))
            h = min(image.height, max(1, round((area / aspect) ** 0.5)))
            x, y = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
            box = (x, y, x + w, y + h)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                box = (image.width - box[2], box[1], image.width - box[0], box[3])
        resized = image.resize((width, height), Image.Resampling.BILINEAR, box=box)
        if self.train and self.zoom_out > 0.0 and rng.random() < self.zoom_out:
            # zoom-out: the crop shrunk to a random scale and placed at a random spot on white, so the model
            # also learns products that do not fill the frame (a shopper's photo taken from further away)
            factor = rng.uniform(self.zoom_out_min_scale, 1.0)
            small = (max(1, round(width * factor)), max(1, round(height * factor)))
            canvas = Image.new("RGB", (width, height), (255, 255, 255))
            canvas.paste(resized.resize(small, Image.Resampling.BILINEAR),
                         (rng.randint(0, width - small[0]), rng.randint(0, height - small[1])))
            resized = canvas
        pixels = (np.asarray(resized, dtype=np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())
