"""The `vitrine` console command: one parser with a subcommand per job.

This module only parses arguments and calls library functions; the work lives in `model`,
`indexer` and `engine`. Heavy libraries (torch, faiss, grpc) are imported inside the
subcommand handlers so that `vitrine --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from indexer.embed_options import BACKENDS, FORWARD_PLACES
from model.precision import PRECISIONS
from model.runtime import tune_malloc
from vitrine import commands, model_cli

DESCRIPTION = """\
vitrine: visual shopping search. A shopper's photo goes in; visually similar products come out.

Typical flow (see README.md):
  vitrine ingest --csv styles.csv --images images/ --out work/shards
  vitrine annotate --shards work/shards --out work/weak_labels.json
  vitrine train --stage pretrain --shards work/shards --weak-labels work/weak_labels.json --out work/pretrain
  vitrine train --shards work/shards --init-from work/pretrain --tasks category,baseColour --out work/model
  vitrine index build --shards work/shards --model work/model --index-root work/index
  vitrine serve --index-root work/index --port 50051
  vitrine query --target localhost:50051 --image photo.jpg
  vitrine demo            # all of the above on the bundled mini catalog
"""


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="catalog CSV + images (folder, paths or URLs) -> LMDB shards + manifest.json",
                       description="Read a catalog CSV (column mapping from --catalog-config) and its images, "
                                   "validate every image and write bounded LMDB shards plus manifest.json. "
                                   "Images are found as image_pattern (default {id}.jpg) in --images, or named "
                                   "per row by the config's image_column: a path or an http(s) URL (downloaded "
                                   "into a cache, with retries; failures are counted by reason). "
                                   "Defective rows are repaired or counted in the report, never silently dropped.")
    p.add_argument("--csv", required=True, help="catalog CSV, one row per product")
    p.add_argument("--images", default=None,
                   help="folder holding the product images (with an image_column: where its relative paths start; "
                        "default the CSV's folder)")
    p.add_argument("--out", required=True, help="output folder for shard-*.lmdb and manifest.json")
    p.add_argument("--catalog-config", default=None,
                   help="JSON file with the column mapping (model.catalog.CatalogConfig fields); "
                        "default fits the fashion-product-images dataset")
    p.add_argument("--max-records-per-shard", type=int, default=None, help="records per LMDB shard")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished ingest in --out (by default one of the same CSV, column mapping and "
                        "images folder is reused, and one of other inputs is an error)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes decoding and validating images (default 0: one per CPU core)")
    p.add_argument("--max-side", type=int, default=None,
                   help="downscale and re-encode (JPEG) images whose longer side exceeds this many pixels; for a "
                        "catalog of large photos, 3x the model input's longer side (384 for the default model) makes "
                        "every later embed stage decode small JPEGs (measured 1.66x faster on 1200x1600 photos)")
    p.add_argument("--image-cache", default=None,
                   help="folder keeping downloaded images between runs (default: .<out>.image-cache beside --out)")
    p.add_argument("--download-threads", type=int, default=16, help="concurrent image downloads (default 16)")
    p.add_argument("--download-timeout", type=float, default=20.0, help="seconds per download request (default 20)")
    p.add_argument("--download-retries", type=int, default=3,
                   help="retries of a download after a timeout, connection error or HTTP 408/429/5xx (default 3)")
    p.add_argument("--refresh-images", action="store_true",
                   help="download every image URL again, even when the cache holds it")
    p.add_argument("--image-max-age-h", type=float, default=20.0,
                   help="revalidate a cached image older than this many hours with a conditional GET (304: kept; "
                        "200: replaced; server down: the cached copy is used); default 20, so every nightly run")
    p.set_defaults(handler=commands.cmd_ingest)


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build and inspect index versions",
                       description="Index versions live in <index-root>/<version>/; <index-root>/CURRENT names "
                                   "the live one.")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="{build,update,list,rollback}")
    b = isub.add_parser("build", help="embed the catalog and build + validate + publish a Faiss index version",
                        description="A resumable job of named stages: embed (DataLoader workers decode images, "
                                    "float16 embeddings in chunks; or Ray Data actors with --backend ray), plan "
                                    "(Faiss factory string from N, dim, memory "
                                    "budget and target recall; memory estimate), train (on a sample; Faiss GPU when "
                                    "present), add (S shards by sha1 of the product id), validate (recall@10 with "
                                    "re-ranking vs exact search, counts, NaN, ids) and publish (atomic CURRENT, keep "
                                    "the last N versions). Stage outputs live in --work-dir; run the same command "
                                    "again after a kill and it resumes where it stopped (a finished stage is skipped). "
                                    "Exit status: 0 published; 1 refused (recall gate, --memory-budget, "
                                    "--max-removed), CURRENT unchanged; 2 bad input, or another build or update is "
                                    "running on the index root.")
    b.add_argument("--shards", required=True, help="folder written by `vitrine ingest`")
    b.add_argument("--model", default=None,
                   help="checkpoint folder written by `vitrine train` (default: the committed default model)")
    b.add_argument("--index-root", required=True, help="folder holding index versions and CURRENT")
    _add_build_flags(b)
    b.add_argument("--work-dir", default=None, help="folder for the stages' outputs (default: <index-root>/.work)")
    b.add_argument("--stages", default=None, help="comma-separated subset of embed,plan,train,add,validate,publish "
                                                  "(default: all; each needs the outputs of the ones before)")
    b.add_argument("--fresh", action="store_true", help="delete the work folder first and redo every stage")
    b.add_argument("--batch-size", type=int, default=None, help="images per embedding forward pass (default 64)")
    b.add_argument("--workers", type=int, default=None, help="DataLoader processes decoding images (default 2)")
    b.add_argument("--chunk-rows", type=int, default=None, help="records per embedding chunk, the unit of resume "
                                                                "(default 4096)")
    b.add_argument("--device", default=None, help="torch device for embedding, e.g. cuda (default cpu)")
    b.add_argument("--forward", choices=FORWARD_PLACES, default=None,
                   help="where the embed stage runs the model: main (this process, all torch threads, while the "
                        "--workers decode), workers (each DataLoader worker embeds the batch it decoded, one torch "
                        "thread each: faster when the workers take every core), auto (default: workers on a CPU when "
                        "--workers >= its cores, else main)")
    b.add_argument("--backend", choices=BACKENDS, default=None,
                   help="where the embed stage runs: local (DataLoader workers, default) or ray (Ray Data actors "
                        "on a Ray cluster; needs the ray extra: pip install 'vitrine-search[ray]')")
    b.add_argument("--ray-address", default=None, help="with --backend ray: the cluster to join, e.g. auto or "
                                                       "ray://head:10001 (default: start Ray on this machine)")
    b.add_argument("--ray-actors", type=int, default=None, help="with --backend ray: embedding actors, one model "
                                                                "replica each (default 2)")
    b.add_argument("--ray-cpus-per-actor", type=float, default=None,
                   help="with --backend ray: CPUs each actor reserves, its torch threads (default 1)")
    b.add_argument("--memory-budget", default=None, help="memory the build may use, e.g. 8GB; the plan fits it "
                                                         "or the build stops before training, naming the estimate")
    b.add_argument("--target-recall", type=float, default=None, help="recall@10 the plan aims for (default 0.95)")
    b.add_argument("--max-removed", type=float, default=None,
                   help="refuse to publish (CURRENT unchanged, exit 1; the rest of the build is kept, so a rerun "
                        "with a higher value only publishes) when more than this "
                        "fraction of the live version's products are missing from the new one, as after a truncated "
                        "export (default 0.5; 1 allows any, e.g. for another catalog)")
    b.set_defaults(handler=commands.cmd_index_build)
    u = isub.add_parser("update", help="apply a new catalog CSV (adds, changes, deletes) to the live version",
                        description="Compare a new catalog CSV with the live version: unchanged products keep "
                                    "their embeddings, new products and changed images are embedded, deleted ones "
                                    "are dropped; the live version's trained quantizer is reused. The new version "
                                    "is validated and published like a full build. Exit status: 0 published; 1 "
                                    "refused (recall gate, --max-removed), CURRENT unchanged; 2 bad input, no intact "
                                    "live version, or another build or update is running on the index root.")
    u.add_argument("--csv", required=True, help="the whole new catalog CSV (one row per product)")
    u.add_argument("--images", default=None,
                   help="folder holding the catalog's images (with an image_column in the catalog config: where "
                        "its relative paths start; default the CSV's folder)")
    u.add_argument("--image-cache", default=None, help="folder keeping downloaded image URLs between runs "
                                                       "(default <index-root>/.image-cache)")
    u.add_argument("--image-max-age-h", type=float, default=20.0,
                   help="revalidate cached image URLs older than this many hours (default 20)")
    u.add_argument("--index-root", required=True, help="folder holding index versions and CURRENT")
    u.add_argument("--catalog-config", default=None, help="JSON column mapping (model.catalog.CatalogConfig)")
    u.add_argument("--model", default=None, help="checkpoint folder (default: the live version's; it must have "
                                                 "the same fingerprint)")
    u.add_argument("--batch-size", type=int, default=None, help="images per embedding forward pass (default 64)")
    u.add_argument("--max-removed", type=float, default=None,
                   help="refuse the update (CURRENT unchanged, exit 1) when more than this fraction of the live "
                        "products would leave the index: deleted rows, missing or bad images, as from a truncated "
                        "export or an images folder that is not mounted (default 0.5; 1 allows any)")
    _add_build_flags(u, update=True)
    u.set_defaults(handler=commands.cmd_index_update)
    ls = isub.add_parser("list", help="list the versions under an index root (the live one marked *)",
                         description="One line per version, oldest first: * for the live one (CURRENT), < for "
                                     "the one a plain `index rollback` would make live (the one live before it), "
                                     "its name "
                                     "(what `index rollback --to` takes), Faiss factory, product count and validated "
                                     "recall@10; DAMAGED and the reason when a file is missing or truncated (such a "
                                     "version cannot serve and rollback refuses it). Reads the manifests, file "
                                     "sizes and HISTORY, no index.")
    ls.add_argument("--index-root", required=True, help="folder holding index versions and CURRENT")
    ls.set_defaults(handler=commands.cmd_index_list)
    rb = isub.add_parser("rollback", help="make an earlier version live again (default: the previous one)",
                         description="Verify an earlier complete version (it opens, every checksum matches) and "
                                     "replace CURRENT with it atomically. A failed rollback leaves CURRENT as it was. "
                                     "Without --to it goes to the version that was live before the live one (read "
                                     "from <index-root>/HISTORY): after a rollback away from a bad version and a new "
                                     "publish, it returns to the good one, not to the bad one; run again, it goes "
                                     "further back.")
    rb.add_argument("--index-root", required=True, help="folder holding index versions and CURRENT")
    rb.add_argument("--to", default=None, help="version name to make live (default: the one live before the live one)")
    rb.set_defaults(handler=commands.cmd_index_rollback)


def _add_build_flags(p: argparse.ArgumentParser, update: bool = False) -> None:
    """Flags shared by `index build` and `index update` (an update's defaults come from the live version)."""
    p.add_argument("--factory", default=None,
                   help="the live version's Faiss factory string (an update reuses its trained index; another one is "
                        "an error: change it with `vitrine index build`)" if update else
                        "Faiss factory string, e.g. IVF1024,PQ32x8 (default: planned)")
    nprobe, shards = ("the live version's", "as many as the live version") if update else ("planned", "1")
    p.add_argument("--nprobe", type=int, default=None, help=f"default IVF lists probed per query (default: {nprobe})")
    p.add_argument("--num-shards", type=int, default=None, help=f"Faiss shards; product -> sha1(id) mod S (default "
                                                                f"{shards})")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="arithmetic of the embedding model: auto (default) computes in bf16 where the CPU (AVX512-BF16 "
                        "or AMX) or GPU does it natively, about 2x faster here with the same relevance, else fp32")
    p.add_argument("--min-recall", type=float, default=None, help="validation floor of recall@10 with re-ranking "
                                                                  "(default 0.95; exact indices need 1.0)")
    p.add_argument("--no-tune", dest="tune_search", action="store_false", default=None,
                   help="fail the gate when the planned nprobe / re-rank miss --min-recall, instead of raising them "
                        "(by default the gate tries re-rank x2, x4 and nprobe x2, x4, x8, cheapest first, and "
                        "records the first pair that passes as the version's search defaults)")
    p.add_argument("--validation-queries", type=int, default=None, help="held-out queries for validation (256)")
    p.add_argument("--keep", type=int, default=None, help="versions kept after publishing (default 5; CURRENT, the "
                                                          "one before it and the one it replaced are never deleted)")
    p.add_argument("--seed", type=int, default=None, help="seed of the validation queries" if update else
                   "seed of the training sample, k-means and queries")
    p.add_argument("--no-publish", action="store_true", help="validate and write the version, leave CURRENT alone")
    p.add_argument("--gpu", dest="use_gpu", action="store_true", default=None,
                   help="no effect: an update adds on the CPU (kept for flag parity with index build)" if update else
                   "train/add on GPU through Faiss GPU (default: when Faiss sees a GPU)")
    p.add_argument("--no-gpu", dest="use_gpu", action="store_false",
                   help="no effect on an update" if update else "never use Faiss GPU")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC VisualSearch server on the live index version",
                       description="Load <index-root>/CURRENT and its model, warm up, then serve "
                                   "vitrine.v1.VisualSearch with gRPC health and reflection until SIGINT/SIGTERM, "
                                   "hot-swapping to newly published versions. Settings: flags > VITRINE_* "
                                   "environment variables (e.g. VITRINE_PORT) > --config file > defaults.")
    p.add_argument("--config", default=None, help="JSON or TOML file of ServerConfig settings")
    p.add_argument("--index-root", default=None, help="folder holding index versions and CURRENT")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the one the index was built with)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=None, help="port to bind (default 50051; 0: any free port)")
    p.add_argument("--workers", dest="max_workers", type=int, default=None, help="gRPC worker threads per process")
    p.add_argument("--processes", type=int, default=None,
                   help="server processes sharing the port (SO_REUSEPORT; the kernel spreads client connections "
                        "over them), each with its own GIL, model and Faiss index in memory; metrics of process i "
                        "on --metrics-port + i (default 1)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=None,
                   help="requests in progress at once; more are answered RESOURCE_EXHAUSTED")
    p.add_argument("--max-message-bytes", type=int, default=None, help="largest request/response (bytes)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the API as HTTP/JSON on this port (POST /v1/search with JSON or a raw image "
                        "body, /v1/batch-search, /v1/embed, GET /v1/products/<id>, /v1/index, /healthz; "
                        "engine/http_gateway.py), for browsers and curl; 0: any free port")
    p.add_argument("--http-cors-origin", default=None,
                   help="with --http-port: allow browser calls from this origin (e.g. https://shop.example.com, "
                        "or * for any)")
    p.add_argument("--tls-cert", default=None, help="serve gRPC (and --http-port) over TLS with this certificate "
                                                    "chain (PEM)")
    p.add_argument("--tls-key", default=None, help="private key (PEM) of --tls-cert")
    p.add_argument("--tls-ca", default=None,
                   help="mutual TLS: clients must present a certificate signed by this CA (PEM); a root also "
                        "verifies its shard servers with it and shows them its own --tls-cert")
    p.add_argument("--no-watch", dest="watch", action="store_const", const=False, default=None,
                   help="do not watch CURRENT for new versions (no hot swap)")
    p.add_argument("--poll-s", type=float, default=None, help="seconds between two reads of CURRENT")
    p.add_argument("--device", default=None, help="torch device of the query embedding, e.g. cuda (default cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="arithmetic of the query embedding: auto (default) computes in bf16 where the CPU "
                        "(AVX512-BF16 or AMX) or GPU does it natively, else fp32; bf16 and fp32 embeddings are "
                        "interchangeable, so it need not match the index build's")
    p.add_argument("--no-micro-batch", dest="micro_batch", action="store_const", const=False, default=None,
                   help="embed each image query on its own (no dynamic batching)")
    p.add_argument("--max-batch", type=int, default=None, help="most images per embedding batch")
    p.add_argument("--max-wait-ms", type=float, default=None, help="longest wait for a batch to fill (ms)")
    p.add_argument("--batch-workers", type=int, default=None, help="threads running embedding batches")
    p.add_argument("--faiss-threads", type=int, default=None,
                   help="OpenMP threads per Faiss call (default 1: concurrent requests use the cores)")
    p.add_argument("--faiss-batch-threads", type=int, default=None,
                   help="OpenMP threads of a Faiss call searching 8 or more queries at once, as in a BatchSearch "
                        "(default 0: all cores)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per forward pass")
    p.add_argument("--grace-s", type=float, default=None, help="seconds in-flight requests get on shutdown")
    p.add_argument("--log-json", action="store_const", const=True, default=None, help="JSON log lines")
    r = p.add_argument_group("remote shards", "one root fans out to shard servers, each holding some Faiss shards "
                                              "(policy for missing shards: protos/vitrine/v1/search.proto)")
    r.add_argument("--role", choices=("standalone", "root", "shard"), default=None,
                   help="standalone (default): every shard here; root: embed, fan out to --shard-servers, merge, "
                        "re-rank; shard: serve only --shards to a root")
    r.add_argument("--shards", default=None, help="role shard: the Faiss shards to serve, manifest positions (0,1)")
    r.add_argument("--shard-servers", default=None, help="role root: the shard servers, host:port,host:port")
    r.add_argument("--shard-timeout-ms", type=float, default=None,
                   help="role root: deadline of each shard call in ms (default 1000; capped by the client's deadline)")
    r.add_argument("--require-all-shards", action="store_const", const=True, default=None,
                   help="role root: answer UNAVAILABLE when a shard is missing instead of a partial result")
    p.set_defaults(handler=commands.cmd_serve)


def _add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="query a running server by image file or product id",
                       description="Send one Search request (or, with several --image files, one BatchSearch) "
                                   "and print the results as a table.")
    p.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", action="append",
                   help="image file to search with (JPEG, PNG, WebP, AVIF, HEIC); repeatable")
    q.add_argument("--product-id", help="search for products similar to this catalog product")
    q.add_argument("--info", action="store_true", help="print the served index version's description")
    p.add_argument("--top-k", type=int, default=10, help="number of results")
    p.add_argument("--category", action="append", default=None, help="only this category (repeatable)")
    p.add_argument("--brand", action="append", default=None, help="only this brand (repeatable)")
    p.add_argument("--min-price", type=float, default=None, help="minimum price")
    p.add_argument("--max-price", type=float, default=None, help="maximum price")
    p.add_argument("--in-stock", action="store_true", help="only products in stock")
    p.add_argument("--nprobe", type=int, default=0, help="IVF lists to visit (0: the index default)")
    p.add_argument("--no-rerank", action="store_true", help="skip the exact re-rank (faster, approximate scores)")
    p.add_argument("--all-images", action="store_true", help="allow several hits of one product")
    p.add_argument("--crop", default=None, metavar="X,Y,W,H",
                   help="with --image: search with this part of the photo only, in fractions of its width and "
                        "height (e.g. 0.5,0,0.5,1 for the right half)")
    p.add_argument("--shrink", action="store_true",
                   help="with --image: send each photo downscaled to the size the server's model uses (GetIndexInfo's "
                        "query image size): a phone photo uploads as tens of kilobytes instead of megabytes, with "
                        "nearly the same results")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    p.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's CAs")
    p.add_argument("--tls-ca", default=None, help="connect over TLS, trusting this CA (PEM)")
    p.add_argument("--tls-cert", default=None, help="client certificate (PEM) for a server that requires one")
    p.add_argument("--tls-key", default=None, help="private key (PEM) of --tls-cert")
    p.set_defaults(handler=commands.cmd_query)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="ingest, train, index, serve and query the bundled mini catalog",
                       description="Runs the whole path on data/mini-catalog in a work folder: ingest, a short "
                                   "training run, index build, a gRPC server on a free port, queries with the "
                                   "catalog's test-split images, top-1 relevance, and an HTML page of results.")
    p.add_argument("--work-dir", default="work/demo", help="folder for every artifact of the demo")
    p.add_argument("--catalog", default=None, help="catalog folder with styles.csv and images/ "
                                                   "(default: the bundled data/mini-catalog)")
    p.add_argument("--model", default=None, help="checkpoint to index with (default: the committed default model)")
    p.add_argument("--train", action="store_true",
                   help="train a small model on the catalog instead of using the default model")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs with --train (default: the demo's setting)")
    p.add_argument("--fresh", action="store_true", help="delete the work folder first and redo every stage")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="embedding arithmetic of the index build and the server (default auto: bf16 where the CPU "
                        "computes it natively, else fp32); with a live index, add --fresh to re-embed")
    p.set_defaults(handler=commands.cmd_demo)


_OS_ERRORS = ((FileNotFoundError, "no such file or folder"),
              (FileExistsError, "a file is in the way (a folder was to be made there)"),
              (IsADirectoryError, "is a folder: name a file"),
              (NotADirectoryError, "a part of this path is a file, not a folder"),
              (PermissionError, "permission denied"))


def describe_os_error(err: OSError) -> str:
    """One line naming the path and what was wrong with it, for the file errors a command can meet on the
    user's paths (a bare "[Errno 17] File exists: 'x'" says neither which option nor what to do)."""
    if err.filename is None:  # raised by vitrine with its own message
        return str(err)
    what = next((text for kind, text in _OS_ERRORS if isinstance(err, kind)), err.strerror or str(err))
    target = f" -> {err.filename2}" if err.filename2 is not None else ""
    return f"{err.filename}{target}: {what}"


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitrine", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_ingest, model_cli.add_annotate, model_cli.add_teacher, model_cli.add_train,
                model_cli.add_binarize, model_cli.add_evaluate, _add_index, _add_serve, _add_query, _add_demo):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = create_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded is not news
    tune_malloc()  # glibc keeps freed buffers for reuse: torch's forward on the CPU 1.35-1.52x faster (model.runtime)
    command = " ".join(word for word in (args.command, getattr(args, "index_command", None)) if word)  # index update
    try:
        return int(args.handler(args))
    except commands.GateFailed as err:  # a build refused to publish: say why, CURRENT untouched
        print(f"vitrine {command}: {err}", file=sys.stderr)
        return 1
    except (commands.UserError, ValueError) as err:  # bad input: say what
        print(f"vitrine {command}: error: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        print(f"vitrine {command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitrine {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
