"""Storage pieces of an index version: the product catalog (LMDB), the filter columns, file utilities.

Layout (see docs/contracts.md, "Index version"):

- ``catalog.lmdb/``: key ``b"i:" + 8-byte big-endian internal id`` -> Product JSON (UTF-8);
  key ``b"p:" + product_id`` (UTF-8) -> 8-byte big-endian internal id (the first one when a product
  id repeats, e.g. several images of one product).
- ``filters.npz``: ``category``/``brand`` (int32 codes into ``*_vocab``), ``price`` (float32, NaN
  unknown), ``in_stock`` (bool); row = internal id.

The catalog LMDB is written without a lock file and opened read-only without locking, so a
version folder can live on a read-only filesystem and be read by many threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from indexer.errors import VersionError
from model.catalog import Product

ID_PREFIX = b"i:"
PRODUCT_PREFIX = b"p:"
_U64 = struct.Struct(">Q")
_TXN_RECORDS = 10_000  # records per LMDB write transaction


def id_key(internal_id: int) -> bytes:
    """LMDB key of a product record: b"i:" + 8-byte big-endian internal id."""
    return ID_PREFIX + _U64.pack(internal_id)


def product_key(product_id: str) -> bytes:
    """LMDB key of the product id -> internal id mapping."""
    return PRODUCT_PREFIX + product_id.encode("utf-8")


def _product_bytes(product: Product) -> bytes:
    return json.dumps(product.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_catalog(path: Path, products: Sequence[Product]) -> int:
    """Write the catalog LMDB at `path` (a new folder); returns how many product ids repeated.

    Written in transactions of 10k records; the map grows (doubling) when it is full, so no size
    has to be guessed up front.
    """
    env = lmdb.open(str(path), map_size=64 << 20, subdir=True, lock=False, sync=True, metasync=True)
    duplicates = 0
    try:
        for start in range(0, len(products), _TXN_RECORDS):
            chunk = products[start : start + _TXN_RECORDS]
            while True:
                try:
                    duplicates += _write_chunk(env, start, chunk)
                    break
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)
        env.sync(True)
    finally:
        env.close()
    return duplicates


def _write_chunk(env: lmdb.Environment, start: int, chunk: Sequence[Product]) -> int:
    """One write transaction: records start..start+len(chunk); returns repeated product ids."""
    duplicates = 0
    with env.begin(write=True) as txn:
        for offset, product in enumerate(chunk):
            internal_id = start + offset
            txn.put(id_key(internal_id), _product_bytes(product))
            if not txn.put(product_key(product.product_id), _U64.pack(internal_id), overwrite=False):
                duplicates += 1
    return duplicates


class CatalogStore:
    """Read-only view of a version's catalog LMDB: internal id <-> Product, product id -> internal id."""

    def __init__(self, path: Path, count: int) -> None:
        if not (path / "data.mdb").is_file():
            raise VersionError(f"catalog store {path} is missing (no {path / 'data.mdb'})")
        try:
            self._env = lmdb.open(str(path), readonly=True, lock=False, subdir=True, readahead=False)
        except lmdb.Error as exc:
            raise VersionError(f"catalog store {path} cannot be opened: {exc}") from exc
        self.path = path
        self.count = count
        with self._env.begin() as txn:
            if count and txn.get(id_key(count - 1)) is None:
                self._env.close()
                raise VersionError(f"catalog store {path} lacks product {count - 1}: it does not hold {count} products")

    def _decode(self, internal_id: int, value: bytes | None) -> Product:
        if value is None:
            raise KeyError(f"no product with internal id {internal_id} (index holds ids 0..{self.count - 1})")
        return Product.from_json(json.loads(value.decode("utf-8")))

    def get(self, internal_id: int) -> Product:
        """The Product stored under an internal id; KeyError when there is none."""
        with self._env.begin(buffers=False) as txn:
            return self._decode(internal_id, txn.get(id_key(int(internal_id))) if internal_id >= 0 else None)

    def get_many(self, internal_ids: Iterable[int] | np.ndarray) -> list[Product]:
        """Products for many internal ids, read in one transaction; KeyError on an unknown id."""
        with self._env.begin(buffers=False) as txn:
            return [self._decode(i, txn.get(id_key(int(i))) if i >= 0 else None) for i in internal_ids]

    def internal_id(self, product_id: str) -> int | None:
        """The internal id of a product id, or None when the catalog does not have it."""
        with self._env.begin(buffers=False) as txn:
            value = txn.get(product_key(product_id))
        return None if value is None else _U64.unpack(value)[0]

    def close(self) -> None:
        """Close the LMDB environment (idempotent)."""
        self._env.close()


@dataclass(frozen=True, eq=False)
class Filters:
    """Filter columns, one row per internal id, for filtering search results without the catalog."""

    category: np.ndarray  # int32 code into category_vocab
    category_vocab: tuple[str, ...]  # sorted distinct categories ("" = unknown)
    brand: np.ndarray  # int32 code into brand_vocab
    brand_vocab: tuple[str, ...]  # sorted distinct brands ("" = unknown)
    price: np.ndarray  # float32, NaN = unknown price
    in_stock: np.ndarray  # bool

    def __len__(self) -> int:
        return int(self.price.shape[0])

    @classmethod
    def from_products(cls, products: Sequence[Product]) -> Filters:
        """Columns from Product fields (category, brand, price, in_stock)."""
        category, category_vocab = _encode([p.category for p in products])
        brand, brand_vocab = _encode([p.brand for p in products])
        price = np.array([np.nan if p.price is None else p.price for p in products], dtype=np.float32)
        in_stock = np.array([bool(p.in_stock) for p in products], dtype=bool)
        return cls(category, category_vocab, brand, brand_vocab, price, in_stock)

    def category_code(self, category: str) -> int | None:
        """Code of a category in `category`, or None when no product has it."""
        return _code(self.category_vocab, category)

    def brand_code(self, brand: str) -> int | None:
        """Code of a brand in `brand`, or None when no product has it."""
        return _code(self.brand_vocab, brand)

    def save(self, path: Path) -> None:
        """Write the columns as an uncompressed .npz (no pickled objects)."""
        with open(path, "wb") as f:
            np.savez(
                f,
                category=self.category,
                category_vocab=np.array(self.category_vocab, dtype=str),
                brand=self.brand,
                brand_vocab=np.array(self.brand_vocab, dtype=str),
                price=self.price,
                in_stock=self.in_stock,
            )

    @classmethod
    def load(cls, path: Path, count: int) -> Filters:
        """Read and check the columns (keys, dtypes, one row per internal id, codes in range)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in _FILTER_DTYPES}
        except (OSError, ValueError, KeyError) as exc:
            raise VersionError(f"filters file {path} is unreadable or incomplete: {exc}") from exc
        for key, kind in _FILTER_DTYPES.items():
            if arrays[key].dtype.kind != kind or arrays[key].ndim != 1:
                raise VersionError(f"filters file {path}: column {key!r} has dtype {arrays[key].dtype}")
            if not key.endswith("_vocab") and arrays[key].shape[0] != count:
                raise VersionError(f"filters file {path}: column {key!r} has {arrays[key].shape[0]} rows, not {count}")
        for key in ("category", "brand"):
            vocab_size = arrays[f"{key}_vocab"].shape[0]
            if count and (arrays[key].min() < 0 or arrays[key].max() >= vocab_size):
                raise VersionError(f"filters file {path}: {key} codes fall outside its vocabulary")
        return cls(
            category=arrays["category"].astype(np.int32, copy=False),
            category_vocab=tuple(str(s) for s in arrays["category_vocab"]),
            brand=arrays["brand"].astype(np.int32, copy=False),
            brand_vocab=tuple(str(s) for s in arrays["brand_vocab"]),
            price=arrays["price"].astype(np.float32, copy=False),
            in_stock=arrays["in_stock"],
        )


_FILTER_DTYPES = {
    "category": "i", "category_vocab": "U", "brand": "i", "brand_vocab": "U", "price": "f", "in_stock": "b",
}


def _encode(values: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Dictionary-encode strings: (int32 codes, sorted vocabulary)."""
    vocab = tuple(sorted(set(values)))
    lookup = {value: code for code, value in enumerate(vocab)}
    return np.array([lookup[v] for v in values], dtype=np.int32), vocab


def _code(vocab: tuple[str, ...], value: str) -> int | None:
    codes = np.searchsorted(np.array(vocab, dtype=str), value) if vocab else 0
    return int(codes) if vocab and int(codes) < len(vocab) and vocab[int(codes)] == value else None


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's contents, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (created/renamed names) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every directory bottom-up, so a later rename is durable."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for filename in filenames:
            fsync_file(Path(dirpath) / filename)
        fsync_dir(Path(dirpath))


def data_files(root: Path) -> list[str]:
    """Relative paths (POSIX) of the files of a version folder that are checksummed.

    Excludes manifest.json (it holds the checksums) and LMDB lock files (runtime state).
    """
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in ("manifest.json", "lock.mdb") and not path.name.startswith(".tmp"):
            files.append(path.relative_to(root).as_posix())
    return files
