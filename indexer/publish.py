"""Writing a built index into a version folder, publishing it as CURRENT, and pruning old versions.

`write_built_version` assembles a version from Faiss shards (in memory or shard files written by the
add stage), the products, the float16 vectors (a memory map is copied, never loaded) and the image
digests, runs the validation `check` on the complete temporary folder and renames it into place only
when it passed. `publish_version` flips CURRENT atomically, then `prune_versions` keeps the newest
`keep` versions, never deleting CURRENT's target nor the version before it (the rollback target).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.errors import VersionError
from indexer.store import Filters
from indexer.version import (
    IndexVersion,
    VersionWriter,
    list_versions,
    open_version,
    publish_current,
    read_current,
    remove_abandoned_writes,
)
from model.catalog import Product

logger = logging.getLogger("vitrine.indexer")

DIGESTS = "image_sha1.npy"  # optional: (N,) S40 hex SHA-1 of each row's image bytes (incremental updates)


def write_built_version(
    root: str | Path, *, shards: Sequence[faiss.Index | Path], products: Sequence[Product], vectors: np.ndarray,
    fields: dict[str, Any], digests: np.ndarray | None = None, name: str | None = None,
    check: Callable[[IndexVersion], dict] | None = None,
) -> Path:
    """Write, check and commit a version under root; returns its path (CURRENT is not touched)."""
    if len(products) != len(vectors):
        raise ValueError(f"{len(products)} products but {len(vectors)} vectors")
    with VersionWriter(root, name) as writer:
        for number, shard in enumerate(shards):
            relative = f"shard-{number:03d}.faiss"
            if isinstance(shard, Path):
                shutil.copyfile(shard, writer.tmp / relative)
                count = faiss.read_index(str(shard), faiss.IO_FLAG_MMAP).ntotal
            else:
                faiss.write_index(shard, str(writer.tmp / relative))
                count = shard.ntotal
            writer.shards.append({"path": relative, "count": int(count)})
        duplicates = writer.write_catalog(products)
        writer.write_filters(Filters.from_products(products))
        writer.write_vectors(vectors)
        if digests is not None:
            with open(writer.tmp / DIGESTS, "wb") as f:
                np.save(f, np.asarray(digests, dtype="S40"), allow_pickle=False)
        manifest = writer.write_manifest({**fields, "duplicate_product_ids": duplicates})
        if check is not None:
            with open_version(writer.tmp, verify_checksums=True) as version:
                extra = check(version)
            writer.update_manifest({**manifest, **extra})
        return writer.commit()


def load_digests(version_path: Path, count: int) -> np.ndarray | None:
    """The image digests of a version, or None when it has none (built before they were recorded)."""
    path = version_path / DIGESTS
    if not path.is_file():
        return None
    digests = np.load(path, allow_pickle=False)
    return digests if digests.shape == (count,) else None


def remove_version(root: str | Path, name: str) -> None:
    """Delete a version folder: renamed to .trash-<name> first, so it is invisible at once (a prune killed while
    deleting leaves the trash, which `remove_abandoned_writes` clears), then removed."""
    trash = Path(root) / f".trash-{name}"
    (Path(root) / name).rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def removed_from_live(live: IndexVersion, product_ids: Iterable[str], max_fraction: float) -> int | None:
    """How many of the live version's products are not among `product_ids`, when that is more than `max_fraction`
    of them (None when within it): the guard of a full build's publish and of `index update` against publishing
    a version without most of the shop (a truncated export, an images folder that is not mounted)."""
    retained = sum(live.internal_id(product_id) is not None for product_id in set(product_ids))
    removed = live.count - retained
    return removed if live.count and removed > max_fraction * live.count else None


def prune_versions(root: str | Path, keep: int, protect: Sequence[str] = ()) -> list[str]:
    """Delete all but the newest `keep` versions (never CURRENT, the one before it, nor those in `protect`), and what
    killed builds left behind (`remove_abandoned_writes`); returns the deleted version names."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    remove_abandoned_writes(root)
    names = list_versions(root)
    current = read_current(root)
    protected = set(names[-keep:]) | {current} | set(protect)
    if current in names and names.index(current) > 0:
        protected.add(names[names.index(current) - 1])
    deleted = []
    for name in names:
        if name in protected:
            continue
        remove_version(root, name)
        deleted.append(name)
    if deleted:
        logger.info("pruned %d old version(s) under %s: %s", len(deleted), root, ", ".join(deleted))
    return deleted


def publish_version(root: str | Path, name: str, keep: int | None = None) -> list[str]:
    """Make `name` live (atomic CURRENT), then prune to `keep` versions; returns the pruned names."""
    if not (Path(root) / name).is_dir():
        raise VersionError(f"cannot publish {name}: {Path(root) / name} does not exist")
    if keep is not None and keep < 1:  # checked before CURRENT moves: a refused publish must leave it alone
        raise ValueError(f"keep must be >= 1, got {keep}")
    try:
        replaced = [read_current(root)]
    except VersionError:
        replaced = []
    publish_current(root, name)
    logger.info("published %s as CURRENT under %s%s", name, root, f" (was {replaced[0]})" if replaced else "")
    # The version live until now is kept, not only CURRENT's predecessor by name: after a rollback to an older
    # version the next publish pruned that good one and kept the newer one the rollback had moved away from.
    return prune_versions(root, keep, protect=replaced) if keep is not None else []
