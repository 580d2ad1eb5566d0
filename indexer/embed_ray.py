"""The embed stage on a Ray cluster (``vitrine index build --backend ray``), writing the local backend's chunks.

The records of the chunks not yet on disk become a Ray Dataset of record numbers (one block per chunk),
then two `map_batches` steps, both at the stage's batch size:

1. `read_records` (Ray tasks): record number -> product JSON, encoded image bytes, image SHA-1, read from
   the LMDB shards (the shards folder must be at the same path on every node: a shared filesystem);
2. `EmbedRecords` (an actor pool of ``ray_actors`` actors, each loading the model once, ``num_gpus=1``
   each when the device is CUDA): decode + preprocess with the model's own `Embedder.preprocess`, then
   the same forward pass as the local backend (`indexer.embed._embed_batch`), float16.

On CPU both steps share the same resources, so Ray Data fuses them into the actors (reads and decodes
happen beside the model, like DataLoader ``num_workers=0``); with GPU actors they stay separate, so CPU
tasks read while the GPUs embed. The driver (this process) gathers rows as they arrive, in any order,
and writes a chunk file as soon as all its records are in: the same ``chunk-<c>.npz`` files, same
fields, same atomic writes as `indexer.embed.embed_chunks`, so resume (a chunk on disk is never
redone), `finalize` and every later stage do not know which backend ran. Bad images are logged and
counted per record, exactly as in the local backend.

Embeddings equal the local backend's to within float16 rounding, not bit for bit: Ray forms its own
batches (a different mix of images per forward pass), and a float32 matmul may round differently
with a different batch size; the float16 output then differs by at most one unit in the last place
for the rare component that lands near a rounding boundary.

Ray is an optional extra (``pip install 'vitrine-search[ray]'``); it is imported only here, and only
when the ray backend runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from indexer.embed import (
    EmbedSettings,
    RecordImages,
    _embed_batch,
    chunk_records,
    pending_chunks,
    preprocess_image,
    save_chunk,
)
from indexer.errors import StageError
from indexer.faults import maybe_fail

logger = logging.getLogger("vitrine.indexer")

RAY_EXTRA = "pip install 'vitrine-search[ray]'  (or: pip install 'ray[data]>=2.40')"
ACTOR_START_TIMEOUT_S = 600  # every embedding actor must be up (model loaded) within this, or the stage fails


class BackendUnavailable(StageError):
    """The chosen embedding backend cannot run here (its optional dependency is not installed)."""


def import_ray() -> Any:
    """The `ray` module with Ray Data, or BackendUnavailable saying which extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data ships in the ray wheel but needs pyarrow/pandas: ray[data])
    except ImportError as exc:
        raise BackendUnavailable(f"--backend ray needs Ray Data, which is not installed ({exc}): {RAY_EXTRA}; "
                                 f"or use --backend local") from exc
    return ray


def model_identity(model: str | Path) -> tuple[int, str]:
    """(embedding dim, fingerprint) of a checkpoint without loading its weights into this process."""
    from model.checkpoint import load_model_card, model_fingerprint

    return int(load_model_card(model)["embedding_dim"]), model_fingerprint(model)


_READERS: dict[str, RecordImages] = {}  # per Ray worker process: one open reader (LMDB handles) per shards folder


def read_records(batch: dict[str, np.ndarray], shards_dir: str) -> dict[str, np.ndarray]:
    """Ray task: a batch of record numbers ("data") -> their product id, product JSON, image bytes and SHA-1."""
    if shards_dir not in _READERS:
        from model.data import load_shards_manifest

        _READERS[shards_dir] = RecordImages(Path(shards_dir), load_shards_manifest(shards_dir)["shards"], None)
    reader = _READERS[shards_dir]
    records = np.asarray(batch["data"], dtype=np.int64)
    rows = [reader.read(int(record)) for record in records]
    return {"record": records, "product_id": np.array([r[0] for r in rows], dtype=object),
            "product": np.array([r[1] for r in rows], dtype=object), "image": np.array([r[2] for r in rows],
                                                                                      dtype=object),
            "digest": np.array([r[3] for r in rows], dtype=object)}


class EmbedRecords:
    """Ray actor: one model replica; decodes and preprocesses a batch of records, embeds the decodable ones."""

    def __init__(self, model: str, device: str, threads: int, precision: str = "auto") -> None:
        import torch

        from model.embedder import Embedder

        torch.set_num_threads(max(1, threads))
        self.embedder = Embedder.load(model, device=device, precision=precision)
        self.device = device
        self.node = node_name()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        min_size = self.embedder.decode_size()
        decoded = [preprocess_image(bytes(data), str(pid), self.embedder.preprocess_uint8, min_size)
                   for data, pid in zip(batch["image"], batch["product_id"], strict=True)]
        ok = np.array([pixels is not None for pixels, _ in decoded], dtype=bool)
        vectors = np.zeros((len(decoded), self.embedder.dim), dtype=np.float16)
        if ok.any():
            pixels = torch.from_numpy(np.stack([p for p, _ in decoded if p is not None]))
            vectors[ok] = _embed_batch(self.embedder, pixels)
        return {"record": np.asarray(batch["record"], dtype=np.int64), "vector": vectors, "ok": ok,
                "product": batch["product"], "digest": batch["digest"],
                "error": np.array([error for _, error in decoded], dtype=object),
                "node": np.array([self.node] * len(decoded), dtype=object)}


def node_name() -> str:
    """The Ray node this process runs on, as its IP address and the first 8 hex digits of its node id."""
    import ray

    context = ray.get_runtime_context()
    node_id = context.get_node_id()
    address = next((node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == node_id), "?")
    return f"{address}/{node_id[:8]}"


class ChunkAssembler:
    """Collects embedded rows arriving in any order; says which chunks are complete and hands each one over."""

    def __init__(self, chunks: list[int], chunk_rows: int, total: int) -> None:
        self.chunk_rows = chunk_rows
        self.expected = {c: len(chunk_records(c, chunk_rows, total)) for c in chunks}
        self.rows: dict[int, dict[int, tuple[bool, Any, str, str, str]]] = {c: {} for c in chunks}
        self.handed_over: set[int] = set()

    def add(self, batch: dict[str, np.ndarray]) -> list[int]:
        """Take one output batch of `EmbedRecords`; the chunks it completed (a repeated record counts once)."""
        completed = []
        for i, record in enumerate(np.asarray(batch["record"], dtype=np.int64).tolist()):
            chunk = record // self.chunk_rows
            if chunk in self.handed_over:  # a retried task's repeat of a chunk already written
                continue
            if chunk not in self.rows:
                raise RuntimeError(f"Ray returned record {record} of chunk {chunk}, which was not asked for")
            rows = self.rows[chunk]
            before = len(rows)
            rows[record] = (bool(batch["ok"][i]), batch["vector"][i], str(batch["product"][i]),
                            str(batch["digest"][i]), str(batch["error"][i]))
            if len(rows) == self.expected[chunk] > before:
                completed.append(chunk)
        return completed

    def pop(self, chunk: int) -> dict[str, Any]:
        """The complete chunk as one `save_chunk` part (rows in record order), forgotten here."""
        rows = sorted(self.rows.pop(chunk).items())
        del self.expected[chunk]
        self.handed_over.add(chunk)
        good = [(record, row) for record, row in rows if row[0]]
        return {"vectors": np.stack([row[1] for _, row in good]).astype(np.float16) if good else None,
                "records": [record for record, _ in good], "products": [row[2] for _, row in good],
                "digests": [row[3] for _, row in good], "bad": [(record, row[4]) for record, row in rows if not row[0]]}

    @property
    def missing(self) -> int:
        """Records asked for and not yet returned."""
        return sum(self.expected[c] - len(self.rows[c]) for c in self.expected)


def connect(ray: Any, address: str | None) -> bool:
    """Use the Ray already initialised in this process, else join `address` (None: start Ray on this machine).

    Returns True when this call started the connection (the caller then shuts it down).
    """
    if ray.is_initialized():
        logger.info("embed: using the Ray instance already initialised in this process")
        return False
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    logger.info("embed: Ray initialised (address %s; none: a Ray running on this machine, else a new one), "
                "resources %s", address, ray.cluster_resources())
    return True


def create_dataset(ray: Any, chunks: list[int], shards_dir: Path, model: Path, settings: EmbedSettings,
                   total: int) -> Any:
    """The lazy Ray Dataset of the pending chunks' records -> EmbedRecords output rows (module docstring)."""
    cuda = settings.device.startswith("cuda")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver prints its own tqdm bar
    # Start every actor before the first batch goes out: otherwise the first actor up takes the work while the
    # others still load the model, and a cluster without room for them fails with a clear timeout, not a hang.
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    records = ray.data.from_numpy([np.arange(r.start, r.stop, dtype=np.int64)
                                   for r in (chunk_records(c, settings.chunk_rows, total) for c in chunks)])
    read = records.map_batches(read_records, fn_kwargs={"shards_dir": str(shards_dir)},
                               batch_size=settings.batch_size, batch_format="numpy",
                               num_cpus=1 if cuda else settings.ray_cpus_per_actor)
    return read.map_batches(EmbedRecords, fn_constructor_kwargs={
        "model": str(model), "device": settings.device, "threads": max(1, int(settings.ray_cpus_per_actor)),
        "precision": settings.precision},
        batch_size=settings.batch_size, batch_format="numpy", concurrency=settings.ray_actors,
        num_cpus=settings.ray_cpus_per_actor, num_gpus=1 if cuda else None)


def embed_chunks_ray(shards_dir: str | Path, model: str | Path, folder: Path, settings: EmbedSettings,
                     dim: int) -> dict[str, Any]:
    """Embed every record whose chunk is missing under `folder` on Ray; counts and images/s of this run."""
    from tqdm import tqdm

    from model.data import load_shards_manifest

    ray = import_ray()
    shards_dir, model = Path(shards_dir).resolve(), Path(model).resolve()
    total = sum(int(entry["records"]) for entry in load_shards_manifest(shards_dir)["shards"])
    chunks = pending_chunks(total, settings.chunk_rows, folder)
    assembler = ChunkAssembler(chunks, settings.chunk_rows, total)
    written, bad, embedded = 0, 0, 0
    per_node: dict[str, int] = {}  # rows each node's actors returned this run (a retried task's repeats too)
    start = time.perf_counter()
    started = connect(ray, settings.ray_address) if chunks else False
    try:
        dataset = create_dataset(ray, chunks, shards_dir, model, settings, total) if chunks else None
        with tqdm(total=total, initial=total - assembler.missing, unit="img", desc="embed (ray)", mininterval=2.0,
                  smoothing=0.1) as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy") if dataset is not None else []:
                for chunk in assembler.add(batch):
                    part = assembler.pop(chunk)
                    for record, error in part["bad"]:
                        logger.warning("skipping record %d: bad image: %s", record, error)
                    if part["vectors"] is None:
                        part["vectors"] = np.zeros((0, dim), np.float16)
                    save_chunk(folder, chunk, [part], dim)
                    written += 1
                    bad += len(part["bad"])
                    embedded += len(part["records"])
                    maybe_fail("embed", written)
                for node, count in zip(*np.unique(batch["node"].astype(str), return_counts=True), strict=True):
                    per_node[str(node)] = per_node.get(str(node), 0) + int(count)
                bar.update(len(batch["record"]))
    finally:
        if started:
            ray.shutdown()
    if assembler.missing:
        raise RuntimeError(f"Ray returned {assembler.missing} fewer records than asked for: rerun to resume")
    seconds = time.perf_counter() - start
    if per_node:
        logger.info("embed (ray): %d record(s) on %d node(s): %s", sum(per_node.values()), len(per_node),
                    ", ".join(f"{node} {count}" for node, count in sorted(per_node.items())))
    return {"records": total, "embedded_this_run": embedded, "bad_images_this_run": bad, "chunks_written": written,
            "seconds": round(seconds, 3), "images_per_s": round(embedded / max(seconds, 1e-9), 2),
            "records_per_node": dict(sorted(per_node.items()))}
