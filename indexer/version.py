"""The on-disk index version format: write a version atomically, open it, publish it as CURRENT.

```
<root>/<version>/          version = UTC timestamp "20261129T031500Z" (+ "-N" on collision)
  manifest.json            format "vitrine-index/1", model fingerprint, dim, metric, factory, count,
                           shards [{path, count}], files {relative path: sha256}, search_defaults, ...
  shard-000.faiss ...      Faiss indices; ids are int64 internal ids 0..N-1 shared by all shards
  catalog.lmdb/            internal id <-> Product (see indexer.store)
  filters.npz              category/brand codes + vocabularies, price, in_stock; row = internal id
  vectors.f16.npy          (N, dim) float16 embeddings; row = internal id
<root>/CURRENT             the live version's folder name, replaced atomically
<root>/HISTORY             one line per change of CURRENT: "<UTC time> publish|rollback <name>" (what a plain
                           `vitrine index rollback` undoes; see `live_history`)
```

A version is written into ``<root>/.tmp-<name>`` and renamed into place only when complete (all
files fsynced), so a half-written version is never visible. The engine reads versions with
`open_version` / `open_current`; the build writes them with `write_version` (or `VersionWriter`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.errors import VersionError
from indexer.search import search_shards
from indexer.store import (
    CatalogStore,
    Filters,
    data_files,
    fsync_dir,
    fsync_file,
    fsync_tree,
    sha256_file,
    write_catalog,
)
from model.catalog import Product

__all__ = [
    "FORMAT", "METRIC", "IndexVersion", "VersionError", "VersionWriter", "Filters", "open_version",
    "open_current", "write_version", "read_current", "current_version_path", "publish_current", "list_versions",
    "live_history",
]

FORMAT = "vitrine-index/1"
METRIC = "inner_product"
MANIFEST = "manifest.json"
CATALOG = "catalog.lmdb"
FILTERS = "filters.npz"
VECTORS = "vectors.f16.npy"
CURRENT = "CURRENT"
HISTORY = "HISTORY"
_HISTORY_MAX_BYTES = 64 * 1024  # past this the file is cut to its newest half when the next line is written
_REQUIRED = ("format", "version", "model_fingerprint", "dim", "metric", "factory", "count", "shards", "files")
_NAME_RE = re.compile(r"^\d{8}T\d{6}Z(?:-(\d+))?$")
WRITER_LOCK = ".tmp-writer.lock"  # in <root>/.tmp-<name>/: locked while its VersionWriter lives (not checksummed)

logger = logging.getLogger("vitrine.indexer")


class IndexVersion:
    """One loaded, read-only index version: Faiss shards, catalog store, filters, float16 vectors.

    Search and lookups are safe to call from many threads: nothing is mutated per request.
    """

    def __init__(self, path: Path, manifest: dict, shards: list[faiss.Index], catalog: CatalogStore,
                 filters: Filters, vectors: np.ndarray, shard_ids: Sequence[int] | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.shards = shards
        # The manifest position of each loaded shard (all of them unless open_version was given `shards`).
        self.shard_ids = list(range(len(shards))) if shard_ids is None else list(shard_ids)
        self.catalog = catalog
        self.filters = filters
        self.vectors = vectors  # (count, dim) float16, memory-mapped
        self._rows = vectors.view(np.ndarray)  # the same memory without np.memmap's per-indexing overhead

    @property
    def name(self) -> str:
        """The version's folder name: what CURRENT, `index list` and `index rollback --to` call it, even when the
        folder was renamed or copied after its build (the manifest keeps the name it was built under); a version
        opened in its build's temporary folder (.tmp-<name>, for validation) answers the name it will get."""
        folder = Path(self.path).name
        return str(self.manifest["version"]) if folder.startswith(".tmp-") or not folder else folder

    dim = property(lambda self: int(self.manifest["dim"]), doc="Embedding dimension.")
    shard_count = property(lambda self: len(self.manifest["shards"]), doc="Shards in the manifest.")
    count = property(lambda self: int(self.manifest["count"]), doc="Number of indexed vectors (internal ids).")
    factory = property(lambda self: str(self.manifest["factory"]), doc="Faiss factory string (the index's name).")
    model_fingerprint = property(lambda self: str(self.manifest["model_fingerprint"]), doc="Embedder.fingerprint.")

    @property
    def default_nprobe(self) -> int | None:
        """nprobe used when a request gives none (manifest search_defaults)."""
        value = self.manifest.get("search_defaults", {}).get("nprobe")
        return None if value is None else int(value)

    @property
    def rerank_factor(self) -> int:
        """Candidates per wanted hit re-ranked exactly (manifest search_defaults; 1 when absent)."""
        return int(self.manifest.get("search_defaults", {}).get("rerank_factor", 1))

    def search(self, xq: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product over all shards: (D float32 (nq, k), I int64 internal ids, -1 = none)."""
        return search_shards(self.shards, xq, k, self.default_nprobe if nprobe is None else nprobe)

    def product(self, internal_id: int) -> Product:
        """The Product of an internal id; KeyError when out of range."""
        return self.catalog.get(internal_id)

    def products(self, internal_ids: Sequence[int] | np.ndarray) -> list[Product]:
        """Products of many internal ids, read in one LMDB transaction."""
        return self.catalog.get_many(internal_ids)

    def internal_id(self, product_id: str) -> int | None:
        """Internal id of a product id (its first image), or None when the index lacks it."""
        return self.catalog.internal_id(product_id)

    def vector(self, internal_id: int) -> np.ndarray:
        """The stored embedding of an internal id as float32 (dim,); KeyError when out of range."""
        if not 0 <= internal_id < self.count:
            raise KeyError(f"no vector with internal id {internal_id} (index holds ids 0..{self.count - 1})")
        return widen_float16(self.vectors[internal_id])

    def vectors_of(self, internal_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored embeddings of many internal ids as float32 (n, dim), e.g. for exact re-ranking."""
        ids = np.asarray(internal_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.count):
            raise KeyError(f"internal ids must lie in 0..{self.count - 1}")
        return widen_float16(self._rows[ids]).reshape(ids.size, self.dim)

    def close(self) -> None:
        """Release the catalog store and drop the shards and vector map."""
        self.catalog.close()
        self.shards = []

    def __enter__(self) -> IndexVersion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_manifest(path: Path) -> dict:
    """Read and check a version's manifest.json (format, required keys, metric)."""
    if not path.is_dir():
        raise VersionError(f"index version folder {path} does not exist")
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise VersionError(f"{manifest_path} is missing: {path} is not a complete index version") from exc
    except (OSError, ValueError) as exc:
        raise VersionError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise VersionError(f"{manifest_path}: unsupported format {found!r} (expected {FORMAT!r})")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise VersionError(f"{manifest_path} lacks required keys {missing}")
    if manifest["metric"] != METRIC:
        raise VersionError(f"{manifest_path}: metric {manifest['metric']!r} is not supported (expected {METRIC!r})")
    return manifest


def check_files(path: Path, manifest: dict, verify_checksums: bool) -> None:
    """Every file the manifest lists exists with its recorded size (and SHA-256 when asked)."""
    sizes = manifest.get("file_bytes", {})
    for relative, digest in manifest["files"].items():
        file_path = path / relative
        if not file_path.is_file():
            raise VersionError(f"index version {path} is missing {relative}")
        size = file_path.stat().st_size
        if relative in sizes and size != sizes[relative]:
            raise VersionError(f"{file_path} has {size} bytes, the manifest says {sizes[relative]} (truncated?)")
        if verify_checksums and sha256_file(file_path) != digest:
            raise VersionError(f"{file_path} is corrupt: its SHA-256 differs from the manifest's")


def check_version(path: str | Path) -> dict:
    """The manifest of a version folder after the cheap checks `open_version` starts with (format, required keys,
    every listed file present at its recorded size, shard counts adding up to the count): reads no file but the
    manifest, so `index list` can flag a damaged version without loading it. VersionError says what is wrong."""
    path = Path(path)
    manifest = load_manifest(path)
    check_files(path, manifest, verify_checksums=False)
    if sum(int(entry["count"]) for entry in manifest["shards"]) != int(manifest["count"]):
        raise VersionError(f"index version {path}: the manifest's shard counts do not add up to {manifest['count']}")
    return manifest


def load_shard(path: Path, entry: dict, dim: int, *, mmap: bool = False) -> faiss.Index:
    """Read one Faiss shard and check its dimension and vector count against the manifest.

    mmap=True maps the file instead of reading it (Faiss IO_FLAG_MMAP): cheap when only a few parts
    of the index are touched, e.g. the ids of its inverted lists.
    """
    shard_path = path / entry["path"]
    try:
        index = faiss.read_index(str(shard_path), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as exc:
        raise VersionError(f"Faiss shard {shard_path} cannot be read: {str(exc).splitlines()[0]}") from exc
    if index.d != dim:
        raise VersionError(f"Faiss shard {shard_path} has dim {index.d}, the manifest says {dim}")
    if index.ntotal != entry["count"]:
        raise VersionError(f"Faiss shard {shard_path} holds {index.ntotal} vectors, the manifest says {entry['count']}")
    return index


def load_vectors(path: Path, count: int, dim: int) -> np.ndarray:
    """Memory-map vectors.f16.npy and check its shape and dtype."""
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise VersionError(f"vectors file {path} cannot be read: {exc}") from exc
    if vectors.dtype != np.float16 or vectors.shape != (count, dim):
        raise VersionError(f"vectors file {path} is {vectors.dtype} {vectors.shape}, expected float16 {(count, dim)}")
    return vectors


def widen_float16(values: np.ndarray) -> np.ndarray:
    """float16 -> float32 (exact either way), through torch's vectorised cast when torch is already loaded.

    numpy's cast is scalar (2.7 ms for the 6,400 x 256 re-rank vectors of a 64-query BatchSearch here;
    torch: 0.13 ms). A process that never imported torch (a shard server, a CLI) keeps numpy's cast, so
    importing this module never pulls in torch.
    """
    values = np.ascontiguousarray(values)
    torch = sys.modules.get("torch")
    if torch is None or values.dtype != np.float16 or values.size < 1024 or not values.flags.writeable:
        return np.asarray(values, dtype=np.float32)
    return torch.from_numpy(values).float().numpy()


def open_version(path: str | Path, *, verify_checksums: bool = False,
                 shards: Sequence[int] | None = None) -> IndexVersion:
    """Load an index version folder, checking format, dim and counts; VersionError says what is wrong.

    verify_checksums=True also hashes every file (slow for big versions; the build does it before
    publishing). File sizes are always checked, which catches truncated files cheaply. `shards`
    loads only those Faiss shards (manifest positions; an empty sequence: none), e.g. for an
    engine shard server holding part of the index or a root that holds none; the rest is loaded whole.
    """
    path = Path(path)
    manifest = load_manifest(path)
    check_files(path, manifest, verify_checksums)
    dim, count = int(manifest["dim"]), int(manifest["count"])
    entries = manifest["shards"]
    wanted = list(range(len(entries))) if shards is None else sorted(set(shards))
    outside = [s for s in wanted if not 0 <= s < len(entries)]
    if outside:
        raise VersionError(f"index version {path} has {len(entries)} shards (0..{len(entries) - 1}); "
                           f"there is no shard {', '.join(map(str, outside))}")
    indices = [load_shard(path, entries[s], dim) for s in wanted]
    if shards is None and (not indices or sum(index.ntotal for index in indices) != count):
        raise VersionError(f"index version {path}: shards hold {sum(i.ntotal for i in indices)} vectors, not {count}")
    if sum(int(entry["count"]) for entry in entries) != count:
        raise VersionError(f"index version {path}: the manifest's shard counts do not add up to {count}")
    filters = Filters.load(path / FILTERS, count)
    vectors = load_vectors(path / VECTORS, count, dim)
    catalog = CatalogStore(path / CATALOG, count)
    return IndexVersion(path, manifest, indices, catalog, filters, vectors, wanted)


def new_version_name(root: Path, now: float | None = None) -> str:
    """A fresh version name: UTC timestamp, plus "-N" when that name is taken under root."""
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    name, n = base, 0
    while (root / name).exists() or (root / f".tmp-{name}").exists():
        n += 1
        name = f"{base}-{n}"
    return name


class VersionWriter:
    """Writes one version into ``<root>/.tmp-<name>``; `commit` renames it to ``<root>/<name>``.

    Used as a context manager: leaving it with an exception (or without commit) removes the
    temporary folder, so nothing half-written stays behind.
    """

    def __init__(self, root: str | Path, name: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            self.name = name or new_version_name(self.root)
            self.tmp = self.root / f".tmp-{self.name}"
            if (self.root / self.name).exists():
                raise VersionError(f"index version {self.root / self.name} already exists")
            try:
                self.tmp.mkdir()
                break
            except FileExistsError:
                if name is not None:
                    raise VersionError(f"{self.tmp} exists: another build is writing version {name}") from None
        # Held until commit or abort: a folder whose lock nobody holds was left by a killed writer
        # (remove_abandoned_writes deletes it; it held a whole version's bytes, every killed night again).
        self._lock = os.open(self.tmp / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.shards: list[dict] = []
        self.committed = False

    def write_shards(self, indices: Sequence[faiss.Index]) -> None:
        """Write the Faiss shards as shard-000.faiss, shard-001.faiss, ..."""
        for number, index in enumerate(indices):
            relative = f"shard-{number:03d}.faiss"
            faiss.write_index(index, str(self.tmp / relative))
            self.shards.append({"path": relative, "count": int(index.ntotal)})

    def write_catalog(self, products: Sequence[Product]) -> int:
        """Write catalog.lmdb; returns how many product ids repeated (their first image wins the p: key)."""
        return write_catalog(self.tmp / CATALOG, products)

    def write_filters(self, filters: Filters) -> None:
        """Write filters.npz."""
        filters.save(self.tmp / FILTERS)

    def write_vectors(self, vectors: np.ndarray) -> None:
        """Write vectors.f16.npy (float16, row = internal id)."""
        with open(self.tmp / VECTORS, "wb") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float16), allow_pickle=False)

    def write_manifest(self, fields: dict[str, Any]) -> dict:
        """Write manifest.json: the format fields, shards, file checksums and sizes, plus `fields`."""
        files = data_files(self.tmp)
        manifest = {
            "format": FORMAT,
            "version": self.name,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metric": METRIC,
            "count": sum(shard["count"] for shard in self.shards),
            "shards": self.shards,
            **fields,
            "files": {relative: sha256_file(self.tmp / relative) for relative in files},
            "file_bytes": {relative: (self.tmp / relative).stat().st_size for relative in files},
        }
        self.update_manifest(manifest)
        return manifest

    def update_manifest(self, manifest: dict) -> None:
        """Replace manifest.json in the temporary folder (written to a temp name, then renamed)."""
        tmp_path = self.tmp / f".{MANIFEST}.tmp"
        tmp_path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp_path, self.tmp / MANIFEST)

    def commit(self) -> Path:
        """fsync everything, rename the temporary folder into place, fsync root; returns the version path."""
        final = self.root / self.name
        if final.exists():
            raise VersionError(f"index version {final} already exists")
        fsync_tree(self.tmp)
        os.rename(self.tmp, final)
        fsync_dir(self.root)
        self.committed = True
        (final / WRITER_LOCK).unlink(missing_ok=True)
        self._unlock()
        return final

    def abort(self) -> None:
        """Remove the temporary folder."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1

    def __enter__(self) -> VersionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.abort()


def remove_abandoned_writes(root: str | Path) -> list[str]:
    """Delete what killed processes left under root: the temporary folders of version writers that no live writer
    holds (a build or update killed while writing a version; each held a whole version's bytes) and the .trash-*
    folders of an interrupted prune. Returns the removed names; a temporary folder without a writer lock (written
    before the lock existed) is kept and named in a warning."""
    removed = []
    for path in sorted(Path(root).glob(".t[mr]*-*")):
        if not path.is_dir():
            continue
        if path.name.startswith(".trash-"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
            continue
        if not path.name.startswith(".tmp-"):
            continue
        try:
            handle = os.open(path / WRITER_LOCK, os.O_RDWR)
        except FileNotFoundError:
            if path.exists():
                logger.warning("%s holds no writer lock: left by an older vitrine? remove it by hand when no build "
                               "is writing", path)
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a writer is at work in it
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        finally:
            os.close(handle)
    if removed:
        logger.warning("removed %d folder(s) left under %s by a killed build, update or prune: %s", len(removed), root,
                       ", ".join(removed))
    return removed


def write_version(
    root: str | Path, *, shards: Sequence[faiss.Index], products: Sequence[Product], vectors: np.ndarray,
    fields: dict[str, Any], name: str | None = None, check: Callable[[IndexVersion], dict] | None = None,
) -> Path:
    """Write a complete version under root and return its path (CURRENT is not touched).

    `fields` go into the manifest (model_fingerprint, model_path, dim, factory, search_defaults, ...).
    `check`, when given, runs on the complete version opened from the temporary folder (checksums
    verified) before the rename; it returns manifest fields to add (e.g. validation) or raises, in
    which case nothing is left behind.
    """
    if len(products) != len(vectors):
        raise ValueError(f"{len(products)} products but {len(vectors)} vectors")
    with VersionWriter(root, name) as writer:
        writer.write_shards(shards)
        duplicates = writer.write_catalog(products)
        writer.write_filters(Filters.from_products(products))
        writer.write_vectors(vectors)
        manifest = writer.write_manifest({**fields, "duplicate_product_ids": duplicates})
        if check is not None:
            with open_version(writer.tmp, verify_checksums=True) as version:
                extra = check(version)
            writer.update_manifest({**manifest, **extra})
        return writer.commit()


def _check_name(name: str, where: str) -> str:
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise VersionError(f"{where}: {name!r} is not a version folder name")
    return name


def read_current(root: str | Path) -> str:
    """The name of the live version written in <root>/CURRENT."""
    current = Path(root) / CURRENT
    try:
        name = current.read_text(encoding="utf-8").strip()
    except FileNotFoundError as exc:
        raise VersionError(f"{current} not found: no index version has been published under {root}") from exc
    return _check_name(name, str(current))


def current_version_path(root: str | Path) -> Path:
    """Path of the live version folder; VersionError when CURRENT names a missing folder."""
    path = Path(root) / read_current(root)
    if not path.is_dir():
        raise VersionError(f"{Path(root) / CURRENT} names {path.name}, but {path} does not exist")
    return path


def open_current(root: str | Path, *, verify_checksums: bool = False) -> IndexVersion:
    """Open the live version under root."""
    return open_version(current_version_path(root), verify_checksums=verify_checksums)


def publish_current(root: str | Path, name: str, event: str = "publish") -> None:
    """Make `name` the live version: write a temp file, fsync, os.replace onto CURRENT, fsync root.

    The change is then appended to <root>/HISTORY as `event` ("publish" or "rollback"): a failure to write the
    history is logged and does not undo the publish (CURRENT alone decides what is served).
    """
    if event not in ("publish", "rollback"):
        raise ValueError(f"event must be 'publish' or 'rollback', got {event!r}")
    root = Path(root)
    _check_name(name, "publish_current")
    if not (root / name / MANIFEST).is_file():
        raise VersionError(f"cannot publish {name}: {root / name / MANIFEST} does not exist")
    tmp = root / f".{CURRENT}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.write_text(name + "\n", encoding="utf-8")
    fsync_file(tmp)
    os.replace(tmp, root / CURRENT)
    fsync_dir(root)
    try:
        _append_history(root, event, name)
    except OSError as exc:
        logger.warning("published %s, but could not record it in %s: %s", name, root / HISTORY, exc)


def _append_history(root: Path, event: str, name: str) -> None:
    path = root / HISTORY
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {event} {name}\n"
    if path.is_file() and path.stat().st_size > _HISTORY_MAX_BYTES:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        tmp = root / f".{HISTORY}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        tmp.write_text("".join(lines[len(lines) // 2:]) + line, encoding="utf-8")
        fsync_file(tmp)
        os.replace(tmp, path)
    else:
        with open(path, "a", encoding="utf-8") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())


def live_history(root: str | Path) -> list[str]:
    """The versions that were live, as a stack whose top is the live one: what plain rollbacks walk back through.

    A publish pushes its version; a rollback to a version on the stack pops back to it (so the version rolled
    away from is not gone back to by the next plain rollback), a rollback to one not on it pushes it. Empty when
    <root>/HISTORY is missing or unreadable (a root published before it existed); malformed lines are skipped.
    """
    try:
        text = (Path(root) / HISTORY).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    stack: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3 or fields[1] not in ("publish", "rollback"):
            continue
        _, event, name = fields
        if event == "rollback" and name in stack:
            del stack[stack.index(name) + 1:]
        else:
            if name in stack:
                stack.remove(name)
            stack.append(name)
    return stack


def list_versions(root: str | Path) -> list[str]:
    """Names of the complete versions under root, oldest first (temporary folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()]

    def order(name: str) -> tuple[str, int]:
        match = _NAME_RE.match(name)
        return (name.split("-")[0], int(match.group(1) or 0)) if match else (name, 0)

    return sorted(names, key=order)
