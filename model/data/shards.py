"""The shard format (LMDB records of product JSON + image bytes) and its readers.

A record's key is the 8-byte big-endian index within its shard; a `__count__` key holds the record
count (8-byte big-endian). A value is a 4-byte big-endian length L, L bytes of UTF-8 Product JSON, then
the encoded image bytes as given by the catalog.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import torch
from torch.utils.data import IterableDataset, get_worker_info

from model.catalog import Product
from model.images import ImageDecodeError, decode_image

SHARDS_FORMAT = "vitrine-shards/1"
COUNT_KEY = b"__count__"


@dataclass(frozen=True)
class ShardRecord:
    """One product image read back from a shard."""

    product: Product
    image_bytes: bytes
    shard: int = 0  # position of the shard in the manifest
    index: int = 0  # record index within the shard


def record_key(index: int) -> bytes:
    """LMDB key of the record `index` of a shard."""
    return struct.pack(">Q", index)


def source_digest_key(index: int) -> bytes:
    """LMDB key of the SHA-1 (40 hex characters) of the source file of record `index`, written only when ingest
    stored other bytes than the file's (re-encoded with --max-side): an incremental update compares the catalog's
    files with it, so an unchanged photo is recognised as unchanged."""
    return b"sha1/" + struct.pack(">Q", index)


def encode_record(product: Product, image_bytes: bytes) -> bytes:
    """Value of one record: length-prefixed Product JSON followed by the image bytes."""
    meta = json.dumps(product.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return struct.pack(">I", len(meta)) + meta + image_bytes


def decode_record(value: bytes) -> tuple[Product, bytes]:
    """(Product, image bytes) of a record value; raises ValueError on a malformed value."""
    if len(value) < 4:
        raise ValueError(f"malformed shard record: {len(value)} bytes, shorter than its 4-byte header")
    (length,) = struct.unpack(">I", value[:4])
    if 4 + length > len(value):
        raise ValueError(f"malformed shard record: metadata length {length} exceeds the value ({len(value)} bytes)")
    product = Product.from_json(json.loads(value[4:4 + length].decode("utf-8")))
    return product, bytes(value[4 + length:])


def load_shards_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """The shards folder's manifest.json, checked for the expected format."""
    path = Path(shards_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shards manifest at {path}: run the ingest step (vitrine ingest) first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != SHARDS_FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {SHARDS_FORMAT!r}")
    return manifest


def _open_shard(path: Path) -> lmdb.Environment:
    """Read-only LMDB environment of one shard (no lock file: shards are immutable once published)."""
    if not path.is_dir():
        raise FileNotFoundError(f"shard {path} listed in the manifest does not exist")
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_readers=256)


def iter_shard(path: Path, indices: Sequence[int] | None = None, shard: int = 0) -> Iterator[ShardRecord]:
    """Records of one shard in index order (or in the order of `indices`)."""
    env = _open_shard(path)
    try:
        with env.begin(buffers=False) as txn:
            count_bytes = txn.get(COUNT_KEY)
            if count_bytes is None:
                raise ValueError(f"shard {path} has no {COUNT_KEY!r} key: incomplete or not a vitrine shard")
            (count,) = struct.unpack(">Q", count_bytes)
            for index in range(count) if indices is None else indices:
                value = txn.get(record_key(index))
                if value is None:
                    raise ValueError(f"shard {path} lacks record {index} of {count}")
                product, image_bytes = decode_record(value)
                yield ShardRecord(product, image_bytes, shard, index)
    finally:
        env.close()


def iter_shard_records(shards_dir: str | Path) -> Iterator[ShardRecord]:
    """Every record of every shard, in manifest order then record order (stable across runs)."""
    manifest = load_shards_manifest(shards_dir)
    for position, entry in enumerate(manifest["shards"]):
        yield from iter_shard(Path(shards_dir) / entry["path"], shard=position)


def product_label(product: Product, column: str) -> str:
    """The product's value for a label column: an attribute, or the mapped category / brand for "category" /
    "brand" ("" if none). A joint column "a+b" (when no attribute has that name) is the values of a and b joined
    with "+", e.g. "Tshirts+Black" for "articleType+baseColour", and "" when either is missing."""
    if column in product.attributes:
        return product.attributes[column]
    if "+" in column:
        parts = [product_label(product, part) for part in column.split("+")]
        return "+".join(parts) if all(parts) else ""
    return {"category": product.category, "brand": product.brand}.get(column, "")


def label_columns(products: Iterable[Product]) -> set[str]:
    """Every column `product_label` can read for these products: their attribute columns, "category" and "brand"
    (and any joint "a+b" of them: see `unknown_label_columns`)."""
    return {"category", "brand"}.union(*(product.attributes for product in products))


def unknown_label_columns(columns: Iterable[str], known: set[str]) -> list[str]:
    """The names among `columns` that `product_label` cannot read: neither a known column nor a joint "a+b" of them."""
    return [c for c in columns if c not in known and not ("+" in c and all(p in known for p in c.split("+")))]


def _rank_and_world() -> tuple[int, int]:
    """Distributed rank and world size (0, 1 when torch.distributed is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def example_seed(seed: int, epoch: int, shard: int, index: int) -> int:
    """Seed of one example's augmentation: fixed by (seed, epoch, record), whoever reads it and whenever.

    This is what makes a resumed run (or one with another number of workers) augment exactly as before.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{shard}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


Targets = Callable[[Product], "dict[str, Any] | None"]
_MAX_WORKERS = 64  # slots of the shared skip counters (dataloader workers per process, plus the main one)


class ShardDataset(IterableDataset):
    """Training examples from shards: (transform(image, example_seed), targets(product)).

    Reading is split by shard: shard i goes to reader i mod (ranks x workers), so across all distributed
    ranks and dataloader workers every record is read exactly once per epoch. Each epoch a reader visits
    its shards in a seeded order, reads each sequentially (LMDB pages in order, the fast path on disks and
    network storage) and passes the records through a seeded shuffle buffer of `shuffle_buffer` records
    (0: no buffer; a buffer larger than a shard mixes shards, which matters for catalogs sorted by
    category). `targets` returns the label dict of a product or None to skip it; skipped records and
    images that do not decode are counted in `skipped` (per reader process).
    """

    def __init__(self, shards_dir: str | Path, transform: Callable[[Any, int], torch.Tensor], targets: Targets, *,
                 shuffle: bool = True, seed: int = 0, shuffle_buffer: int = 8192,
                 rank: int | None = None, world_size: int | None = None) -> None:
        self.shards_dir = Path(shards_dir)
        self.entries = load_shards_manifest(shards_dir)["shards"]
        self.transform = transform
        self.targets = targets
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size  # None: from torch.distributed
        self.epoch = 0
        # skip counts per dataloader worker, in shared memory so that the workers' counts reach the trainer
        self._skips = torch.zeros((_MAX_WORKERS, 2), dtype=torch.int64).share_memory_()

    @property
    def skipped(self) -> dict[str, int]:
        """Records skipped so far by every reader of this process and its dataloader workers, by reason."""
        totals = self._skips.sum(dim=0).tolist()
        return {"targets": int(totals[0]), "image": int(totals[1])}

    def _count_skip(self, reason: int) -> None:
        info = get_worker_info()
        self._skips[(0 if info is None else info.id + 1) % _MAX_WORKERS, reason] += 1

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle order (call before each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    def _my_shards(self) -> list[int]:
        """Shard positions read by this rank and dataloader worker, in this epoch's order."""
        rank, world = _rank_and_world()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader, readers = rank * workers + worker, world * workers
        mine = list(range(len(self.entries)))[reader::readers]
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{self.epoch}:{reader}").shuffle(mine)
        return mine

    def _sequential(self) -> Iterator[ShardRecord]:
        for position in self._my_shards():
            yield from iter_shard(self.shards_dir / self.entries[position]["path"], shard=position)

    def records(self) -> Iterator[ShardRecord]:
        """This reader's records for the current epoch (shard order, then the shuffle buffer)."""
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from self._sequential()
            return
        rng = random.Random(f"buffer:{self.seed}:{self.epoch}")
        buffer: list[ShardRecord] = []
        for record in self._sequential():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            slot = rng.randrange(len(buffer))
            buffer[slot], record = record, buffer[slot]
            yield record
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        size_of = getattr(self.transform, "decode_size", None)
        decode_size = size_of() if callable(size_of) else None
        for record in self.records():
            targets = self.targets(record.product)
            if targets is None:
                self._count_skip(0)
                continue
            try:  # at the reduced JPEG scale the transform allows (Augment.decode_size), as the Embedder does
                image = decode_image(record.image_bytes, min_size=decode_size)
            except ImageDecodeError:
                self._count_skip(1)
                continue
            yield self.transform(image, example_seed(self.seed, self.epoch, record.shard, record.index)), targets
