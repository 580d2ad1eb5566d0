"""Embedder: the inference API used by the indexer and the engine (images or bytes -> L2-normalised vectors)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.binary import BinaryRotation, load_rotation, pack_signs
from model.checkpoint import card_resize_mode, load_checkpoint, model_fingerprint
from model.images import decode_image, decode_size_for, fit_aspect
from model.networks import LITE0_TIMM_NAME, VitrineModel, fold_batchnorm, lite0_passes
from model.precision import PRECISIONS
from model.runtime import tune_malloc


def resolve_precision(precision: str, device: str) -> str:
    """The arithmetic of inference, "fp32" or "bf16" (autocast), for a `precision` setting on `device`.

    "auto" is bf16 where the hardware computes it natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or
    AMX, through oneDNN) and fp32 elsewhere, where bf16 would be emulated and slower. Measured on the default
    model (benchmarks/RESULTS.md): bf16 runs the forward pass 2x faster on this machine's 2 cores with the same top-1
    relevance, and its embeddings are interchangeable with fp32 ones (cosine 0.999 median to the fp32
    embedding of the same image; bf16 queries against an fp32 index score the same top-1).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) else "fp32"


class Embedder:
    """A loaded checkpoint in eval mode: `embed_images` / `embed_bytes` give (n, dim) float32 unit rows."""

    def __init__(self, model: VitrineModel, card: dict[str, Any], fingerprint: str, device: str = "cpu",
                 precision: str = "auto") -> None:
        tune_malloc()  # activation buffers reused instead of mapped and page-faulted per pass (model.runtime)
        self.model = model.eval().to(device)
        # every eval-mode batch norm of the conv stem / CNN folded into its convolution: same outputs, the
        # default model's forward 1.16x faster on the CPU (benchmarks/bench_fold.py)
        self.folded_batchnorms = fold_batchnorm(self.model)
        # convolutional trunks (CNNs, the hybrid ViT's conv stem) run faster channels-last on CPU
        self.channels_last = model.config.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model_card = card
        self.fingerprint = fingerprint
        self.binary: BinaryRotation | None = None  # ITQ rotation of the binary codes (model.binary), if fitted
        self.device = device
        self.precision = resolve_precision(precision, device)  # "fp32" or "bf16": how embed_pixels computes
        self.dim = int(card["embedding_dim"])
        self.input_size = (int(card["input_size"][0]), int(card["input_size"][1]))  # (H, W)
        self._mean = np.asarray(card["mean"], dtype=np.float32)
        self._std = np.asarray(card["std"], dtype=np.float32)
        # the same constants on the device, for embed_pixels' normalisation of uint8 batches
        self._mean_t = torch.from_numpy(self._mean).to(device).view(1, 3, 1, 1)
        self._std_t = torch.from_numpy(self._std).to(device).view(1, 3, 1, 1)
        self.resize_mode = card_resize_mode(card)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "cpu", precision: str = "auto") -> Embedder:
        """Load a checkpoint folder (model.pt + model_card.json) onto `device` (precision: see resolve_precision)."""
        model, card = load_checkpoint(checkpoint)
        embedder = cls(model, card, model_fingerprint(checkpoint), device, precision)
        embedder.binary = load_rotation(checkpoint)
        return embedder

    def binary_codes(self, vectors: np.ndarray) -> np.ndarray:
        """Packed sign bits (n, dim / 8) of embeddings: after the checkpoint's ITQ rotation when it has one."""
        return pack_signs(vectors) if self.binary is None else self.binary.codes(vectors)

    def decode_size(self, region: tuple[float, float, float, float] | None = None) -> tuple[int, int]:
        """(width, height): the smallest decoded image that still gives this model's input at full detail, for
        `model.images.decode_image(min_size=...)`; larger JPEGs are decoded at 1/2, 1/4 or 1/8 scale.

        DECODE_MARGIN times the input size, divided by the crop `region`'s (x, y, width, height) fractions when
        the caller cuts one out of the decoded image. Measured on 12-megapixel JPEGs for the default model
        (benchmarks/RESULTS.md, "Phone photos"): decoded at 1/8 scale instead of in full, decoding and
        preprocessing is 5.9x faster, and the embedding's cosine with the full decode's is 0.9997 (median; 0.996
        at worst over 300 photos), with the same top-1 relevance.
        """
        return decode_size_for(self.input_size) if region is None else \
            decode_size_for(self.input_size, region[2], region[3])

    def decode(self, data: bytes, region: tuple[float, float, float, float] | None = None,
               **limits: int) -> Image.Image:
        """`model.images.decode_image` of image bytes at the reduced scale this model allows (`decode_size`);
        `limits` are its max_bytes / max_pixels. The crop region itself is cut by the caller."""
        return decode_image(data, min_size=self.decode_size(region), **limits)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32: RGB, brought to the input's aspect ratio as the card's resize_mode says (crop,
        stretch or pad: model.images.fit_aspect), resized to the card's input size, normalised with its mean/std."""
        pixels = np.asarray(self.preprocess_uint8(image), dtype=np.float32).transpose(1, 2, 0) / 255.0
        return ((pixels - self._mean) / self._std).transpose(2, 0, 1)

    def preprocess_uint8(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) uint8: `preprocess` before its normalisation, which `embed_pixels` then does for the batch.

        A quarter of the bytes to move between processes (the index build's DataLoader workers) or to a GPU;
        embed_pixels normalises exactly as `preprocess` does, so both give the same embeddings bit for bit.
        """
        height, width = self.input_size
        fitted = fit_aspect(image.convert("RGB"), width, height, self.resize_mode)
        resized = fitted.resize((width, height), Image.Resampling.BILINEAR)
        return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))

    def embed_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """L2-normalised float32 embeddings (n, dim) of a preprocessed batch (n, 3, H, W): float32 from
        `preprocess`, or uint8 from `preprocess_uint8` (normalised here, as `preprocess` would).

        The one forward pass that every path shares (embed_images, the indexer's embed stage and its Ray
        actors, the server's micro-batcher), so an index and the queries against it are embedded alike:
        the card's memory format, bf16 autocast when `precision` resolved to bf16, rows normalised in float32.
        """
        with torch.inference_mode():
            tensor = torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels
            tensor = tensor.to(self.device, non_blocking=True)
            if tensor.dtype == torch.uint8:
                tensor = (tensor.float() / 255.0 - self._mean_t) / self._std_t
            if self.channels_last:
                tensor = tensor.to(memory_format=torch.channels_last)
            # a whole Lite0 CNN at a large input runs in passes that keep its activations reused (lite0_passes)
            passes = lite0_passes(tensor) if self.model.config.timm_name == LITE0_TIMM_NAME else 1
            with torch.autocast("cuda" if self.device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                                enabled=self.precision == "bf16"):
                embedded = torch.cat([self.model.embed(part) for part in tensor.tensor_split(passes)]) \
                    if passes > 1 else self.model.embed(tensor)
            vectors = embedded.float().cpu().numpy()
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """Embeddings of PIL images, float32 (n, dim), rows L2-normalised."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        parts = [np.zeros((0, self.dim), dtype=np.float32)]
        for begin in range(0, len(images), batch_size):
            parts.append(self.embed_pixels(np.stack([self.preprocess(im) for im in images[begin:begin + batch_size]])))
        return np.concatenate(parts).astype(np.float32, copy=False)

    def embed_bytes(self, datas: Sequence[bytes], batch_size: int = 64) -> np.ndarray:
        """Embeddings of encoded images; raises ImageDecodeError on the first undecodable one."""
        return self.embed_images([self.decode(data) for data in datas], batch_size=batch_size)
