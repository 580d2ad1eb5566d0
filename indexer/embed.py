"""The embedding stage: every catalog image -> a float16 embedding, written in resumable chunks.

Records are numbered in the shards' stable order (manifest order, then record order). Chunk c holds
records ``c * chunk_rows ..`` and is one file ``chunk-<c>.npz`` (float16 vectors, record numbers,
product JSON, image SHA-1, the records whose image did not decode), written to a temporary name and
renamed: a killed run resumes at the first missing chunk. Images are read, decoded and resized to uint8
pixels (`Embedder.preprocess_uint8`: a quarter of the bytes a float batch would move between processes) by
torch DataLoader workers; the forward pass (`Embedder.embed_pixels`: normalisation, memory format, bf16
where `precision` says) runs where `EmbedSettings.forward` says:

- ``"main"``: in the main process, with all of torch's threads, in parallel with the workers' decoding (the
  choice on a GPU, and on a CPU with more cores than workers);
- ``"workers"``: inside each DataLoader worker, right after it decodes its batch, with one torch thread per
  worker; the main process only writes chunks. On a CPU whose cores are all taken by workers this is
  faster: a multi-threaded forward pass in the main process stalls at every synchronisation point whenever
  a decoding worker holds one of its cores, so decoding cost the forward pass about its full CPU time in
  wall-clock (measured on 2 cores, bf16: 1.27x the images/s, ``benchmarks/RESULTS.md``);
- ``"auto"`` (default): ``"workers"`` on a CPU when ``num_workers`` >= the cores this process may use, else
  ``"main"``.

The two places give the same embeddings to within float rounding (one thread sums in another order than
several). When every chunk exists, `finalize` joins them into ``vectors.f16.npy`` (row = internal id),
``products.jsonl`` and ``image_sha1.npy``.

With ``backend="ray"`` the chunks are computed by Ray Data actors instead (`indexer.embed_ray`): the
same chunk files, so resume, `finalize` and every later stage are the same for both backends.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.embed_options import BACKENDS, FORWARD_PLACES
from indexer.faults import maybe_fail
from model.precision import PRECISIONS

logger = logging.getLogger("vitrine.indexer")

DONE = "done.json"
VECTORS = "vectors.f16.npy"
PRODUCTS = "products.jsonl"
DIGESTS = "image_sha1.npy"


@dataclass(frozen=True)
class EmbedSettings:
    """How the embedding stage runs (none of it changes the embeddings except the model and the shards, and
    the device and precision to within bf16 rounding: cosine 0.999 median, interchangeable in a search)."""

    batch_size: int = 64  # images per forward pass
    num_workers: int = 2  # DataLoader worker processes decoding images (0: decode in the main process)
    chunk_rows: int = 4096  # catalog records per chunk file, the unit of resume
    device: str = "cpu"  # torch device of the model
    precision: str = "auto"  # model.embedder.resolve_precision: bf16 autocast where the hardware has it, else fp32
    forward: str = "auto"  # where the forward pass runs: "main", "workers" or "auto" (module docstring)
    backend: str = "local"  # "local": DataLoader workers + this process's model; "ray": Ray Data actors
    ray_address: str | None = None  # backend "ray": cluster address ("auto": the running one); None: start Ray here
    ray_actors: int = 2  # backend "ray": embedding actors, each holding one model replica
    ray_cpus_per_actor: float = 1.0  # backend "ray": CPUs each actor reserves (= its torch threads)

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("num_workers", 0), ("chunk_rows", 1)):  # chunk_rows 0 divided by 0
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if self.forward not in FORWARD_PLACES:
            raise ValueError(f"unknown forward place {self.forward!r}: choose from {', '.join(FORWARD_PLACES)}")
        if self.forward == "workers" and (self.num_workers < 1 or not self.device.startswith("cpu")):
            raise ValueError(f"forward='workers' needs num_workers >= 1 and a CPU device, got num_workers="
                             f"{self.num_workers} and device {self.device!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown embedding backend {self.backend!r}: choose from {', '.join(BACKENDS)}")
        if self.ray_actors < 1 or self.ray_cpus_per_actor <= 0:
            raise ValueError(f"the ray backend needs ray_actors >= 1 and ray_cpus_per_actor > 0, got "
                             f"{self.ray_actors} and {self.ray_cpus_per_actor}")


class RecordImages:
    """torch map-style dataset over global record numbers: (record, CHW float32 or None, product JSON, sha1, error)."""

    def __init__(self, shards_dir: Path, entries: list[dict], preprocess: Any,
                 min_size: tuple[int, int] | None = None) -> None:
        self.shards_dir = shards_dir
        self.min_size = min_size  # decode_image's min_size: large JPEGs decode at reduced scale (Embedder.decode_size)
        self.paths = [entry["path"] for entry in entries]
        self.offsets = np.cumsum([0] + [int(entry["records"]) for entry in entries])
        self.preprocess = preprocess
        self._envs: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _value(self, record: int) -> tuple[bytes, str]:
        """The record's value, and the SHA-1 of its source file when ingest stored other bytes ("" otherwise)."""
        import lmdb

        from model.data.shards import source_digest_key

        shard = int(np.searchsorted(self.offsets, record, side="right") - 1)
        if shard not in self._envs:  # opened lazily, so each worker process has its own handle
            self._envs[shard] = lmdb.open(str(self.shards_dir / self.paths[shard]), readonly=True, lock=False,
                                          readahead=False, max_readers=512)
        index = record - int(self.offsets[shard])
        with self._envs[shard].begin(buffers=False) as txn:
            value = txn.get(struct.pack(">Q", index))
            source = txn.get(source_digest_key(index))
        if value is None:
            raise ValueError(f"shard {self.paths[shard]} lacks record {index}")
        return bytes(value), bytes(source).decode("ascii") if source is not None else ""

    def read(self, record: int) -> tuple[str, str, bytes, str]:
        """(product id, product JSON, encoded image bytes, image SHA-1) of one record, not decoded.

        The SHA-1 is that of the catalog's image file: of the stored bytes, or the source file's digest that
        ingest recorded when it re-encoded the image (--max-side), so that `index update` sees the same file as
        unchanged."""
        from model.data import decode_record

        value, source = self._value(record)
        product, data = decode_record(value)
        meta = json.dumps(product.to_json(), ensure_ascii=False, separators=(",", ":"))
        return product.product_id, meta, data, source or hashlib.sha1(data).hexdigest()

    def __getitem__(self, record: int) -> tuple[int, Any, str, str, str]:
        product_id, meta, data, digest = self.read(record)
        pixels, error = preprocess_image(data, product_id, self.preprocess, self.min_size)
        return record, pixels, meta, digest, error


def preprocess_image(data: bytes, product_id: str, preprocess: Any,
                     min_size: tuple[int, int] | None = None) -> tuple[Any, str]:
    """(CHW pixels, "") of encoded image bytes, or (None, reason) when the image does not decode.

    Both backends decode through this function, so they count the same bad images with the same words, and
    both decode a large JPEG at the reduced scale `min_size` allows (`Embedder.decode_size`), as the server
    decodes its queries.
    """
    from model import images as model_images

    try:
        return preprocess(model_images.decode_image(data, min_size=min_size)), ""
    except model_images.ImageDecodeError as exc:
        return None, f"product {product_id}: {exc}"


def collate(items: list[tuple[int, Any, str, str, str]]) -> dict[str, Any]:
    """One batch: the decodable images stacked, the rest listed with their errors."""
    import torch

    good = [item for item in items if item[1] is not None]
    pixels = torch.from_numpy(np.stack([item[1] for item in good])) if good else None
    return {"records": [i[0] for i in good], "pixels": pixels, "products": [i[2] for i in good],
            "digests": [i[3] for i in good], "bad": [(i[0], i[4]) for i in items if i[1] is None]}


def collate_and_embed(embedder: Any, items: list[tuple[int, Any, str, str, str]]) -> dict[str, Any]:
    """`collate`, then the batch's float16 embeddings in place of its pixels (runs in a DataLoader worker)."""
    batch = collate(items)
    batch["vectors"] = _embed_batch(embedder, batch.pop("pixels"))
    return batch


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def forward_in_workers(settings: EmbedSettings) -> bool:
    """Whether the DataLoader workers run the forward pass themselves (`EmbedSettings.forward`)."""
    if settings.forward != "auto":
        return settings.forward == "workers"
    return settings.device == "cpu" and settings.num_workers >= max(2, usable_cores())


def shards_fingerprint(shards_dir: str | Path) -> str:
    """sha256 of the shards' manifest.json (it lists every shard's checksum)."""
    return hashlib.sha256((Path(shards_dir) / "manifest.json").read_bytes()).hexdigest()


def chunk_path(folder: Path, chunk: int) -> Path:
    return folder / f"chunk-{chunk:06d}.npz"


def pending_chunks(total: int, chunk_rows: int, folder: Path) -> list[int]:
    """Numbers of the chunks of `total` records not yet on disk under `folder` (the work left to resume)."""
    return [c for c in range((total + chunk_rows - 1) // chunk_rows) if not chunk_path(folder, c).is_file()]


def chunk_records(chunk: int, chunk_rows: int, total: int) -> range:
    """The global record numbers chunk `chunk` holds."""
    return range(chunk * chunk_rows, min(total, (chunk + 1) * chunk_rows))


def pending_batches(total: int, chunk_rows: int, batch_size: int, folder: Path) -> list[list[int]]:
    """Record-number batches of the chunks not yet on disk (a batch never straddles two chunks)."""
    batches: list[list[int]] = []
    for chunk in pending_chunks(total, chunk_rows, folder):
        records = list(chunk_records(chunk, chunk_rows, total))
        batches.extend(records[i : i + batch_size] for i in range(0, len(records), batch_size))
    return batches


def save_chunk(folder: Path, chunk: int, parts: list[dict[str, Any]], dim: int) -> None:
    """Write chunk-<chunk>.npz atomically (temporary name, fsync, rename)."""
    vectors = np.concatenate([p["vectors"] for p in parts]) if parts else np.zeros((0, dim), np.float16)
    arrays: dict[str, Any] = {
        "vectors": vectors.astype(np.float16),
        "records": np.array([r for p in parts for r in p["records"]], dtype=np.int64),
        "products": np.array([s for p in parts for s in p["products"]], dtype=str),
        "digests": np.array([s for p in parts for s in p["digests"]], dtype="S40"),
        "bad": np.array([r for p in parts for r, _ in p["bad"]], dtype=np.int64),
    }
    tmp = folder / f".{chunk_path(folder, chunk).name}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, chunk_path(folder, chunk))


def _embed_batch(embedder: Any, pixels: Any) -> np.ndarray:
    """L2-normalised float16 embeddings of a collated batch's pixels (the Embedder's shared forward pass);
    (0, dim) when none of its images decoded (pixels None)."""
    if pixels is None:
        return np.zeros((0, embedder.dim), np.float16)
    return embedder.embed_pixels(pixels).astype(np.float16)


def embed_chunks(shards_dir: str | Path, embedder: Any, folder: Path, settings: EmbedSettings) -> dict[str, Any]:
    """Embed every record whose chunk is missing under `folder`; returns counts and images/s of this run."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from model.data import load_shards_manifest

    entries = load_shards_manifest(shards_dir)["shards"]
    dataset = RecordImages(Path(shards_dir), entries, embedder.preprocess_uint8,  # normalised in embed_pixels
                           embedder.decode_size())
    total = len(dataset)
    batches = pending_batches(total, settings.chunk_rows, settings.batch_size, folder)
    todo = sum(len(b) for b in batches)
    in_workers = forward_in_workers(settings)
    logger.info("embed: forward pass in %s", f"{settings.num_workers} DataLoader workers, one torch thread each"
                if in_workers else "the main process")
    loader: Any = DataLoader(dataset, batch_sampler=batches, num_workers=settings.num_workers,  # type: ignore[arg-type]
                             collate_fn=functools.partial(collate_and_embed, embedder) if in_workers else collate,
                             pin_memory=settings.device.startswith("cuda"),
                             persistent_workers=False, prefetch_factor=4 if settings.num_workers else None)
    parts: list[dict[str, Any]] = []
    chunk, written, bad, embedded = -1, 0, 0, 0
    start = time.perf_counter()
    with tqdm(total=total, initial=total - todo, unit="img", desc="embed", mininterval=2.0, smoothing=0.1) as bar:
        for batch in loader:
            first = (batch["records"] or [r for r, _ in batch["bad"]])[0]
            if first // settings.chunk_rows != chunk and parts:
                save_chunk(folder, chunk, parts, embedder.dim)
                written += 1
                parts = []
                maybe_fail("embed", written)
            chunk = first // settings.chunk_rows
            for record, error in batch["bad"]:
                logger.warning("skipping record %d: bad image: %s", record, error)
            vectors = batch.pop("vectors") if in_workers else _embed_batch(embedder, batch.pop("pixels"))
            parts.append({**batch, "vectors": vectors})
            bad += len(batch["bad"])
            embedded += len(vectors)
            bar.update(len(batch["records"]) + len(batch["bad"]))
        if parts:
            save_chunk(folder, chunk, parts, embedder.dim)
            written += 1
            maybe_fail("embed", written)
    seconds = time.perf_counter() - start
    return {"records": total, "embedded_this_run": embedded, "bad_images_this_run": bad, "chunks_written": written,
            "seconds": round(seconds, 3), "images_per_s": round(embedded / max(seconds, 1e-9), 2),
            "forward": "workers" if in_workers else "main"}


def iter_chunks(folder: Path) -> Iterator[dict[str, np.ndarray]]:
    """Chunk arrays in chunk order."""
    for path in sorted(folder.glob("chunk-*.npz")):
        with np.load(path, allow_pickle=False) as data:
            yield {key: data[key] for key in data.files}


def finalize(folder: Path, dim: int, total: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Join the chunks into vectors.f16.npy, products.jsonl, image_sha1.npy; write done.json; drop the chunks."""
    expected = (total + int(extra["chunk_rows"]) - 1) // int(extra["chunk_rows"])
    found = len(list(folder.glob("chunk-*.npz")))
    if found != expected:
        raise RuntimeError(f"{folder} holds {found} embedding chunks, expected {expected}: rerun the embed stage")
    rows = sum(len(c["records"]) for c in iter_chunks(folder))
    bad = sorted(int(r) for c in iter_chunks(folder) for r in c["bad"])
    if rows == 0:
        raise ValueError(f"no decodable images among the {total} catalog records ({len(bad)} bad): nothing to index")
    out = np.lib.format.open_memmap(folder / f".{VECTORS}.tmp", mode="w+", dtype=np.float16, shape=(rows, dim))
    digests = np.empty(rows, dtype="S40")
    row = 0
    with open(folder / f".{PRODUCTS}.tmp", "w", encoding="utf-8") as products:
        for chunk in iter_chunks(folder):
            n = len(chunk["records"])
            out[row : row + n] = chunk["vectors"]
            digests[row : row + n] = chunk["digests"]
            products.writelines(line + "\n" for line in chunk["products"])
            row += n
    out.flush()
    del out
    with open(folder / f".{DIGESTS}.tmp", "wb") as f:
        np.save(f, digests, allow_pickle=False)
    for name in (VECTORS, PRODUCTS, DIGESTS):
        os.replace(folder / f".{name}.tmp", folder / name)
    report = {**extra, "records": total, "embedded": rows, "bad_images": len(bad), "bad_records": bad[:1000],
              "dim": dim}
    write_json(folder / DONE, report)
    for path in folder.glob("chunk-*.npz"):
        path.unlink()
    return report


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(payload, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file written by write_json, or None when missing or unreadable (an incomplete stage)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_embed_stage(shards_dir: str | Path, model: str | Path, folder: Path, settings: EmbedSettings,
                    key: str) -> dict[str, Any]:
    """The whole stage: skip when done for `key`, else resume the chunks, then finalize."""
    done = read_json(folder / DONE)
    if done is not None and done.get("key") == key and (folder / VECTORS).is_file():
        logger.info("embed: already done (%d vectors), skipped", done["embedded"])
        return done
    marker = read_json(folder / "key.json")
    if marker is None or marker.get("key") != key:
        if folder.exists():
            logger.info("embed: inputs changed since the last run in %s; starting over", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_json(folder / "key.json", {"key": key})
    existing = len(list(folder.glob("chunk-*.npz")))
    if existing:
        logger.info("embed: resuming after %d chunk(s) already on disk", existing)
    if settings.backend == "ray":
        from indexer import embed_ray

        dim, fingerprint = embed_ray.model_identity(model)
        run = embed_ray.embed_chunks_ray(shards_dir, model, folder, settings, dim)
    else:
        from model.embedder import Embedder

        embedder = Embedder.load(model, device=settings.device, precision=settings.precision)
        logger.info("embed: %s on %s", embedder.precision, settings.device)
        dim, fingerprint = embedder.dim, embedder.fingerprint
        run = {**embed_chunks(shards_dir, embedder, folder, settings), "precision": embedder.precision}
    logger.info("embed (%s backend): %d images in %.1f s this run (%.1f images/s), %d bad", settings.backend,
                run["embedded_this_run"], run["seconds"], run["images_per_s"], run["bad_images_this_run"])
    return finalize(folder, dim, run["records"], {
        "key": key, "chunk_rows": settings.chunk_rows, "model_fingerprint": fingerprint,
        "model_path": str(Path(model).resolve()), "last_run": {**run, "backend": settings.backend}})


def load_products(folder: Path) -> list[Any]:
    """The Products of the embedded rows (row = internal id)."""
    from model.catalog import Product

    with open(folder / PRODUCTS, encoding="utf-8") as f:
        return [Product.from_json(json.loads(line)) for line in f]
