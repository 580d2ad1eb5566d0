"""Catalogs that name their images per row (`image_column`): paths, and http(s) URLs downloaded at ingest.

A real HTTP server on loopback serves the mini catalog's JPEGs, plus the ways a shop's CDN fails: a
404, a 503 that passes on retry, a 429 with Retry-After, an HTML error page with status 200, and a
response slower than the timeout. Ingest and `vitrine index update` read the same catalogs.
"""

from __future__ import annotations

import csv
import hashlib
import http.server
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from indexer.job import IndexBuildConfig, build_index
from indexer.version import open_current
from model.catalog import CatalogConfig, read_catalog
from model.data import build_shards, iter_shard_records
from model.data.sources import FetchSettings, fetch_urls
from tests.indexer_fixtures import MINI, catalog_rows, make_inputs
from vitrine.cli import main

FAST = FetchSettings(threads=4, timeout_s=0.5, retries=2, backoff_s=0.05)


class Server(http.server.ThreadingHTTPServer):
    hits: Counter[str]
    mutable: dict[str, str]  # /mutable/<name> serves this image file of the mini catalog ("down": 503)


class Handler(http.server.BaseHTTPRequestHandler):
    """/img/<file>: the image; /flaky/<file>: 503 on the first request, then the image; /limited/<file>: 429 with
    Retry-After 1 on the first request; /missing/<file>: 404; /html/<file>: an HTML page with status 200;
    /slow/<file>: the image after 2 s (longer than the tests' timeout); /any/<anything>: the first mini catalog
    image; /mutable/<name>: the file that
    server.mutable names, with an ETag, answering 304 to a matching If-None-Match."""

    server: Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        kind, _, name = self.path.strip("/").partition("/")
        self.server.hits[self.path] += 1
        first = self.server.hits[self.path] == 1
        if kind == "mutable":
            served = self.server.mutable.get(name, "")
            if served == "down":
                return self._send(503, b"maintenance", "text/plain")
            body = (MINI / "images" / served).read_bytes()
            etag = '"' + hashlib.sha1(body).hexdigest() + '"'
            if self.headers.get("If-None-Match") == etag:
                self.server.hits["304"] += 1
                return self._send(304, b"", "image/jpeg", {"ETag": etag})
            return self._send(200, body, "image/jpeg", {"ETag": etag})
        file = MINI / "images" / (mini_files(1)[0] if kind == "any" else name)
        if kind == "missing" or not file.is_file():
            return self._send(404, b"not found", "text/plain")
        if kind == "flaky" and first:
            return self._send(503, b"busy", "text/plain")
        if kind == "limited" and first:
            return self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
        if kind == "html":
            return self._send(200, b"<html><body>Image moved</body></html>", "text/html")
        if kind == "slow":
            time.sleep(2.0)
        self._send(200, file.read_bytes(), "image/jpeg")

    def _send(self, code: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            if code != 304:
                self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass


@pytest.fixture(scope="module")
def cdn() -> Iterator[Server]:
    server = Server(("127.0.0.1", 0), Handler)
    server.hits, server.mutable = Counter(), {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def base_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def write_catalog(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """A shop's own CSV: sku, name, type, image (path or URL)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "name", "type", "image"])
        writer.writerows([(sku, f"Product {sku}", kind, image) for sku, kind, image in rows])


CONFIG = CatalogConfig(id_column="sku", title_column="name", category_column="type", attribute_columns=("type",),
                       split_column=None, overflow_column="name", image_column="image")


def mini_files(n: int) -> list[str]:
    return [f"{row[0]}.jpg" for row in catalog_rows(n)[1:]]


def test_ingest_downloads_urls_counts_failures_and_caches(cdn: Server, tmp_path: Path) -> None:
    files = mini_files(12)
    url = base_url(cdn)
    local = tmp_path / "photos"
    local.mkdir()
    (local / "p7.jpg").write_bytes((MINI / "images" / files[7]).read_bytes())
    rows = [("p0", "Shirts", f"{url}/img/{files[0]}"), ("p1", "Shirts", f"{url}/img/{files[1]}"),
            ("p2", "Shoes", f"{url}/flaky/{files[2]}"), ("p3", "Shoes", f"{url}/limited/{files[3]}"),
            ("p4", "Bags", f"{url}/missing/{files[4]}"), ("p5", "Bags", f"{url}/html/{files[5]}"),
            ("p6", "Bags", f"{url}/slow/{files[6]}"), ("p7", "Shirts", "p7.jpg"),  # relative to --images
            ("p8", "Shirts", str(MINI / "images" / files[8])),  # absolute
            ("p9", "Shirts", ""),  # no image named
            ("p11", "Shirts", "s3://bucket/p11.jpg"),  # a scheme vitrine does not fetch: missing, said so
            ("p10", "Shirts", f"{url}/img/{files[0]}")]  # the same URL as p0: downloaded once
    write_catalog(tmp_path / "shop.csv", rows)
    cache = tmp_path / "cache"
    report = build_shards(tmp_path / "shop.csv", local, tmp_path / "shards", CONFIG, progress=False, workers=1,
                          image_cache=cache, fetch=FAST)
    assert report.products == 12 and report.records == 7  # p0 p1 p2 p3 p7 p8 p10
    assert report.failed_downloads == 2 and report.downloads["errors"] == {"HTTP 404": 1, "timeout": 1}
    assert report.bad_images == 1 and report.missing_images == 2  # the HTML page; p9's empty cell, p11's s3://
    assert report.unsupported_sources == {"s3://": 1}
    assert report.downloads["urls"] == 7 and report.downloads["downloaded"] == 5
    assert report.catalog["image_urls"] == 8 and report.catalog["empty_image_source"] == 1
    stored = {record.product.product_id: record for record in iter_shard_records(tmp_path / "shards")}
    expected = {"p0": files[0], "p1": files[1], "p2": files[2], "p3": files[3], "p7": files[7], "p8": files[8],
                "p10": files[0]}
    assert set(stored) == set(expected)
    for sku, name in expected.items():
        assert stored[sku].image_bytes == (MINI / "images" / name).read_bytes(), sku
    assert stored["p2"].product.image_url == f"{url}/flaky/{files[2]}"  # a URL source is the product's image URL
    assert stored["p7"].product.image_url == "" and stored["p8"].product.image_url == ""
    assert cdn.hits[f"/img/{files[0]}"] == 1 and cdn.hits[f"/flaky/{files[2]}"] == 2  # retried once
    assert cdn.hits[f"/missing/{files[4]}"] == 1, "a 404 is not retried"
    assert cdn.hits[f"/slow/{files[6]}"] == 3, "a timeout is retried (retries=2)"

    before = Counter(cdn.hits)
    again = build_shards(tmp_path / "shop.csv", local, tmp_path / "shards", CONFIG, progress=False, workers=1,
                         image_cache=cache, fetch=FetchSettings(threads=4, timeout_s=0.5, retries=0), overwrite=True)
    assert again.records == 7 and again.downloads["cached"] == 5 and again.downloads["downloaded"] == 0
    new_hits = cdn.hits - before
    assert set(new_hits) == {f"/missing/{files[4]}", f"/slow/{files[6]}"}, "only the failures are tried again"


def test_a_cached_image_is_revalidated_replaced_or_kept_when_the_cdn_is_down(cdn: Server, tmp_path: Path) -> None:
    """The nightly run sees an image replaced under the same URL; an unchanged one costs a 304, no body."""
    files = mini_files(2)
    cdn.mutable["shoe.jpg"] = files[0]
    url = f"{base_url(cdn)}/mutable/shoe.jpg"
    paths, report = fetch_urls([url], tmp_path, FAST, progress=False)
    assert report.downloaded == 1 and Path(paths[url]).read_bytes() == (MINI / "images" / files[0]).read_bytes()
    _, report = fetch_urls([url], tmp_path, FAST, progress=False)  # younger than max_age_s: not asked
    assert (report.cached, cdn.hits["/mutable/shoe.jpg"]) == (1, 1)
    nightly = FetchSettings(threads=2, timeout_s=0.5, retries=0, max_age_s=0.0)
    _, report = fetch_urls([url], tmp_path, nightly, progress=False)
    assert (report.not_modified, report.downloaded, cdn.hits["304"]) == (1, 0, 1)
    cdn.mutable["shoe.jpg"] = files[1]  # the shop replaced the photo, same URL
    paths, report = fetch_urls([url], tmp_path, nightly, progress=False)
    assert report.downloaded == 1 and Path(paths[url]).read_bytes() == (MINI / "images" / files[1]).read_bytes()
    cdn.mutable["shoe.jpg"] = "down"
    paths, report = fetch_urls([url], tmp_path, nightly, progress=False)
    assert (report.stale, report.failed) == (1, 0), "the cached copy serves while the CDN is down"
    assert Path(paths[url]).read_bytes() == (MINI / "images" / files[1]).read_bytes()


def test_fetch_refuses_a_body_over_the_size_limit(cdn: Server, tmp_path: Path) -> None:
    url = f"{base_url(cdn)}/img/{mini_files(1)[0]}"
    paths, report = fetch_urls([url], tmp_path, FetchSettings(max_bytes=100), progress=False)
    assert paths[url] == "" and report.errors == {"too large (> 0 MiB)": 1}
    assert not any(tmp_path.iterdir()), "nothing half-written stays in the cache"


def test_ingest_cli_takes_an_image_column_without_an_images_folder(cdn: Server, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    files = mini_files(3)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes((MINI / "images" / files[0]).read_bytes())
    write_catalog(tmp_path / "shop.csv", [("a", "Shirts", "pics/a.jpg"),  # relative to the CSV's folder
                                          ("b", "Shoes", f"{base_url(cdn)}/img/{files[1]}")])
    config = tmp_path / "columns.json"
    config.write_text(json.dumps(CONFIG.to_json()))
    argv = ["ingest", "--csv", str(tmp_path / "shop.csv"), "--out", str(tmp_path / "shards"), "--catalog-config",
            str(config), "--workers", "1", "--download-threads", "2"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 2 and report["downloads"]["downloaded"] == 1 and report["failed_downloads"] == 0
    assert (tmp_path / ".shards.image-cache").is_dir(), "the default cache sits beside --out"

    # without an image column, the images folder is required: a clear usage error, nothing written
    assert main(["ingest", "--csv", str(tmp_path / "shop.csv"), "--out", str(tmp_path / "other")]) == 2
    assert "--images is needed" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert main(argv[:-2] + ["--download-threads", "0"]) == 2
    assert "--download-threads must be at least 1" in capsys.readouterr().err


def test_read_catalog_names_the_missing_image_column(tmp_path: Path) -> None:
    write_catalog(tmp_path / "shop.csv", [("a", "Shirts", "a.jpg")])
    config = CatalogConfig(**{**CONFIG.__dict__, "image_column": "image_link"})
    with pytest.raises(ValueError, match=r"lacks the configured columns \['image_link'\]"):
        read_catalog(tmp_path / "shop.csv", config)


def test_index_update_reads_image_urls(cdn: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The nightly update from a catalog of URLs: unchanged images keep their embeddings, a changed URL is
    re-embedded, an undownloadable one drops its product (counted), and CURRENT moves to the new version."""
    n = 30
    shards, checkpoint = make_inputs(tmp_path, n)
    root = tmp_path / "index"
    build_index(IndexBuildConfig(shards_dir=shards, model=checkpoint, index_root=root, chunk_rows=32, num_workers=0,
                                 factory="IVF4,PQ8x4", nprobe=4, min_recall_at_10=0.5, validation_queries=20))
    rows = catalog_rows(n)
    header = rows[0] + ["image"]
    url = base_url(cdn)
    body = [row + [f"{url}/img/{row[0]}.jpg"] for row in rows[1:]]
    changed, lost = body[3][0], body[4][0]
    body[3][-1] = f"{url}/img/{body[5][0]}.jpg"  # now shows another product's photo
    body[4][-1] = f"{url}/missing/{lost}.jpg"
    with open(tmp_path / "new.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *body])
    config = tmp_path / "columns.json"
    config.write_text(json.dumps({"image_column": "image"}))
    argv = ["index", "update", "--csv", str(tmp_path / "new.csv"), "--index-root", str(root), "--catalog-config",
            str(config), "--min-recall", "0.5", "--validation-queries", "20"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.split("\npublished")[0])
    # the same photos, now with an image_url from the CSV: embeddings reused, metadata rewritten
    assert (report["metadata_changed"], report["unchanged"], report["image_changed"], report["missing_image"],
            report["added"]) == (n - 2, 0, 1, 1, 0)
    assert (root / ".image-cache").is_dir()
    with open_current(root) as live:
        assert live.count == n - 1 and live.internal_id(lost) is None and live.internal_id(changed) is not None
        assert live.manifest["catalog"]["downloads"]["errors"] == {"HTTP 404": 1}
        assert live.product(live.internal_id(rows[1][0])).image_url == f"{url}/img/{rows[1][0]}.jpg"


def test_urls_with_spaces_and_non_ascii_characters_are_fetched(cdn: Server, tmp_path: Path) -> None:
    """Hand-made catalogs name images "https://cdn/Sommer Kleid 2.jpg" or with non-ASCII file names: such a URL
    is percent-encoded as browsers do (it stopped the whole ingest with InvalidURL / UnicodeEncodeError), and
    a URL that still cannot be requested fails alone, counted by reason."""
    url = base_url(cdn)
    urls = [f"{url}/any/Sommer Kleid 2.jpg", f"{url}/any/帽子-é.jpg?farbe=grün&size=L XL", f"{url}/any/a%20b.jpg",
            "http://127.0.0.1:notaport/x.jpg"]
    paths, report = fetch_urls(urls, tmp_path / "cache", FAST, progress=False)
    assert [bool(paths[u]) for u in urls] == [True, True, True, False]
    assert report.downloaded == 3 and report.failed == 1 and report.errors == {"invalid URL": 1}
    assert cdn.hits["/any/Sommer%20Kleid%202.jpg"] == 1 and cdn.hits["/any/a%20b.jpg"] == 1
    assert cdn.hits["/any/%E5%B8%BD%E5%AD%90-%C3%A9.jpg?farbe=gr%C3%BCn&size=L%20XL"] == 1
