"""`vitrine demo`: the whole path on a real catalog, every stage real.

ingest (CSV + images -> LMDB shards) -> train (a small ViT, normalized softmax) -> index build
(embed, Faiss, validate, publish CURRENT) -> a gRPC server on a free port -> queries by image
with the catalog's test-split photos -> top-1 relevance, example tables and an HTML page.
Each offline stage is skipped when its output already exists and is complete, so a second run
only serves and queries again (`--fresh` redoes everything).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("vitrine.demo")

REPO_ROOT = Path(__file__).resolve().parents[1]
MINI_CATALOG = REPO_ROOT / "data" / "mini-catalog"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    work_dir: Path = Path("work/demo")
    catalog_dir: Path = MINI_CATALOG  # holds styles.csv and images/
    model: Path | None = None  # checkpoint to index with; None: the committed default model (model/default)
    train: bool = False  # train a small model on the catalog instead (ingest -> train -> index)
    epochs: int = 12  # training passes over the train split when training (about a minute per 4 epochs here)
    top_k: int = 5  # results shown per query
    html_queries: int = 60  # queries shown on the HTML page
    fresh: bool = False  # delete work_dir first
    precision: str = "auto"  # embedding arithmetic of the index build and the server (model.embedder.resolve_precision)


@dataclasses.dataclass
class QueryOutcome:
    product: Any  # model.catalog.Product of the query
    hits: list[Any]  # engine.types.SearchHit, the query's own product removed
    latency_ms: float


def _stage(name: str, done: bool) -> bool:
    """Print the stage banner; True when the stage must run."""
    print(f"\n== {name}: {'already done, skipped' if done else 'running'}", flush=True)
    return not done


def _index_matches(index_root: Path, model: Path) -> bool:
    """True when a live version exists and was built with this model (else the index is (re)built)."""
    from indexer.version import open_current
    from model.checkpoint import model_fingerprint

    if not (index_root / "CURRENT").exists():
        return False
    try:
        with open_current(index_root) as version:
            if version.model_fingerprint == model_fingerprint(model):
                return True
    except Exception as exc:  # an unreadable live version: rebuild it
        print(f"\n== index build: the live version cannot be read ({exc}); rebuilding", flush=True)
        return False
    print("\n== index build: the live version was built with another model; rebuilding", flush=True)
    return False


def build_offline(config: DemoConfig) -> dict[str, Path]:
    """Ingest, train and index the catalog in config.work_dir (each stage skipped when done)."""
    from indexer.build import IndexBuildConfig, build_index
    from model.catalog import CatalogConfig
    from model.checkpoint import default_model_path
    from model.data.ingest import build_shards
    from model.train import TrainConfig, train

    work = config.work_dir
    paths = {"shards": work / "shards", "model": work / "model", "index": work / "index"}
    if _stage("ingest", (paths["shards"] / "manifest.json").exists()):
        report = build_shards(config.catalog_dir / "styles.csv", config.catalog_dir / "images", paths["shards"],
                              CatalogConfig())
        print(json.dumps(report.to_json(), indent=2))
    if not config.train:
        paths["model"] = config.model or default_model_path()
        print(f"\n== model: {paths['model']} (pass --train to train one on the catalog instead)", flush=True)
    elif _stage("train", (paths["model"] / "model_card.json").exists()):
        train(TrainConfig(shards_dir=paths["shards"], out_dir=paths["model"], epochs=config.epochs))
    if _stage("index build", _index_matches(paths["index"], paths["model"])):
        build_index(IndexBuildConfig(shards_dir=paths["shards"], model=paths["model"], index_root=paths["index"],
                                     precision=config.precision))
    return paths


def _catalog_images(config: DemoConfig) -> list[tuple[Any, Path]]:
    """Every catalog product that has an image (the gallery): (product, image path)."""
    from model.catalog import CatalogConfig, read_catalog

    catalog_config = CatalogConfig()
    table = read_catalog(config.catalog_dir / "styles.csv", catalog_config)
    pairs = [(p, config.catalog_dir / "images" / catalog_config.image_pattern.format(id=p.product_id))
             for p in table.products]
    return [(p, image) for p, image in pairs if image.exists()]


def run_queries(target: str, queries: list[tuple[Any, Path]], top_k: int) -> list[QueryOutcome]:
    """Search by image through gRPC; the query's own product is removed (gallery = catalog minus query)."""
    from engine.client import VisualSearchClient

    outcomes = []
    logging.getLogger("vitrine.engine").setLevel(logging.WARNING)  # one log line per query drowns the demo
    with VisualSearchClient(target, timeout_s=30.0) as client:
        client.wait_ready(timeout_s=120.0)
        for product, image in tqdm(queries, desc="queries", unit="q"):
            start = time.perf_counter()
            result = client.search_image(image.read_bytes(), top_k=top_k + 1)
            latency_ms = (time.perf_counter() - start) * 1000
            hits = [h for h in result.hits if h.product_id != product.product_id][:top_k]
            outcomes.append(QueryOutcome(product, hits, latency_ms))
    return outcomes


def relevance_summary(outcomes: list[QueryOutcome], gallery_categories: list[str]) -> dict[str, Any]:
    """Top-1 relevance (same category = articleType) and the chance level of a random first result."""
    top1 = [bool(o.hits) and o.hits[0].product.category == o.product.category for o in outcomes]
    strict = [bool(o.hits) and o.hits[0].product.category == o.product.category
              and o.hits[0].product.attributes.get("baseColour") == o.product.attributes.get("baseColour")
              for o in outcomes]
    counts = Counter(gallery_categories)
    total = sum(counts.values())
    latencies = sorted(o.latency_ms for o in outcomes)
    return {
        "queries": len(outcomes),
        "top1_relevance_type": sum(top1) / max(len(top1), 1),
        "top1_relevance_strict": sum(strict) / max(len(strict), 1),
        "chance_top1_type": sum((c / total) ** 2 for c in counts.values()) if total else 0.0,
        "latency_ms_p50": latencies[len(latencies) // 2] if latencies else None,
        "latency_ms_p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None,
    }


def _img_tag(data: bytes, caption: str, ok: bool | None = None) -> str:
    border = {None: "#888", True: "#2a2", False: "#c22"}[ok]
    src = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    return (f'<figure style="border:3px solid {border}"><img src="{src}" width="90">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_html(path: Path, outcomes: list[QueryOutcome], images_dir: Path, summary: dict[str, Any]) -> None:
    """One row per query: the query photo, then its top results (green: same category, red: not)."""
    rows = []
    for o in outcomes:
        cells = [_img_tag((images_dir / f"{o.product.product_id}.jpg").read_bytes(),
                          f"query {o.product.product_id}: {o.product.category}")]
        for h in o.hits:
            image = images_dir / f"{h.product_id}.jpg"
            data = image.read_bytes() if image.exists() else b""
            cells.append(_img_tag(data, f"{h.score:.3f} {h.product.category} / {h.product.title}",
                                  h.product.category == o.product.category))
        rows.append('<div class="row">' + "".join(cells) + "</div>")
    head = (f"<h1>vitrine demo</h1><p>{summary['queries']} test-split queries; top-1 relevance (type) "
            f"{summary['top1_relevance_type']:.3f}, strict {summary['top1_relevance_strict']:.3f}, chance "
            f"{summary['chance_top1_type']:.3f}. Showing {len(outcomes)}.</p>")
    style = ("<style>body{font-family:sans-serif}.row{display:flex;gap:6px;margin:6px 0}"
             "figure{margin:0;width:110px;font-size:10px}</style>")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>vitrine demo</title>{style}</head>"
                    f"<body>{head}{''.join(rows)}</body></html>")


def serve_and_query(config: DemoConfig, paths: dict[str, Path]) -> dict[str, Any]:
    """Start the gRPC server on a free port, run the test-split queries, stop the server cleanly."""
    from engine.server import ServerConfig, create_server

    gallery = _catalog_images(config)
    queries = [(product, image) for product, image in gallery if product.split == "test"]
    server, port = create_server(ServerConfig(index_root=paths["index"], port=0, precision=config.precision))
    print(f"\n== serve: gRPC server on 127.0.0.1:{port}", flush=True)
    try:
        outcomes = run_queries(f"127.0.0.1:{port}", queries, config.top_k)
    finally:
        server.stop(grace=5).wait()
        print("== serve: server stopped", flush=True)
    summary = relevance_summary(outcomes, [product.category for product, _ in gallery])
    write_html(config.work_dir / "results.html", outcomes[: config.html_queries], config.catalog_dir / "images",
               summary)
    _print_examples(outcomes[:3])
    return summary


def _print_examples(outcomes: list[QueryOutcome]) -> None:
    for o in outcomes:
        print(f"\nquery {o.product.product_id} ({o.product.category}: {o.product.title})")
        for rank, h in enumerate(o.hits, 1):
            print(f"  {rank}. {h.score:6.3f}  {h.product_id:>8}  {h.product.category:<16} {h.product.title}")


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every stage and return the summary (also written to <work_dir>/demo_results.json)."""
    if config.fresh and config.work_dir.exists():
        shutil.rmtree(config.work_dir)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = build_offline(config)
    summary = serve_and_query(config, paths)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    from model.embedder import resolve_precision

    summary["precision"] = resolve_precision(config.precision, "cpu")
    (config.work_dir / "demo_results.json").write_text(json.dumps(summary, indent=2))
    print(f"\n== result: top-1 relevance (same articleType) over {summary['queries']} test-split image queries: "
          f"{summary['top1_relevance_type']:.3f} (strict, + same baseColour: {summary['top1_relevance_strict']:.3f}; "
          f"chance: {summary['chance_top1_type']:.3f})")
    print(f"== HTML page: {(config.work_dir / 'results.html').resolve()}")
    return summary
