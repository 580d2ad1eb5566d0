"""Ingest: catalog CSV + images (a folder, paths or URLs) -> LMDB shards of bounded record count + manifest.json.

Each product's image is `CatalogConfig.image_pattern` in the images folder, or what its
`image_column` names: a path or an http(s) URL, downloaded first into a cache folder
(model.data.sources). Every image is validated by decoding it; missing, undownloadable and
undecodable images are counted (with reasons) and not stored. Output is written under a temporary
folder name and renamed at the end, so a half-written output is never taken for a finished one; a
finished output is reused (idempotent).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
from PIL import Image
from tqdm import tqdm

from model.catalog import CatalogConfig, Product, is_url, read_catalog, resolve_source
from model.data.shards import (
    COUNT_KEY,
    SHARDS_FORMAT,
    encode_record,
    load_shards_manifest,
    record_key,
    source_digest_key,
)
from model.data.sources import FetchSettings, fetch_urls
from model.files import sha256_file
from model.images import ImageDecodeError, decode_image

DEFAULT_MAX_RECORDS_PER_SHARD = 4096
MAX_LISTED = 20  # missing or bad images named in the log and in the report (the rest are counted)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")  # a URL's scheme (a Windows "C:\\" path has no "//")
logger = logging.getLogger("vitrine.ingest")


@dataclass
class IngestReport:
    """What ingest read, stored and dropped (with reasons)."""

    rows_read: int = 0
    products: int = 0  # products read from the CSV (after repair, dedup)
    records: int = 0  # records stored in shards
    shards: int = 0
    missing_images: int = 0  # no image named, or no file where one was named
    failed_downloads: int = 0  # image URLs that could not be downloaded (reasons in downloads["errors"])
    bad_images: int = 0
    bad_image_reasons: dict[str, int] = field(default_factory=dict)  # reason -> products (e.g. "corrupt or
    # truncated image": 3)
    image_problems: list[dict[str, str]] = field(default_factory=list)  # the first MAX_LISTED missing or bad images:
    # {"product_id", "image" (path), "problem"}, so that they can be found and fixed
    catalog: dict[str, int] = field(default_factory=dict)  # read_catalog's report
    downloads: dict[str, Any] = field(default_factory=dict)  # model.data.sources.FetchReport when URLs were named
    unsupported_sources: dict[str, int] = field(default_factory=dict)  # e.g. {"s3://": 12}: counted as missing
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IngestReport:
        """Report from a `to_json` dict (e.g. a manifest's "report")."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def prepare_image(path: str, max_side: int | None = None) -> tuple[bytes | None, str]:
    """(bytes to store, "") when the image file exists and decodes, else (None, reason): `prepare_record`
    without the source file's digest."""
    data, reason, _ = prepare_record(path, max_side)
    return data, reason


def prepare_record(path: str, max_side: int | None = None) -> tuple[bytes | None, str, str]:
    """(bytes to store, "", source digest) when the image file exists and decodes, else (None, reason, "").

    With `max_side`, an image whose longer side exceeds it is downscaled and re-encoded as JPEG (quality
    90), so shards of phone photos stay small; other images are stored as given (no generation loss).
    The source digest is the SHA-1 of the file's bytes when they were re-encoded ("" when stored as given: the
    stored bytes are the file's). Runs in ingest worker processes, hence plain arguments and no exceptions for
    bad input.
    """
    file = Path(path)
    if not path or not file.is_file():
        return None, "missing", ""
    data = file.read_bytes()
    # with max_side, a large JPEG decodes at the reduced scale that still covers max_side both ways; without,
    # the image is only validated (every byte of it is still decoded), at the smallest scale
    try:
        image = decode_image(data, min_size=(1, 1) if max_side is None else (max_side, max_side))
    except ImageDecodeError as exc:
        return None, str(exc), ""
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        buffer = io.BytesIO()
        image.resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue(), "", hashlib.sha1(data).hexdigest()
    return data, "", ""


def _prepare_star(args: tuple[str, int | None]) -> tuple[bytes | None, str, str]:
    return prepare_record(*args)


def _write_shard(path: Path, records: list[tuple[Product, bytes, str]]) -> dict[str, Any]:
    """Write one LMDB shard of (product, stored image bytes, source digest or ""); returns its manifest entry
    (path, record count, sha256 of data.mdb)."""
    values = [encode_record(product, data) for product, data, _ in records]
    # Room for the values plus LMDB's per-record and B-tree overhead, with generous headroom.
    map_size = max(1 << 20, 2 * sum(len(v) + 64 for v in values) + (1 << 20))
    # meminit: LMDB zeroes the unused bytes of its pages (without it they held whatever the process's heap held
    # there, so the same records made a different data.mdb, its sha256 and the training data's fingerprint)
    env = lmdb.open(str(path), map_size=map_size, subdir=True, meminit=True, map_async=False)
    try:
        with env.begin(write=True) as txn:
            for index, value in enumerate(values):
                txn.put(record_key(index), value)
                if records[index][2]:
                    txn.put(source_digest_key(index), records[index][2].encode("ascii"))
            txn.put(COUNT_KEY, struct.pack(">Q", len(values)))
        env.sync(True)
    finally:
        env.close()
    lock = path / "lock.mdb"
    if lock.exists():
        lock.unlink()
    return {"path": path.name, "records": len(values), "sha256": sha256_file(path / "data.mdb")}


def _existing_report(out_dir: Path, inputs: dict[str, Any]) -> IngestReport | None:
    """The report of a finished ingest of the same `inputs` in out_dir, None when out_dir does not exist;
    FileExistsError when it holds something else (a half-written output, or an ingest of another CSV, column
    mapping, images folder or --max-side: reusing it would silently ignore the new catalog)."""
    if not out_dir.exists():
        return None
    if not (out_dir / "manifest.json").is_file():
        raise FileExistsError(f"{out_dir} exists but holds no manifest.json (not a finished ingest): remove it "
                              "or choose another output folder")
    manifest = load_shards_manifest(out_dir)
    held = manifest.get("inputs")
    if held is not None:
        changed = [key for key in sorted(inputs) if held.get(key) != inputs[key]]
        if changed:
            what = ", ".join("the CSV's contents" if key == "csv_sha256" else key for key in changed)
            raise FileExistsError(f"{out_dir} holds a finished ingest of other inputs ({what} differ): pass "
                                  "--overwrite to replace it, or choose another --out")
    logger.info("%s holds a finished ingest of this catalog: reusing it (--overwrite to ingest again)", out_dir)
    return IngestReport.from_json(manifest["report"])


def _ingest_inputs(csv_path: str | Path, images_dir: Path, config: CatalogConfig,
                   max_side: int | None) -> dict[str, Any]:
    """What an ingest's output depends on (recorded in its manifest as "inputs"), but for the image files."""
    return {"csv_sha256": sha256_file(Path(csv_path)), "images_dir": str(images_dir.resolve()),
            "catalog_config": config.to_json(), "max_side": max_side}


class NoUsableImages(ValueError):
    """Not one product of the catalog had a readable image: nothing was written. `report` says why, per image."""

    def __init__(self, report: IngestReport, out_dir: Path, images_dir: Path, config: CatalogConfig) -> None:
        self.report = report
        first = report.image_problems[0] if report.image_problems else None
        example = f"; e.g. product {first['product_id']}: {first['image']}: {first['problem']}" if first else ""
        where = f"the image column {config.image_column!r}" if config.image_column else \
            f"{config.image_pattern!r} inside {images_dir} (--images)"
        super().__init__(
            f"none of the catalog's {report.products} products has a usable image ({report.missing_images} missing, "
            f"{report.bad_images} unreadable, {report.failed_downloads} failed downloads){example}: nothing was "
            f"written to {out_dir}. Check where the images are looked for: {where}")


def default_image_cache(out_dir: str | Path) -> Path:
    """Where ingest keeps downloaded images by default: a hidden folder beside the output folder."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.image-cache")


def build_shards(csv_path: str | Path, images_dir: str | Path | None, out_dir: str | Path, config: CatalogConfig, *,
                 max_records_per_shard: int = DEFAULT_MAX_RECORDS_PER_SHARD, overwrite: bool = False,
                 progress: bool = True, workers: int = 0, max_side: int | None = None,
                 image_cache: str | Path | None = None, fetch: FetchSettings | None = None) -> IngestReport:
    """Ingest a catalog into `out_dir/shard-00000.lmdb`, ... and `out_dir/manifest.json`.

    `images_dir` holds the images named by `config.image_pattern`, or is where relative paths of
    `config.image_column` start (None: the CSV's folder; only with an image column). Image URLs are
    downloaded into `image_cache` (default `default_image_cache(out_dir)`) with `fetch` settings.
    `workers` processes decode and validate images (0: one per CPU core); `max_side` (pixels)
    downscales and re-encodes larger images.

    When `out_dir` already holds a finished ingest of the same CSV contents, column mapping, images folder and
    `max_side` it is kept and its report returned, unless `overwrite`; one of other inputs raises FileExistsError.
    """
    if max_records_per_shard <= 0:
        raise ValueError(f"max_records_per_shard must be positive, got {max_records_per_shard}")
    if max_side is not None and max_side <= 0:  # 0 shrank every image to 1x1 pixel
        raise ValueError(f"max_side must be a positive number of pixels (leave it unset to store images as they "
                         f"are), got {max_side}")
    out_dir = Path(out_dir)
    if images_dir is None:
        if config.image_column is None:
            raise ValueError("an images folder is needed: the catalog config names no image_column, so images are "
                             f"found as {config.image_pattern!r} inside the images folder")
        images_dir = Path(csv_path).resolve().parent
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder {images_dir} does not exist")
    inputs = _ingest_inputs(csv_path, images_dir, config, max_side)
    if not overwrite and (existing := _existing_report(out_dir, inputs)) is not None:
        return existing
    start = time.perf_counter()
    table = read_catalog(csv_path, config)
    report = IngestReport(rows_read=table.report.get("rows_read", 0), products=len(table.products),
                          catalog=table.report)
    sources = local_sources(table.images, images_dir, image_cache or default_image_cache(out_dir), fetch, progress)
    report.failed_downloads = len(sources.failed)
    report.downloads, report.unsupported_sources = sources.downloads, sources.unsupported
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    options = {"workers": workers, "max_side": max_side, "progress": progress, "failed_downloads": sources.failed}
    entries = _write_all_shards(table.products, sources.paths, tmp, max_records_per_shard, report, options)
    report.shards, report.records = len(entries), sum(e["records"] for e in entries)
    report.seconds = round(time.perf_counter() - start, 3)
    if report.records == 0:  # shards without one record train and index nothing; a previous ingest stays as it was
        shutil.rmtree(tmp)
        raise NoUsableImages(report, out_dir, images_dir, config)
    manifest = {"format": SHARDS_FORMAT, "catalog_config": config.to_json(), "max_side": max_side, "shards": entries,
                "records": report.records, "report": report.to_json(), "inputs": inputs}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return report


@dataclass
class LocalSources:
    """Each product's image as a local file (local_sources): what ingest, the update and the harness read."""

    paths: list[str]  # local path per product; "" when none is named, its scheme is not fetched or its download failed
    failed: set[int]  # positions whose URL could not be downloaded
    downloads: dict[str, Any] = field(default_factory=dict)  # model.data.sources.FetchReport when URLs were named
    unsupported: dict[str, int] = field(default_factory=dict)  # e.g. {"s3://": 12}: schemes not fetched


def local_sources(images: list[str], images_dir: Path, cache: str | Path, fetch: FetchSettings | None,
                  progress: bool) -> LocalSources:
    """Each product's image source as a local path, downloading its URLs into `cache` first."""
    unsupported = [bool(_SCHEME.match(source)) and not is_url(source) for source in images]
    schemes = Counter(source.split("://", 1)[0].lower() for source, skip in zip(images, unsupported, strict=True)
                      if skip)
    if schemes:  # s3://, gs://, ftp://...: not fetched; the products count as missing images
        logger.warning("image sources with the scheme(s) %s are not supported (%d products): copy those images "
                       "to a folder, or serve them over http(s)", ", ".join(f"{k}://" for k in sorted(schemes)),
                       sum(schemes.values()))
    resolved = ["" if skip or not source else resolve_source(source, images_dir)
                for source, skip in zip(images, unsupported, strict=True)]
    result = LocalSources(resolved, set(), unsupported={f"{k}://": v for k, v in sorted(schemes.items())})
    urls = [source for source in resolved if is_url(source)]
    if not urls:
        return result
    paths, fetched = fetch_urls(urls, cache, fetch or FetchSettings(), progress=progress)
    result.downloads = fetched.to_json()
    result.failed = {i for i, source in enumerate(resolved) if is_url(source) and not paths[source]}
    result.paths = [paths[source] if is_url(source) else source for source in resolved]
    return result


def reason_key(message: str) -> str:
    """An ImageDecodeError message as a countable reason: without its details (sizes, byte counts, the decoder's
    words), e.g. "corrupt or truncated image (515 bytes): Truncated File Read" -> "corrupt or truncated image"."""
    return re.sub(r"\d+(x\d+)?", "N", re.sub(r"\s*\(.*", "", message.split(":")[0])).strip()[:80]


def _name_problem(report: IngestReport, product: Product, source: str, problem: str) -> None:
    """Log and list (the first MAX_LISTED) a product whose image is missing or bad."""
    listed = report.missing_images + report.bad_images
    if listed <= MAX_LISTED:
        report.image_problems.append({"product_id": product.product_id, "image": source or "(none named)",
                                      "problem": problem})
        logger.warning("product %s: image %s: %s%s", product.product_id, source or "(none named)", problem,
                       " (further ones are counted, not named)" if listed == MAX_LISTED else "")


def _write_all_shards(products: list[Product], sources: list[str], tmp: Path, max_records: int,
                      report: IngestReport, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Validate (and maybe re-encode) images in worker processes; write shards of at most `max_records`.

    Workers decode in parallel while this process writes shards in catalog order (`imap` keeps order),
    so the output is the same whatever the number of workers.
    """
    reasons: Counter[str] = Counter()
    entries: list[dict[str, Any]] = []
    pending: list[tuple[Product, bytes, str]] = []
    jobs = [(source, options["max_side"]) for source in sources]
    workers = options["workers"] or os.cpu_count() or 1
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_prepare_star, jobs, chunksize=64) if pool else map(_prepare_star, jobs)
        failed = options.get("failed_downloads", set())
        for position, (product, (data, reason, digest)) in tqdm(enumerate(zip(products, results, strict=True)),
                                                        total=len(products), desc="ingest", unit="img",
                                                        disable=not options["progress"], mininterval=1.0):
            if data is None:
                if position in failed:
                    pass  # counted in report.failed_downloads
                elif reason == "missing":
                    report.missing_images += 1
                    _name_problem(report, product, sources[position], "missing: no such file" if sources[position]
                                  else "no image: its cell is empty or names a scheme that is not fetched")
                else:
                    report.bad_images += 1
                    reasons[reason_key(reason)] += 1
                    _name_problem(report, product, sources[position], reason)
                continue
            pending.append((product, data, digest))
            if len(pending) == max_records:
                entries.append(_write_shard(tmp / f"shard-{len(entries):05d}.lmdb", pending))
                pending = []
    finally:
        if pool is not None:
            pool.terminate()
    if pending:
        entries.append(_write_shard(tmp / f"shard-{len(entries):05d}.lmdb", pending))
    report.bad_image_reasons = dict(sorted(reasons.items()))
    return entries
