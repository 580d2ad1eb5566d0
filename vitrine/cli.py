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

from vitrine import commands, model_cli

DESCRIPTION = """\
vitrine: visual shopping search. A shopper's photo goes in; visually similar products come out.

Typical flow (see README.md):
  vitrine ingest --csv styles.csv --images images/ --out work/shards
  vitrine annotate --shards work/shards --out work/weak_labels.json
  vitrine train --stage pretrain --shards work/shards --weak-labels work/weak_labels.json --out work/pretrain
  vitrine train --shards work/shards --init-from work/pretrain --tasks category,colour --out work/model
  vitrine index build --shards work/shards --model work/model --index-root work/index
  vitrine serve --index-root work/index --port 50051
  vitrine query --target localhost:50051 --image photo.jpg
  vitrine demo            # all of the above on the bundled mini catalog
"""


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="catalog CSV + images folder -> LMDB shards + manifest.json",
                       description="Read a catalog CSV (column mapping from --catalog-config) and its images, "
                                   "validate every image and write bounded LMDB shards plus manifest.json. "
                                   "Defective rows are repaired or counted in the report, never silently dropped.")
    p.add_argument("--csv", required=True, help="catalog CSV, one row per product")
    p.add_argument("--images", required=True, help="folder holding the product images")
    p.add_argument("--out", required=True, help="output folder for shard-*.lmdb and manifest.json")
    p.add_argument("--catalog-config", default=None,
                   help="JSON file with the column mapping (model.catalog.CatalogConfig fields); "
                        "default fits the fashion-product-images dataset")
    p.add_argument("--max-records-per-shard", type=int, default=None, help="records per LMDB shard")
    p.add_argument("--workers", type=int, default=0,
                   help="processes decoding and validating images (default 0: one per CPU core)")
    p.add_argument("--max-side", type=int, default=None,
                   help="downscale and re-encode (JPEG) images whose longer side exceeds this many pixels")
    p.set_defaults(handler=commands.cmd_ingest)


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build and inspect index versions",
                       description="Index versions live in <index-root>/<version>/; <index-root>/CURRENT names "
                                   "the live one.")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="{build,list,rollback}")
    b = isub.add_parser("build", help="embed the catalog and build + validate + publish a Faiss index version",
                        description="Embed every shard record with the model, build a Faiss index (exact below a "
                                    "size threshold, IVF-PQ above; see indexer.plan), validate recall against "
                                    "exact search, write the version folder and replace CURRENT atomically.")
    b.add_argument("--shards", required=True, help="folder written by `vitrine ingest`")
    b.add_argument("--model", default=None,
                   help="checkpoint folder written by `vitrine train` (default: the committed default model)")
    b.add_argument("--index-root", required=True, help="folder holding index versions and CURRENT")
    b.add_argument("--factory", default=None, help="Faiss factory string (default: planned from catalog size)")
    b.add_argument("--batch-size", type=int, default=None, help="images per embedding batch")
    b.set_defaults(handler=commands.cmd_index_build)
    ls = isub.add_parser("list", help="list the versions under an index root (the live one marked *)")
    ls.add_argument("--index-root", required=True, help="folder holding index versions and CURRENT")
    ls.set_defaults(handler=commands.cmd_index_list)
    rb = isub.add_parser("rollback", help="make an earlier version live again (default: the previous one)",
                         description="Verify an earlier complete version (it opens, every checksum matches) and "
                                     "replace CURRENT with it atomically. A failed rollback leaves CURRENT as it was.")
    rb.add_argument("--index-root", required=True, help="folder holding index versions and CURRENT")
    rb.add_argument("--to", default=None, help="version name to make live (default: the one before CURRENT)")
    rb.set_defaults(handler=commands.cmd_index_rollback)


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
    p.add_argument("--workers", dest="max_workers", type=int, default=None, help="gRPC worker threads")
    p.add_argument("--max-concurrent-rpcs", type=int, default=None,
                   help="requests in progress at once; more are answered RESOURCE_EXHAUSTED")
    p.add_argument("--max-message-bytes", type=int, default=None, help="largest request/response (bytes)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--no-watch", dest="watch", action="store_const", const=False, default=None,
                   help="do not watch CURRENT for new versions (no hot swap)")
    p.add_argument("--poll-s", type=float, default=None, help="seconds between two reads of CURRENT")
    p.add_argument("--no-micro-batch", dest="micro_batch", action="store_const", const=False, default=None,
                   help="embed each image query on its own (no dynamic batching)")
    p.add_argument("--max-batch", type=int, default=None, help="most images per embedding batch")
    p.add_argument("--max-wait-ms", type=float, default=None, help="longest wait for a batch to fill (ms)")
    p.add_argument("--batch-workers", type=int, default=None, help="threads running embedding batches")
    p.add_argument("--faiss-threads", type=int, default=None, help="OpenMP threads per Faiss call")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per forward pass")
    p.add_argument("--grace-s", type=float, default=None, help="seconds in-flight requests get on shutdown")
    p.add_argument("--log-json", action="store_const", const=True, default=None, help="JSON log lines")
    p.set_defaults(handler=commands.cmd_serve)


def _add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="query a running server by image file or product id",
                       description="Send one Search request (or, with several --image files, one BatchSearch) "
                                   "and print the results as a table.")
    p.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", action="append", help="image file to search with (JPEG, PNG, WebP); repeatable")
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
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
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
    p.set_defaults(handler=commands.cmd_demo)


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitrine", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_ingest, model_cli.add_annotate, model_cli.add_teacher, model_cli.add_train, _add_index,
                _add_serve, _add_query, _add_demo):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = create_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded is not news
    try:
        return int(args.handler(args))
    except (commands.UserError, ValueError, FileExistsError, FileNotFoundError) as err:  # bad input: say what
        print(f"vitrine {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitrine {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
