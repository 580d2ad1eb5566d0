"""Handlers of the `vitrine` subcommands: turn parsed arguments into library calls.

Each handler takes the argparse namespace and returns a process exit code. Libraries are
imported inside the handlers so the parser (and `--help`) never pays for torch or faiss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("vitrine.cli")


class UserError(Exception):
    """A problem with what the user asked for; printed without a traceback, exit code 2."""


class GateFailed(Exception):
    """The build's validation gate or memory check failed; printed without a traceback, exit code 1."""


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p} (check the path)")
    return p


def _existing_file(path: str, what: str) -> Path:
    """The named file; UserError when it is missing or a folder (a folder was an IsADirectoryError traceback)."""
    p = _existing(path, what)
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder: name a file")
    return p


def _existing_folder(path: str, what: str) -> Path:
    """The named folder; UserError when it is missing or a file (a file was a NotADirectoryError traceback)."""
    p = _existing(path, what)
    if not p.is_dir():
        raise UserError(f"{what} {p} is a file: name a folder")
    return p


def _folder_to_write(path: str, what: str) -> Path:
    """A folder a command writes into, existing or not yet; UserError when a file is there (a NotADirectoryError
    traceback, or for `train --out` a file moved aside after the whole training)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file: name a folder")
    return p


def _read_file(path: str, what: str) -> bytes:
    """The bytes of a file the user named; UserError when it is missing, a folder or unreadable."""
    p = _existing(path, what)
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder: name a file")
    try:
        return p.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {what} {p}: {err.strerror or err}") from err


def _overrides(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    """Config fields set on the command line: {config field: value} for every flag that was given."""
    return {field: getattr(args, flag) for flag, field in mapping.items() if getattr(args, flag) is not None}


def _default_or_existing_model(path: str | None) -> Path:
    """The named checkpoint (which must exist), or the committed default model when none is named."""
    from model.checkpoint import default_model_path

    return _existing_folder(path, "model checkpoint") if path else default_model_path()


def cmd_ingest(args: argparse.Namespace) -> int:
    from model.catalog import CatalogConfig, load_catalog_config
    from model.data.ingest import NoUsableImages, build_shards
    from model.data.sources import FetchSettings

    csv_path = _existing_file(args.csv, "catalog CSV")
    config = load_catalog_config(_existing_file(args.catalog_config, "catalog config")) if args.catalog_config \
        else CatalogConfig()
    if args.images is None and config.image_column is None:
        raise UserError("--images is needed: the catalog config names no image_column, so each image is looked "
                        f"for as {config.image_pattern!r} inside the images folder")
    images = _existing(args.images, "images folder") if args.images is not None else None
    for flag, value, low in (("--download-threads", args.download_threads, 1),
                             ("--download-retries", args.download_retries, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if not args.download_timeout > 0:
        raise UserError(f"--download-timeout must be positive, got {args.download_timeout}")
    if not args.image_max_age_h >= 0:
        raise UserError(f"--image-max-age-h must be at least 0, got {args.image_max_age_h}")
    fetch = FetchSettings(threads=args.download_threads, timeout_s=args.download_timeout,
                          retries=args.download_retries, refresh=args.refresh_images,
                          max_age_s=args.image_max_age_h * 3600.0)
    kwargs = {} if args.max_records_per_shard is None else {"max_records_per_shard": args.max_records_per_shard}
    try:
        report = build_shards(csv_path, images, Path(args.out), config, workers=args.workers,
                              max_side=args.max_side, image_cache=args.image_cache, fetch=fetch,
                              overwrite=args.overwrite, **kwargs)
    except NoUsableImages as err:  # the report (each problem image) is printed as for a good ingest, then exit 2
        print(json.dumps(err.report.to_json(), indent=2))
        raise UserError(str(err)) from err
    print(json.dumps(report.to_json(), indent=2))
    return 0


_BUILD_FLAGS = {"factory": "factory", "nprobe": "nprobe", "num_shards": "num_shards", "min_recall": "min_recall_at_10",
                "validation_queries": "validation_queries", "keep": "keep_versions", "seed": "seed",
                "use_gpu": "use_gpu", "batch_size": "batch_size", "tune_search": "tune_search",
                "precision": "precision"}


def _run_gated(run: Any) -> Any:
    """Run a build; a failed validation gate or memory check exits non-zero with the reason."""
    from indexer.errors import StageError, ValidationFailed
    from indexer.plan import MemoryBudgetError

    try:
        return run()
    except StageError as err:
        raise UserError(str(err)) from err
    except ValidationFailed as err:
        raise GateFailed(f"{err} (CURRENT is unchanged)") from err
    except MemoryBudgetError as err:
        raise GateFailed(f"{err} (CURRENT is unchanged)") from err


def cmd_index_build(args: argparse.Namespace) -> int:
    from indexer.job import STAGES, IndexBuildConfig, build_index, clean_work
    from indexer.plan import parse_bytes

    shards = _existing_folder(args.shards, "shards folder")
    config = IndexBuildConfig(shards_dir=shards, model=_default_or_existing_model(args.model),
                              index_root=_folder_to_write(args.index_root, "index root"))
    if not (shards / "manifest.json").is_file():  # it was a bare [Errno 2] line about manifest.json
        raise UserError(f"{args.shards} holds no manifest.json: not the output of an ingest; run the ingest step "
                        "(vitrine ingest) first")
    config = dataclasses.replace(config, **_overrides(args, {
        **_BUILD_FLAGS, "workers": "num_workers", "chunk_rows": "chunk_rows", "device": "device", "forward": "forward",
        "target_recall": "target_recall", "work_dir": "work_dir", "backend": "backend", "ray_address": "ray_address",
        "ray_actors": "ray_actors", "ray_cpus_per_actor": "ray_cpus_per_actor", "max_removed": "max_removed_fraction"}))
    if args.memory_budget is not None:
        config = dataclasses.replace(config, memory_budget=parse_bytes(args.memory_budget))
    if args.no_publish:
        config = dataclasses.replace(config, publish=False)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else STAGES
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {unknown} in --stages: choose from {','.join(STAGES)}")
    if config.backend == "ray" and "embed" in stages:  # say it now, not after hashing the inputs
        from indexer.embed_ray import import_ray

        _run_gated(import_ray)
    if args.fresh:
        _run_gated(lambda: clean_work(config))  # refused while a build runs in the work folder
    version = _run_gated(lambda: build_index(config, stages))
    if "publish" in stages and config.publish:
        print(f"published index version: {version}")
    else:
        print(f"stages {','.join(stages)} done: {version}")
    return 0


def cmd_index_update(args: argparse.Namespace) -> int:
    from indexer.errors import VersionError
    from indexer.update import IndexUpdateConfig, update_index

    config = IndexUpdateConfig(csv_path=_existing_file(args.csv, "catalog CSV"),
                               images_dir=_existing(args.images, "images") if args.images is not None else None,
                               index_root=_existing_folder(args.index_root, "index root"), image_cache=args.image_cache,
                               image_max_age_h=args.image_max_age_h,
                               catalog_config=(_existing_file(args.catalog_config, "catalog config")
                                               if args.catalog_config else None),
                               model=Path(args.model) if args.model else None)
    config = dataclasses.replace(config, **_overrides(args, {**_BUILD_FLAGS, "max_removed": "max_removed_fraction"}))
    if args.no_publish:
        config = dataclasses.replace(config, publish=False)
    try:
        path, report = _run_gated(lambda: update_index(config))
    except VersionError as err:  # nothing published yet (or CURRENT broken) was a traceback
        if (Path(args.index_root) / "CURRENT").is_file():  # "build first" misled: the live version is damaged
            raise UserError(f"{err} (an update starts from the live version, which does not open: make an intact "
                            "one live with `vitrine index rollback --to NAME` (it checks every file; `vitrine index "
                            "list` names the versions), or run a full `vitrine index build`)") from err
        raise UserError(f"{err} (an update needs a live version: run `vitrine index build` first)") from err
    print(json.dumps(report, indent=2))
    print(f"{'published' if config.publish else 'wrote'} index version: {path}")
    return 0


def cmd_index_list(args: argparse.Namespace) -> int:
    import sys

    from indexer.errors import VersionError
    from indexer.rollback import previous_version
    from indexer.version import check_version, list_versions, read_current

    root = _existing_folder(args.index_root, "index root")
    names = list_versions(root)
    current: str | None = None
    try:
        current = read_current(root)
    except VersionError as err:  # nothing published yet, or a CURRENT that names no folder: say so, list the rest
        if (root / "CURRENT").exists():
            print(f"warning: {err}: no version is live", file=sys.stderr)
    if current is not None and current not in names:  # the servers cannot load it: no line was marked, silently
        print(f"warning: CURRENT names {current}, which is not a complete version under {root}: no version is live "
              "(`vitrine index rollback --to NAME` publishes one of those listed)", file=sys.stderr)
    if not names:
        print(f"no index versions under {root} (`vitrine index build` writes them)", file=sys.stderr)
    try:  # what a plain `index rollback` would make live, marked "<" (None when there is nothing to go back to)
        back: str | None = previous_version(root) if current in names else None
    except VersionError:
        back = None
    width = max((len(name) for name in names), default=0)  # "-1" collision suffixes must not shift the columns
    for name in names:
        mark = "*" if name == current else "<" if name == back else " "
        try:
            manifest = json.loads((root / name / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # one broken folder must not hide the others
            print(f"{mark} {name:<{width}}  (unreadable {root / name / 'manifest.json'}: {err})")
            continue
        try:  # a truncated or missing file, an edited count: listed like a good version, then refused by rollback
            check_version(root / name)
            damage = ""
        except (VersionError, TypeError, ValueError, KeyError) as err:
            damage = f"  DAMAGED: {err}"
        print(f"{mark} {name:<{width}}  {manifest.get('factory', '?'):<20} count={manifest.get('count', '?')} "
              f"recall@10={manifest.get('validation', {}).get('recall_at_10', '?')}{damage}")
    return 0


def cmd_index_rollback(args: argparse.Namespace) -> int:
    from indexer.errors import VersionError
    from indexer.rollback import rollback

    root = _existing_folder(args.index_root, "index root")
    try:
        name = rollback(root, to=args.to)
    except VersionError as err:
        raise UserError(f"{err} (CURRENT is unchanged)") from err
    print(f"CURRENT is now {name}")
    return 0


_SERVE_FLAGS = ("index_root", "model", "host", "port", "processes", "max_workers", "max_concurrent_rpcs",
                "max_message_bytes",
                "metrics_port", "watch", "poll_s", "micro_batch", "max_batch", "max_wait_ms", "batch_workers",
                "faiss_threads", "faiss_batch_threads", "torch_threads", "grace_s", "log_json", "role", "shards",
                "shard_servers", "shard_timeout_ms", "require_all_shards", "http_port", "http_cors_origin",
                "tls_cert", "tls_key", "tls_ca", "precision", "device")


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.config import ConfigError, load_server_config

    if args.index_root is not None:
        _existing(args.index_root, "index root")
    try:
        config = load_server_config(args.config, None, {flag: getattr(args, flag) for flag in _SERVE_FLAGS})
    except ConfigError as err:
        raise UserError(str(err)) from err
    if config.processes > 1:  # a supervisor of worker processes sharing the port
        from engine.lifecycle import run_workers

        return run_workers(config)
    if config.role == "shard":  # a shard server loads no model: keep torch out of the process
        from engine.shard_server import serve_shard

        return serve_shard(config)
    from engine.server import serve

    return serve(config)


def _crop(text: str) -> tuple[float, float, float, float]:
    """--crop X,Y,W,H as four floats (the server checks that the region lies inside the image)."""
    try:
        x, y, width, height = (float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--crop must be X,Y,W,H in fractions of the image (e.g. 0.5,0,0.5,1), got {text!r}") from None
    return x, y, width, height


def cmd_query(args: argparse.Namespace) -> int:
    import grpc

    from engine.client import VisualSearchClient, format_results_table
    from engine.tls import TlsError
    from engine.types import SearchFilter, SearchOptions, SearchQuery, SearchRequest

    search_filter = SearchFilter(categories=tuple(args.category or ()), brands=tuple(args.brand or ()),
                                 min_price=args.min_price, max_price=args.max_price, in_stock_only=args.in_stock)
    options = SearchOptions(nprobe=args.nprobe, exact_rerank=not args.no_rerank, one_per_product=not args.all_images)
    images = [_read_file(path, "image file") for path in args.image or ()]
    crop = _crop(args.crop) if args.crop is not None else None
    if crop is not None and not images:
        raise UserError("--crop marks part of a query photo: it needs --image")
    try:
        with VisualSearchClient(args.target, timeout_s=args.timeout, tls=args.tls, tls_ca=args.tls_ca,
                                tls_cert=args.tls_cert, tls_key=args.tls_key) as client:
            if args.info:
                print(json.dumps(dataclasses.asdict(client.index_info()), indent=2, default=str))
                return 0
            if args.shrink:
                images = [client.shrink(data, crop) for data in images]
            if len(images) > 1:
                requests = [SearchRequest(SearchQuery(image=data, crop=crop), args.top_k, search_filter, options)
                            for data in images]
                for path, item in zip(args.image, client.batch_search(requests), strict=True):
                    print(f"== {path}")
                    print(format_results_table(item.result) if item.result else f"{item.code}: {item.message}")
                return 0
            if images:
                result = client.search_image(images[0], top_k=args.top_k, filter=search_filter, options=options,
                                             crop=crop)
            else:
                result = client.search_product(args.product_id, top_k=args.top_k, filter=search_filter,
                                               options=options)
    except grpc.RpcError as err:
        raise UserError(f"{args.target} answered {err.code().name}: {err.details()}") from err
    except TlsError as err:
        raise UserError(str(err)) from err
    print(format_results_table(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vitrine.demo import DemoConfig, run_demo

    config = DemoConfig(work_dir=_folder_to_write(args.work_dir, "--work-dir"), fresh=args.fresh, train=args.train,
                        precision=args.precision,
                        model=_existing(args.model, "model checkpoint") if args.model else None)
    if args.catalog:
        config = dataclasses.replace(config, catalog_dir=_existing(args.catalog, "catalog folder"))
    if args.epochs is not None:
        config = dataclasses.replace(config, epochs=args.epochs)
    run_demo(config)
    return 0
