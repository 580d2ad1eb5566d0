"""Incremental update: a new catalog CSV applied to the live version, into a new validated version.

Each product of the new catalog is matched by product id to the live version:

- unchanged image (same SHA-1 of the image bytes, recorded in the version's ``image_sha1.npy``): its
  stored float16 embedding is reused, with the new metadata (a price or stock change costs nothing);
- new product or changed image: the image is embedded with the live version's model (same fingerprint);
- live products missing from the new catalog are deleted.

The live version's trained index (coarse quantizer, PQ codebooks) is cloned empty and refilled with
every vector under fresh internal ids 0..N-1 (dense ids keep the version format unchanged), sharded by
sha1(product id) as before. The result is validated and published exactly like a full build; a failing
gate leaves CURRENT untouched. Rows without an image or with an undecodable one are counted, not indexed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.build import build_index_from_vectors
from indexer.errors import ValidationFailed
from indexer.plan import IndexPlan, plan_from_factory
from indexer.publish import load_digests, removed_from_live
from indexer.version import IndexVersion, open_current
from model.catalog import Product

logger = logging.getLogger("vitrine.indexer")


@dataclass(frozen=True)
class IndexUpdateConfig:
    """Configuration of one incremental update; saved as build_config in the new version's manifest."""

    csv_path: str | Path  # the whole new catalog (one row per product)
    images_dir: str | Path | None  # folder of the catalog's images (image_pattern inside it, or where the
    # image_column's relative paths start; None: the CSV's folder, only with an image_column)
    index_root: str | Path  # holds CURRENT (the live version updated) and the new version
    catalog_config: str | Path | None = None  # JSON column mapping; None: CatalogConfig defaults
    model: str | Path | None = None  # checkpoint; None: the live version's model_path (same fingerprint required)
    batch_size: int = 64  # images per embedding forward pass
    precision: str = "auto"  # embedder arithmetic (model.embedder.resolve_precision)
    factory: str | None = None  # must be None or the live factory: the update reuses the trained index
    nprobe: int | None = None  # default lists probed per query; None: the live version's
    num_shards: int | None = None  # None: as many shards as the live version
    seed: int = 0  # seeds the validation queries
    validation_queries: int = 256  # catalog vectors used as validation queries
    min_recall_at_10: float = 0.95  # validation floor with re-ranking (exact indices need 1.0)
    tune_search: bool = True  # the gate may raise nprobe / re-rank to reach the floor (False: fail instead)
    keep_versions: int | None = 5  # versions kept after publishing
    use_gpu: bool | None = None  # unused by the update's add (kept for flag parity with the build)
    publish: bool = True  # point CURRENT at the new version when validation passes
    image_cache: str | Path | None = None  # downloaded image URLs (None: <index_root>/.image-cache)
    image_max_age_h: float = 20.0  # cached image URLs older than this are revalidated (conditional GET)
    max_removed_fraction: float = 0.5  # refuse (CURRENT untouched) an update that would take more than this fraction
    # of the live products out of the index (deleted rows, missing or bad images): a truncated export or an images
    # folder that is not mounted; 1.0 allows any

    def __post_init__(self) -> None:
        for name, value in (("nprobe", self.nprobe), ("batch_size", self.batch_size), ("num_shards", self.num_shards)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0.0 <= self.max_removed_fraction <= 1.0:
            raise ValueError("max_removed_fraction (--max-removed) must lie in [0, 1], "
                             f"got {self.max_removed_fraction}")
        if not 0.0 <= self.min_recall_at_10 <= 1.0:  # above 1 no build could pass (0: no recall floor)
            raise ValueError(f"min_recall_at_10 (--min-recall) must lie in [0, 1], got {self.min_recall_at_10}")
        if self.keep_versions is not None and self.keep_versions < 1:  # it failed after publishing, exit 2
            raise ValueError(f"keep_versions (--keep) must be at least 1, got {self.keep_versions}")


def _read_catalog(config: IndexUpdateConfig) -> tuple[list[Product], dict[str, Any], list[str], set[int]]:
    """The new catalog's products, its read report, and each product's image as a local path (URLs downloaded)."""
    from model.catalog import CatalogConfig, load_catalog_config, read_catalog
    from model.data.ingest import local_sources
    from model.data.sources import FetchSettings

    catalog = load_catalog_config(config.catalog_config) if config.catalog_config else CatalogConfig()
    if config.images_dir is None and catalog.image_column is None:
        raise ValueError("an images folder is needed: the catalog config names no image_column, so images are "
                         f"found as {catalog.image_pattern!r} inside the images folder")
    if not config.image_max_age_h >= 0:
        raise ValueError(f"image_max_age_h must be at least 0, got {config.image_max_age_h}")
    images_dir = Path(config.images_dir) if config.images_dir is not None else Path(config.csv_path).resolve().parent
    table = read_catalog(config.csv_path, catalog)
    sources = local_sources(table.images, images_dir, config.image_cache or Path(config.index_root) / ".image-cache",
                            FetchSettings(max_age_s=config.image_max_age_h * 3600.0), progress=True)
    report: dict[str, Any] = dict(table.report)
    if sources.downloads:
        report["downloads"] = sources.downloads
    if sources.unsupported:
        report["unsupported_sources"] = sources.unsupported
    return table.products, report, sources.paths, sources.failed


def _live_rows(live: IndexVersion) -> tuple[dict[str, int], np.ndarray | None]:
    """product id -> live internal id, and the live image digests (None when the version has none)."""
    ids: dict[str, int] = {}
    for start in range(0, live.count, 10_000):
        for offset, product in enumerate(live.products(range(start, min(live.count, start + 10_000)))):
            ids.setdefault(product.product_id, start + offset)
    return ids, load_digests(live.path, live.count)


def diff_catalog(live: IndexVersion, products: list[Product], sources: list[str], failed: AbstractSet[int] = frozenset()
                 ) -> tuple[list[tuple[Product, str, str, int | None]], dict[str, int]]:
    """Rows of the new version: (product, image file to embed or "" when reused, sha1, live id to reuse or None).

    Image bytes are read here only for their digest and not kept (an update adding many photos held them all).

    `sources[i]` is the local image file of `products[i]` ("" when none is named or, for the positions
    in `failed`, when its URL could not be downloaded: ingest.local_sources).
    """

    live_ids, digests = _live_rows(live)
    counts = {"unchanged": 0, "metadata_changed": 0, "image_changed": 0, "added": 0, "missing_image": 0,
              "duplicate_ids": 0}
    rows: list[tuple[Product, str, str, int | None]] = []
    seen: set[str] = set()
    for position, (product, source) in enumerate(zip(products, sources, strict=True)):
        if product.product_id in seen:
            counts["duplicate_ids"] += 1
            continue
        seen.add(product.product_id)
        path = Path(source)
        if not source or not path.is_file():
            counts["missing_image"] += 1
            where = "its URL could not be downloaded" if position in failed else f"none at {source or '(no path)'}"
            logger.warning("update: no image for product %s (%s): not indexed", product.product_id, where)
            continue
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        live_id = live_ids.get(product.product_id)
        if live_id is not None and digests is not None and digests[live_id].decode() == digest:
            same = live.product(live_id) == product
            counts["unchanged" if same else "metadata_changed"] += 1
            rows.append((product, "", digest, live_id))
        else:
            counts["added" if live_id is None else "image_changed"] += 1
            rows.append((product, source, digest, None))
    counts["deleted"] = len(set(live_ids) - seen)
    return rows, counts


def _embed_rows(rows: list[tuple[Product, str, str, int | None]], live: IndexVersion, embedder: Any,
                batch_size: int) -> tuple[np.ndarray, list[Product], np.ndarray, list[int]]:
    """float16 vectors of the rows (reused or embedded), their products and digests, and the positions in `rows`
    of the undecodable images (skipped).

    Images are read, decoded and brought to the model's input one at a time and embedded a batch at a time, so
    memory does not grow with the number of new images or their size (an update adding thousands of photos
    held every decoded image at once)."""
    from model.images import ImageDecodeError

    vectors = np.zeros((len(rows), live.dim), dtype=np.float16)
    keep = np.ones(len(rows), dtype=bool)
    batch: list[tuple[int, Any]] = []

    def flush() -> None:
        if batch:
            embedded = embedder.embed_pixels(np.stack([pixels for _, pixels in batch]))
            vectors[[row for row, _ in batch]] = embedded.astype(np.float16)
            batch.clear()

    for row, (product, source, _, live_id) in enumerate(rows):
        if live_id is not None:
            vectors[row] = live.vectors[live_id]
            continue
        try:
            batch.append((row, embedder.preprocess_uint8(embedder.decode(Path(source).read_bytes()))))
        except (ImageDecodeError, OSError) as exc:
            keep[row] = False
            logger.warning("update: skipping product %s: bad image %s: %s", product.product_id, source, exc)
            continue
        if len(batch) == batch_size:
            flush()
    flush()
    digests = np.array([digest for _, _, digest, _ in rows], dtype="S40")
    products = [rows[i][0] for i in np.flatnonzero(keep)]
    return vectors[keep], products, digests[keep], np.flatnonzero(~keep).tolist()


def _check_removed(live: IndexVersion, kept: list[Product], counts: dict[str, int], max_fraction: float) -> None:
    """ValidationFailed when more than `max_fraction` of the live products would leave the index: a truncated
    export (its missing rows are deletions) or an images folder that is not there (every image missing) looks
    like a catalog change and was published, taking most of the shop out of search."""
    removed = removed_from_live(live, (product.product_id for product in kept), max_fraction)
    if removed is not None:
        raise ValidationFailed(
            f"the update would take {removed} of the {live.count} products of {live.name} out of the index "
            f"({removed / live.count:.0%}, over the limit of {max_fraction:.0%}: {counts['deleted']} not in the new "
            f"catalog, the others with a missing or bad image); is the export complete and the images folder there? "
            "Pass --max-removed 1 to apply it anyway", {"update": counts})


def _live_plan(live: IndexVersion, n: int, nprobe: int | None) -> IndexPlan:
    stored = live.manifest.get("plan")
    plan = IndexPlan(**stored) if isinstance(stored, dict) \
        else plan_from_factory(live.factory, n, live.dim, trains=False)
    defaults = live.manifest.get("search_defaults", {})
    return IndexPlan(**{**plan.to_json(), "nprobe": int(nprobe or defaults.get("nprobe", plan.nprobe)),
                        "rerank_factor": int(defaults.get("rerank_factor", plan.rerank_factor))})


def update_index(config: IndexUpdateConfig) -> tuple[Path, dict[str, Any]]:
    """Apply the new catalog to the live version; returns (new version path, report of what changed, with the
    CSV's read report under "catalog").

    One job per index root: StageError while a build (in the root's default work folder) or another update runs."""
    from indexer.job import root_lock

    with root_lock(config.index_root):
        return _update(config)


def _update(config: IndexUpdateConfig) -> tuple[Path, dict[str, Any]]:
    from model.embedder import Embedder

    products, catalog_report, sources, failed = _read_catalog(config)
    if not products:
        raise ValueError(f"{config.csv_path} has no usable rows: refusing to delete every product of the index")
    with open_current(config.index_root, verify_checksums=True) as live:
        if config.factory is not None and config.factory != live.factory:
            raise ValueError(f"the update reuses the live index {live.factory}; run `vitrine index build` to "
                             f"change it to {config.factory}")
        if config.model is None and not Path(live.manifest["model_path"]).is_dir():  # "no model card at ..." only
            raise ValueError(f"the live version {live.name} was built with the model {live.manifest['model_path']}, "
                             "which is not there any more: pass --model with that checkpoint's folder (the same "
                             "weights), or run a full `vitrine index build` with another model")
        embedder = Embedder.load(config.model or live.manifest["model_path"], precision=config.precision)
        if embedder.fingerprint != live.model_fingerprint:
            raise ValueError(f"model {config.model or live.manifest['model_path']} has fingerprint "
                             f"{embedder.fingerprint[:12]}..., the live version {live.name} was built with "
                             f"{live.model_fingerprint[:12]}...: run a full `vitrine index build`")
        rows, counts = diff_catalog(live, products, sources, failed)
        vectors, kept, digests, bad = _embed_rows(rows, live, embedder, config.batch_size)
        for row in bad:  # counted once, as a bad image: not also as added or changed (it is neither in the index)
            counts["added" if live.internal_id(rows[row][0].product_id) is None else "image_changed"] -= 1
        counts["bad_image"] = len(bad)
        if not kept:
            raise ValueError("the new catalog has no product with a usable image: refusing to publish an empty index")
        _check_removed(live, kept, counts, config.max_removed_fraction)
        trained = faiss.clone_index(live.shards[0])
        trained.reset()  # empty, trained: the live quantizer and codebooks
        plan = _live_plan(live, len(kept), config.nprobe)
        num_shards = config.num_shards or len(live.shards)
        base, model_path = live.name, live.manifest["model_path"] if config.model is None else config.model
    logger.info("update of %s: %s", base, counts)
    dropped = {key: value for key, value in catalog_report.items()
               if value and (key.startswith(("rows_bad", "bad_", "stock_unrecognised")) or key == "duplicate_ids")}
    if dropped:  # was only in the new manifest: the operator never heard of rows without an id, bad prices, ...
        logger.warning("update: catalog rows with problems in %s: %s", config.csv_path, dropped)
    report = {"base_version": base, **counts, "count": len(kept)}
    path = build_index_from_vectors(
        vectors, kept, config.index_root, embedder.fingerprint, model_path, plan=plan, trained=trained,
        num_shards=num_shards, seed=config.seed, validation_queries=config.validation_queries,
        min_recall_at_10=config.min_recall_at_10, tune_search=config.tune_search, publish=config.publish,
        keep_versions=config.keep_versions,
        digests=digests, build_config={k: str(v) for k, v in config.__dict__.items()},
        catalog_report=catalog_report, extra_manifest={"update": report})
    return path, {**report, "catalog": catalog_report}  # the CSV's rows dropped or repaired, as ingest prints them
