"""Where each product's image comes from: a file in the images folder, a path from the CSV, or an http(s) URL.

Real catalogs name their images in many ways: this dataset's `images/<id>.jpg` (`CatalogConfig.image_pattern`),
a column of relative or absolute paths, or a column of URLs (a Shopify export's "Image Src", a Google
Merchant feed's "image_link"): `CatalogConfig.image_column`. `model.catalog.resolve_source` turns a product's source
into a local path or a URL; `fetch_urls` downloads URLs into a cache folder, so that ingest, the nightly
rebuild and `vitrine index update` read local files afterwards.

Downloads: a thread pool (network-bound work), a timeout per request, retries with exponential
back-off on connection errors, timeouts, HTTP 408/429/5xx (a `Retry-After` of at most 30 s is
honoured), a size limit, and no retry on other HTTP errors (a 404 will not come back). A finished
download is written atomically to `<cache>/<2 hex digits>/<sha1 of the URL>`, with `<sha1>.json` beside it (the URL,
the server's ETag and Last-Modified, when it was checked); a failure is not cached, so the next run
tries again.

Shops replace images under the same URL (a CDN path made of the product id), so a cached copy older
than `max_age_s` (default 20 hours: every nightly run) is revalidated with a conditional GET
(If-None-Match / If-Modified-Since): 304 Not Modified keeps it at the cost of one small request, 200
replaces it. When the revalidation fails (the CDN is down), the cached copy is used and counted as
`stale`. `refresh=True` (`vitrine ingest --refresh-images`) downloads everything again unconditionally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
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
    refresh: bool = False  # download again (unconditionally) even when the cache holds the URL
    max_age_s: float = 20 * 3600.0  # a cached copy older than this is revalidated (0: always; inf: never)


@dataclass
class FetchReport:
    """What `fetch_urls` did: downloads, cache hits, failures by reason."""

    urls: int = 0
    downloaded: int = 0  # new or changed images fetched whole
    cached: int = 0  # cached copies used without asking the server (younger than max_age_s)
    not_modified: int = 0  # cached copies revalidated: the server answered 304
    stale: int = 0  # cached copies used because their revalidation failed
    failed: int = 0  # URLs with no image: download failed and nothing cached
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
    """Where the download of `url` lives in the cache: <cache>/<2 hex digits>/<sha1 of the URL>, so that a
    catalog of millions of images spreads over 256 folders instead of one."""
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()
    return cache_dir / digest[:2] / digest


def request_url(url: str) -> str:
    """`url` as it goes on the wire: spaces, non-ASCII characters and other bytes a request line cannot carry are
    percent-encoded (UTF-8) and a non-ASCII host name is IDNA-encoded, as browsers do; an already encoded URL is
    unchanged. Hand-made catalogs name images like "https://cdn.example.com/Sommer Kleid 2.jpg"."""
    parts = urllib.parse.urlsplit(url.strip())
    host = parts.netloc
    if not host.isascii():
        userinfo, at, hostport = host.rpartition("@")
        name, colon, port = hostport.partition(":") if hostport.count(":") == 1 else (hostport, "", "")
        host = f"{userinfo}{at}{name.encode('idna').decode('ascii')}{colon}{port}"
    safe = "/%:@!$&'()*+,;=~-._"
    return urllib.parse.urlunsplit((parts.scheme, host, urllib.parse.quote(parts.path, safe=safe),
                                    urllib.parse.quote(parts.query, safe=safe + "?"), ""))


NOT_MODIFIED = object()  # _get's answer to a conditional GET that the server answered 304


def _get(url: str, settings: FetchSettings, validators: dict[str, str]) -> tuple[bytes | object, dict[str, str]]:
    """(the body of one GET, or NOT_MODIFIED; the response's ETag / Last-Modified), or FetchError (its
    __cause__ keeps the server's headers, for Retry-After)."""
    headers = {"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"}
    if validators.get("etag"):
        headers["If-None-Match"] = validators["etag"]
    if validators.get("last_modified"):
        headers["If-Modified-Since"] = validators["last_modified"]
    try:
        request = urllib.request.Request(request_url(url), headers=headers)
    except (ValueError, UnicodeError) as exc:
        raise FetchError("invalid URL", retryable=False) from exc
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout_s) as response:  # noqa: S310 - http(s) only
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > settings.max_bytes:
                raise FetchError(f"too large (> {settings.max_bytes >> 20} MiB)", retryable=False)
            body = response.read(settings.max_bytes + 1)
            answer = {"etag": response.headers.get("ETag", ""),
                      "last_modified": response.headers.get("Last-Modified", "")}
    except urllib.error.HTTPError as exc:
        if exc.code == 304 and (validators.get("etag") or validators.get("last_modified")):
            return NOT_MODIFIED, validators
        retryable = exc.code in (408, 429) or exc.code >= 500
        raise FetchError(f"HTTP {exc.code}", retryable) from exc
    except TimeoutError as exc:
        raise FetchError("timeout", retryable=True) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise FetchError("timeout", retryable=True) from exc
        raise FetchError(f"connection error ({type(exc.reason).__name__})", retryable=True) from exc
    except http.client.InvalidURL as exc:  # a character the request line cannot carry
        raise FetchError("invalid URL", retryable=False) from exc
    except (ConnectionError, OSError, http.client.HTTPException) as exc:  # reset mid-body, incomplete read
        raise FetchError(f"connection error ({type(exc).__name__})", retryable=True) from exc
    except ValueError as exc:  # e.g. a port that is not a number
        raise FetchError("invalid URL", retryable=False) from exc
    if len(body) > settings.max_bytes:
        raise FetchError(f"too large (> {settings.max_bytes >> 20} MiB)", retryable=False)
    if not body:
        raise FetchError("empty body", retryable=True)
    return body, answer


def _retry_after(exc: FetchError) -> float | None:
    cause = exc.__cause__
    if isinstance(cause, urllib.error.HTTPError) and cause.headers is not None:
        value = cause.headers.get("Retry-After", "")
        if value.strip().isdigit():
            return min(30.0, float(value))
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_meta(target: Path) -> dict:
    """The cache entry's metadata (url, etag, last_modified, checked: Unix time); {} when absent or unreadable."""
    try:
        meta = json.loads(target.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def download(url: str, target: Path, settings: FetchSettings, validators: dict[str, str] | None = None) -> int:
    """Fetch `url` into `target` atomically, retrying what may pass: the bytes written, -1 when the server
    said the cached copy (described by `validators`) is still current (304), or FetchError."""
    for attempt in range(settings.retries + 1):
        try:
            body, answer = _get(url, settings, validators or {})
            break
        except FetchError as exc:
            if not exc.retryable or attempt == settings.retries:
                raise
            pause = _retry_after(exc) or settings.backoff_s * (2 ** attempt) * (0.5 + random.random())
            time.sleep(pause)
    if isinstance(body, bytes):
        _write_atomic(target, body)
    meta = {"url": url, **answer, "checked": time.time()}
    _write_atomic(target.with_suffix(".json"), json.dumps(meta).encode("utf-8"))
    return len(body) if isinstance(body, bytes) else -1


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
    todo: dict[str, dict | None] = {}  # URL -> the validators of its cached copy (None: download it whole)
    now = time.time()
    for url in unique:
        target = cache_path(cache, url)
        held = target.is_file() and not settings.refresh
        meta = read_meta(target) if held else {}
        if held and now - float(meta.get("checked", 0.0)) < settings.max_age_s:
            paths[url] = str(target)
            report.cached += 1
        else:
            todo[url] = meta if held else None
    errors: Counter[str] = Counter()

    def one(url: str) -> tuple[str, int, str]:
        validators = todo[url]
        try:
            return url, download(url, cache_path(cache, url), settings, validators), ""
        except FetchError as exc:
            return url, -2 if validators is not None else 0, exc.reason

    if todo:
        with ThreadPoolExecutor(max(1, settings.threads), thread_name_prefix="vitrine-fetch") as pool, \
                tqdm(total=len(todo), desc="download", unit="img", disable=not progress, mininterval=1.0) as bar:
            for url, size, reason in pool.map(one, todo):
                bar.update(1)
                if size == -2:  # revalidation failed: the cached copy serves (stale-if-error)
                    report.stale += 1
                    paths[url] = str(cache_path(cache, url))
                    if report.stale <= 20:
                        logger.warning("could not revalidate %s (%s): using the cached copy", url, reason)
                    continue
                if reason:
                    errors[reason] += 1
                    paths[url] = ""
                    if sum(errors.values()) <= 20:
                        logger.warning("download failed: %s: %s", url, reason)
                    continue
                paths[url] = str(cache_path(cache, url))
                if size == -1:
                    report.not_modified += 1
                else:
                    report.downloaded += 1
                    report.bytes_downloaded += size
    report.failed = sum(errors.values())
    report.errors = dict(sorted(errors.items()))
    report.seconds = round(time.perf_counter() - start, 3)
    if unique:
        logger.info("download: %d URL(s): %d downloaded (%.1f MiB), %d from the cache %s (%d more revalidated, "
                    "%d stale), %d failed%s", report.urls, report.downloaded, report.bytes_downloaded / 2**20,
                    report.cached, cache, report.not_modified, report.stale, report.failed,
                    f" {report.errors}" if report.errors else "")
    return paths, report
