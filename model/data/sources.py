"""Where each product's image comes from: a file in the images folder, a path from the CSV, or an http(s) URL.

Real catalogs name their images in many ways: this dataset's `images/<id>.jpg` (`CatalogConfig.image_pattern`),
a column of relative or absolute paths, or a column of URLs (a Shopify export's "Image Src", a Google
Merchant feed's "image_link"): `CatalogConfig.image_column`. `model.catalog.resolve_source` turns a product's source
into a local path or a URL; `fetch_urls` downloads URLs into a cache folder, so that ingest, the nightly
rebuild and `vitrine index update` read local files afterwards.

Downloads: a thread pool (network-bound work), a timeout per request, retries with exponential
back-off on connection errors, timeouts, HTTP 408/429/5xx (a `Retry-After` of at most 30 s is
honoured), a size limit, and no retry on other HTTP errors (a 404 will not come back). A finished
download is written atomically to `<cache>/<sha1 of the URL>`; a failure is not cached, so the next
run tries again. The cache is keyed by URL: an image replaced under the same URL is not seen until
the cache entry is removed (`refresh=True`, `vitrine ingest --refresh-images`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from model.catalog import is_url, resolve_source

__all__ = ["FetchReport", "FetchSettings", "fetch_urls", "is_url", "resolve_source"]

logger = logging.getLogger("vitrine.ingest")

USER_AGENT = "vitrine-ingest/0.1"


@dataclass(frozen=True)
class FetchSettings:
    """How `fetch_urls` downloads."""

    threads: int = 16  # concurrent downloads
    timeout_s: float = 20.0  # per request (connect and each read)
    retries: int = 3  # extra attempts after a retryable failure
    backoff_s: float = 0.5  # first back-off; doubled each retry, with jitter
    max_bytes: int = 32 << 20  # a larger body is refused ("too large")
    refresh: bool = False  # download again even when the cache holds the URL


@dataclass
class FetchReport:
    """What `fetch_urls` did: downloads, cache hits, failures by reason."""

    urls: int = 0
    downloaded: int = 0
    cached: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # reason -> count
    bytes_downloaded: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


class FetchError(Exception):
    """One URL could not be downloaded; `reason` is short and countable ("HTTP 404", "timeout")."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


def cache_path(cache_dir: Path, url: str) -> Path:
    """Where the download of `url` lives in the cache."""
    return cache_dir / hashlib.sha1(url.encode("utf-8")).hexdigest()


def _get(url: str, settings: FetchSettings) -> bytes:
    """The body of one GET, or FetchError (its __cause__ keeps the server's headers, for Retry-After)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"})
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout_s) as response:  # noqa: S310 - http(s) only
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > settings.max_bytes:
                raise FetchError(f"too large (> {settings.max_bytes >> 20} MiB)", retryable=False)
            body = response.read(settings.max_bytes + 1)
    except urllib.error.HTTPError as exc:
        retryable = exc.code in (408, 429) or exc.code >= 500
        raise FetchError(f"HTTP {exc.code}", retryable) from exc
    except TimeoutError as exc:
        raise FetchError("timeout", retryable=True) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise FetchError("timeout", retryable=True) from exc
        raise FetchError(f"connection error ({type(exc.reason).__name__})", retryable=True) from exc
    except (ConnectionError, OSError) as exc:  # reset mid-body, incomplete read
        raise FetchError(f"connection error ({type(exc).__name__})", retryable=True) from exc
    if len(body) > settings.max_bytes:
        raise FetchError(f"too large (> {settings.max_bytes >> 20} MiB)", retryable=False)
    if not body:
        raise FetchError("empty body", retryable=True)
    return body


def _retry_after(exc: FetchError) -> float | None:
    cause = exc.__cause__
    if isinstance(cause, urllib.error.HTTPError) and cause.headers is not None:
        value = cause.headers.get("Retry-After", "")
        if value.strip().isdigit():
            return min(30.0, float(value))
    return None


def download(url: str, target: Path, settings: FetchSettings) -> int:
    """Download `url` to `target` atomically, retrying what may pass; bytes written, or FetchError."""
    for attempt in range(settings.retries + 1):
        try:
            body = _get(url, settings)
            break
        except FetchError as exc:
            if not exc.retryable or attempt == settings.retries:
                raise
            pause = _retry_after(exc) or settings.backoff_s * (2 ** attempt) * (0.5 + random.random())
            time.sleep(pause)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{id(body)}")
    tmp.write_bytes(body)
    os.replace(tmp, target)
    return len(body)


def fetch_urls(urls: Iterable[str], cache_dir: str | Path, settings: FetchSettings = FetchSettings(), *,
               progress: bool = True) -> tuple[dict[str, str], FetchReport]:
    """Download every URL not yet in `cache_dir`: ({url: local path or "" when it failed}, report).

    Failures are logged once per URL (first 20) and counted by reason; they never raise.
    """
    start = time.perf_counter()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(urls))
    report = FetchReport(urls=len(unique))
    paths: dict[str, str] = {}
    todo = []
    for url in unique:
        target = cache_path(cache, url)
        if target.is_file() and not settings.refresh:
            paths[url] = str(target)
            report.cached += 1
        else:
            todo.append(url)
    errors: Counter[str] = Counter()

    def one(url: str) -> tuple[str, int, str]:
        try:
            return url, download(url, cache_path(cache, url), settings), ""
        except FetchError as exc:
            return url, 0, exc.reason

    if todo:
        with ThreadPoolExecutor(max(1, settings.threads), thread_name_prefix="vitrine-fetch") as pool, \
                tqdm(total=len(todo), desc="download", unit="img", disable=not progress, mininterval=1.0) as bar:
            for url, size, reason in pool.map(one, todo):
                bar.update(1)
                if reason:
                    errors[reason] += 1
                    paths[url] = ""
                    if sum(errors.values()) <= 20:
                        logger.warning("download failed: %s: %s", url, reason)
                    continue
                paths[url] = str(cache_path(cache, url))
                report.downloaded += 1
                report.bytes_downloaded += size
    report.failed = sum(errors.values())
    report.errors = dict(sorted(errors.items()))
    report.seconds = round(time.perf_counter() - start, 3)
    if unique:
        logger.info("download: %d URL(s): %d downloaded (%.1f MiB), %d from the cache %s, %d failed%s",
                    report.urls, report.downloaded, report.bytes_downloaded / 2**20, report.cached, cache,
                    report.failed, f" {report.errors}" if report.errors else "")
    return paths, report
