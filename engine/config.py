"""The server's configuration: one frozen ServerConfig from defaults, a file, the environment and flags.

Precedence, lowest first: the dataclass defaults < a JSON or TOML file (`--config`) < environment
variables `VITRINE_<FIELD>` (e.g. `VITRINE_PORT=50052`, `VITRINE_INDEX_ROOT=/data/index`) < command
line flags. Values from the file and the environment are converted to the field's type; an unknown
key or a value that does not convert raises ConfigError naming the source.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.precision import PRECISIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "VITRINE_"
ROLES = ("standalone", "root", "shard")  # every shard in one process; a fan-out root; a shard server


class ConfigError(ValueError):
    """A configuration value is unknown or malformed; the message names the source and the key."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Configuration of one VisualSearch server."""

    index_root: Path  # folder holding index versions and CURRENT
    model: Path | None = None  # checkpoint folder; None: the version manifest's model_path
    host: str = "127.0.0.1"  # interface to bind ("0.0.0.0": every interface)
    port: int = 50051  # TCP port; 0: any free port (create_server returns the real one)
    max_workers: int = 8  # threads serving requests concurrently (per process)
    processes: int = 1  # server processes sharing the port (SO_REUSEPORT), each with its own GIL, model and index
    max_concurrent_rpcs: int = 64  # requests in progress at once; more are answered RESOURCE_EXHAUSTED
    max_message_bytes: int = 16 << 20  # largest request/response in bytes (bounds query image size)
    max_image_pixels: int = 40_000_000  # largest decoded query image, width * height pixels (a JPEG up to 64x
    # larger is decoded at 1/2, 1/4 or 1/8 scale under it: model.images.decode_image)
    max_batch_queries: int = 1024  # most searches in one BatchSearch call
    default_top_k: int = 10  # hits returned when a request's top_k is 0
    exact_max: int = 20_000  # filters passing at most this many vectors are answered by exact search
    rerank_depth: int = 100  # fewest candidates re-scored exactly with the stored float16 vectors
    device: str = "cpu"  # torch device of the embedder ("cuda" when present)
    precision: str = "auto"  # embedder arithmetic: auto (bf16 where the CPU/GPU computes it natively), fp32, bf16
    grace_s: float = 5.0  # seconds in-flight requests get to finish on shutdown
    micro_batch: bool = True  # embed concurrent image queries together
    max_batch: int = 32  # most images per embedding batch
    max_wait_ms: float = 5.0  # longest a queued image waits for others to join its batch, milliseconds
    batch_workers: int = 2  # threads running embedding batches (about one per core)
    torch_threads: int = 1  # torch intra-op threads per forward pass (concurrency comes from requests/workers)
    watch: bool = True  # poll <index_root>/CURRENT and hot-swap to a newly published version
    poll_s: float = 2.0  # seconds between two reads of CURRENT
    metrics_port: int | None = None  # Prometheus /metrics HTTP port; None: no metrics endpoint (0: any free port)
    metrics_host: str = "127.0.0.1"  # interface of the metrics endpoint
    http_port: int | None = None  # HTTP/JSON gateway port (engine.http_gateway) on `host`; None: none (0: any free)
    http_cors_origin: str | None = None  # the gateway's Access-Control-Allow-Origin ("*" or an origin); None: no CORS
    tls_cert: Path | None = None  # PEM certificate (chain): serve gRPC and the HTTP gateway over TLS only
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_ca: Path | None = None  # PEM CA: clients must present a certificate it signed (mTLS); a root verifies its
    # shard servers with it and presents tls_cert to them
    faiss_threads: int = 1  # OpenMP threads per Faiss call (requests already run in parallel)
    faiss_batch_threads: int = 0  # OpenMP threads of a Faiss call for >= 8 queries (BatchSearch); 0: all cores
    log_json: bool = False  # log one JSON object per line instead of plain text
    role: str = "standalone"  # "standalone": every Faiss shard here; "root": fan out to shard_servers; "shard"
    shards: tuple[int, ...] = ()  # role shard: the manifest positions of the Faiss shards served ("0,1")
    shard_servers: tuple[str, ...] = ()  # role root: the shard servers, host:port each ("h1:50061,h2:50061")
    shard_timeout_ms: float = 1000.0  # role root: deadline of each shard call, ms (capped by the client's deadline)
    require_all_shards: bool = False  # role root: a missing shard fails the call (UNAVAILABLE) instead of partial

    def __post_init__(self) -> None:
        check_role(self)


def check_role(config: ServerConfig) -> None:
    """ConfigError when the role settings do not fit together (e.g. a root without shard servers)."""
    if config.role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {config.role!r}")
    if config.role == "shard" and not config.shards:
        raise ConfigError("a shard server needs the shards it serves: --shards 0,1 (manifest positions)")
    if config.role != "shard" and config.shards:
        raise ConfigError(f"--shards is for --role shard; a {config.role} server holds every shard")
    if config.role == "root" and not config.shard_servers:
        raise ConfigError("a root needs its shard servers: --shard-servers host:port,host:port")
    if config.role != "root" and config.shard_servers:
        raise ConfigError(f"--shard-servers is for --role root, not {config.role}")
    if any(shard < 0 for shard in config.shards):
        raise ConfigError(f"shard numbers are manifest positions (0, 1, ...), got {list(config.shards)}")
    bad = [target for target in config.shard_servers if not _is_host_port(target)]
    if bad:
        raise ConfigError(f"shard servers must be host:port, got {bad}")
    if config.processes < 1:
        raise ConfigError(f"processes must be >= 1, got {config.processes}")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"precision must be auto, fp32 or bf16, got {config.precision!r}")
    if config.http_port is not None and config.role == "shard":
        raise ConfigError("--http-port is for the servers clients call (standalone or root), not a shard server")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("TLS needs both tls_cert and tls_key (--tls-cert, --tls-key), or neither")
    if config.tls_ca is not None and config.tls_cert is None:
        raise ConfigError("tls_ca (mutual TLS) needs the server's own tls_cert and tls_key")
    if config.shard_timeout_ms <= 0:
        raise ConfigError(f"shard_timeout_ms must be > 0, got {config.shard_timeout_ms}")
    check_ranges(config)


# settings that must be at least this (a port out of 0-65535 was bound modulo 65536: 70000 served on 4464)
_MINIMUM: dict[str, float] = {
    "max_workers": 1, "max_concurrent_rpcs": 1, "max_message_bytes": 1, "max_image_pixels": 1,
    "max_batch_queries": 1, "default_top_k": 1, "exact_max": 0, "rerank_depth": 0, "grace_s": 0, "max_batch": 1,
    "max_wait_ms": 0, "batch_workers": 1, "torch_threads": 1, "faiss_threads": 1, "faiss_batch_threads": 0}


def check_ranges(config: ServerConfig) -> None:
    """ConfigError naming the first setting out of its range (ports 0-65535, counts >= 1, poll_s > 0, ...)."""
    for name in ("port", "metrics_port", "http_port"):
        value = getattr(config, name)
        if value is not None and not 0 <= value <= 65535:
            raise ConfigError(f"{name} must be a TCP port in 0-65535 (0: any free port), got {value}")
    for name, low in _MINIMUM.items():
        if getattr(config, name) < low:
            raise ConfigError(f"{name} must be >= {low:g}, got {getattr(config, name)}")
    if not config.poll_s > 0:
        raise ConfigError(f"poll_s must be > 0 (seconds between two reads of CURRENT), got {config.poll_s}")


def _is_host_port(target: str) -> bool:
    host, _, port = target.rpartition(":")
    return bool(host) and port.isdigit()


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ServerConfig)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """`value` (from a file or an environment string) converted to the field type `hint`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:  # "0,1" or [0, 1] -> (0, 1)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a comma-separated list, got {value!r}")
        return tuple(_convert(item.strip() if isinstance(item, str) else item, args[0], where)
                     for item in items if not (isinstance(item, str) and not item.strip()))
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(f"{value!r} is not a boolean")
            return text in ("1", "true", "yes", "on")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return hint(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(hint, '__name__', hint)}: {exc}") from exc


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The raw key/value table of a JSON (.json) or TOML (.toml) config file (a [server] table is unwrapped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("server"), dict):
        data = data["server"]
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings, not {type(data).__name__}")
    return data


def load_server_config(file: str | Path | None = None, env: Mapping[str, str] | None = None,
                       overrides: Mapping[str, Any] | None = None) -> ServerConfig:
    """Resolve a ServerConfig: defaults < `file` < `env` (VITRINE_*; default os.environ) < `overrides`.

    `overrides` are already typed (command-line flags); None values in it mean "not given".
    """
    hints = _field_types()
    values: dict[str, Any] = {}
    if file is not None:
        for key, value in load_config_file(file).items():
            if key not in hints:
                raise ConfigError(f"config file {file}: unknown setting {key!r} (known: {', '.join(hints)})")
            values[key] = _convert(value, hints[key], f"config file {file}, {key}")
    env = os.environ if env is None else env
    for key, hint in hints.items():
        name = ENV_PREFIX + key.upper()
        if name in env:
            values[key] = _convert(env[name], hint, f"environment variable {name}")
    for key, value in (overrides or {}).items():
        if key not in hints:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = _convert(value, hints[key], f"flag --{key.replace('_', '-')}")
    if "index_root" not in values:
        raise ConfigError(f"the index root is not set: pass --index-root, set {ENV_PREFIX}INDEX_ROOT "
                          "or index_root in the config file")
    try:
        return ServerConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def config_to_json(config: ServerConfig) -> dict[str, Any]:
    """The config as JSON-ready values (paths as strings), e.g. to log it at startup."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(config).items()}
