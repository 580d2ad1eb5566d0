"""HTTP/JSON access to the VisualSearch API, for browsers, curl and web back ends that do not speak gRPC.

`vitrine serve --http-port 8080` serves, beside gRPC and from the same process, index and model:

  POST /v1/search           a SearchRequest as JSON, or the raw image as the body (Content-Type image/*
                            or application/octet-stream; an image sent with another type, e.g. curl
                            --data-binary's default, is recognised by its first bytes) with query
                            parameters top_k, category and brand (repeatable), min_price, max_price,
                            in_stock, nprobe, exact_rerank, one_per_product, crop (x,y,width,height:
                            fractions of the image)
  POST /v1/batch-search     a BatchSearchRequest as JSON
  POST /v1/embed            an EmbedRequest as JSON, or the raw image as the body
  GET  /v1/products/<id>    GetProduct (the id URL-encoded)
  GET  /v1/index            GetIndexInfo
  GET  /healthz             200 {"status": "SERVING"}, else 503

JSON is the proto3 JSON mapping of the messages in protos/vitrine/v1/search.proto: field names as in the
proto (lowerCamelCase is accepted too), int64 fields (took_us, count) as strings, enums by name, answers with
every field at its default too ("hits": [], "code": 0, "partial": false) but those with presence (an unknown
Product.price is absent), bytes as base64 (an `image` may also be a browser's data URL,
"data:image/jpeg;base64,..."; text that is not base64 is refused), unknown fields refused. Every call runs the
gRPC servicer's own method, so validation, limits, metrics, logs and status codes are the same. A
failed call answers {"code": "INVALID_ARGUMENT", "message": "..."} with the HTTP status of its gRPC
code (the google.api HTTP mapping: INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429,
UNAVAILABLE 503, DEADLINE_EXCEEDED 504, INTERNAL 500, ...). A deadline: header `X-Timeout-Ms` or
query parameter `timeout_ms`. Requests beyond `max_concurrent` in progress answer 429 at once; bodies
over `max_body_bytes` answer 413 without being read; a connection idle for `idle_timeout_s` (30 s) is
closed, so idle keep-alive clients do not hold a thread each. CORS: `cors_origin` (e.g. "*" or
"https://shop.example.com") adds the Access-Control headers and answers OPTIONS preflights.
"""

from __future__ import annotations

import http.server
import json
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from protos.vitrine.v1 import search_pb2

logger = logging.getLogger("vitrine.engine")

HTTP_STATUS = {  # google.api's mapping of gRPC codes to HTTP statuses
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
IMAGE_TYPES = ("image/", "application/octet-stream")
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def looks_like_image(body: bytes) -> bool:
    """True when `body` starts like an image file: JPEG, PNG, GIF, BMP, TIFF, WebP (RIFF....WEBP) or an ISO
    media file (AVIF, HEIC: ....ftyp). Unsupported formats among them then get the decoder's clear error."""
    return (body.startswith(IMAGE_SIGNATURES) or (body[:4] == b"RIFF" and body[8:12] == b"WEBP")
            or body[4:8] == b"ftyp")
IDLE_TIMEOUT_S = 30.0  # each connection has a thread: idle keep-alive connections must not hold them forever
BOOL_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class CallFailed(Exception):
    """A call ended with a non-OK status (raised by HttpContext.abort, as grpc's abort raises)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class HttpContext:
    """The two things the servicer asks of a grpc.ServicerContext: the time left and abort."""

    max_answer_bytes = None  # an HTTP answer has no message size limit (the gRPC server's send limit does not apply)

    def __init__(self, timeout_s: float | None) -> None:
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise CallFailed(code, details)


def _bool(value: str, name: str) -> bool:
    if value.strip().lower() not in BOOL_WORDS:
        raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"query parameter {name}={value!r} is not true or false")
    return BOOL_WORDS[value.strip().lower()]


def _number(value: str, name: str, kind: Callable[[str], Any], where: str = "query parameter") -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{where} {name}={value!r} is not a{'n integer' if kind is int else ' number'}") from None
    if kind is int and not -(2**31) <= number < 2**31:  # the proto's int32 fields refuse it with a ValueError
        raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"{where} {name}={value!r} is out of range")
    return number


def _check_params(query: dict[str, list[str]], known: set[str]) -> None:
    """INVALID_ARGUMENT naming the query parameters that are not `known` (a typo must not pass silently)."""
    unknown = sorted(set(query) - known)
    if unknown:
        raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT,
                         f"unknown query parameters {unknown}; known: {', '.join(sorted(known))}")


def search_request_from_query(image: bytes, query: dict[str, list[str]]) -> search_pb2.SearchRequest:
    """A SearchRequest for an image body with its options as query parameters."""
    _check_params(query, {"top_k", "category", "brand", "min_price", "max_price", "in_stock", "nprobe",
                          "exact_rerank", "one_per_product", "timeout_ms", "crop"})
    request = search_pb2.SearchRequest(image=image)
    last = {name: values[-1] for name, values in query.items()}
    if "top_k" in last:
        request.top_k = _number(last["top_k"], "top_k", int)
    request.filter.categories.extend(query.get("category", []))
    request.filter.brands.extend(query.get("brand", []))
    if "min_price" in last:
        request.filter.price.min = _number(last["min_price"], "min_price", float)
    if "max_price" in last:
        request.filter.price.max = _number(last["max_price"], "max_price", float)
    if "in_stock" in last:
        request.filter.in_stock_only = _bool(last["in_stock"], "in_stock")
    if "nprobe" in last:
        request.options.nprobe = _number(last["nprobe"], "nprobe", int)
    for name in ("exact_rerank", "one_per_product"):
        if name in last:
            setattr(request.options, name, _bool(last[name], name))
    if "crop" in last:
        request.crop.CopyFrom(crop_from_query(last["crop"]))
    return request


def crop_from_query(text: str) -> search_pb2.Region:
    """A crop query parameter "x,y,width,height" (fractions) as a Region (checked by the servicer)."""
    parts = text.split(",")
    if len(parts) != 4:
        raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT,
                         f"query parameter crop={text!r} must be x,y,width,height in fractions of the image")
    x, y, width, height = (_number(part, "crop", float) for part in parts)
    return search_pb2.Region(x=x, y=y, width=width, height=height)


def embed_request_from_query(image: bytes, query: dict[str, list[str]]) -> search_pb2.EmbedRequest:
    """An EmbedRequest for an image body (query parameters: crop, timeout_ms)."""
    _check_params(query, {"crop", "timeout_ms"})
    request = search_pb2.EmbedRequest(image=image)
    if query.get("crop"):
        request.crop.CopyFrom(crop_from_query(query["crop"][-1]))
    return request


class HttpGateway:
    """The HTTP/JSON server over a VisualSearchServicer (module docstring); started by `start()`."""

    def __init__(self, servicer: Any, is_serving: Callable[[], bool], host: str, port: int, *,
                 max_body_bytes: int = 16 << 20, max_concurrent: int = 64, cors_origin: str | None = None,
                 tls: ssl.SSLContext | None = None, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.servicer = servicer
        self.is_serving = is_serving
        self.max_body_bytes = max_body_bytes
        self.cors_origin = cors_origin
        self._slots = threading.BoundedSemaphore(max_concurrent)
        gateway = self

        class Handler(_Handler):
            owner = gateway
            timeout = idle_timeout_s  # a keep-alive connection idle (or a client stalled) this long is closed

        self._server = _Server((host, port), Handler)
        if tls is not None:  # the handshake runs in the request's thread, not in the accepting loop
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Serve in a daemon thread; returns the bound port."""
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="vitrine-http", daemon=True)
        self._thread.start()
        return self.port

    def close(self) -> None:
        """Stop accepting requests and close the socket (requests in progress finish in their threads)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._server.shutdown()
            thread.join(10)
        self._server.server_close()

    def call(self, method: str, request: Message, timeout_s: float | None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of one servicer call."""
        if not self._slots.acquire(blocking=False):
            return 429, {"code": "RESOURCE_EXHAUSTED", "message": "too many requests in progress; retry later"}
        try:
            response = getattr(self.servicer, method)(request, HttpContext(timeout_s))
        except CallFailed as failed:
            return HTTP_STATUS.get(failed.code, 500), {"code": failed.code.name, "message": failed.message}
        finally:
            self._slots.release()
        # every field without presence is written, also at its default: an empty result is "hits": [], an OK
        # batch entry "code": 0, an out-of-stock product "in_stock": false (omitted, `answer.hits.length` threw in
        # a browser and `code === 0` was false); fields with presence (Product.price) stay absent when unset
        return 200, json_format.MessageToDict(response, preserving_proto_field_name=True,
                                              always_print_fields_with_no_presence=True)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def server_bind(self) -> None:
        from engine import lifecycle

        if lifecycle.SHARED_PORT and hasattr(socket, "SO_REUSEPORT"):  # worker processes share the port, as
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # their gRPC port
        super().server_bind()


ROUTES = {("POST", "/v1/search"): ("Search", search_pb2.SearchRequest),
          ("POST", "/v1/batch-search"): ("BatchSearch", search_pb2.BatchSearchRequest),
          ("POST", "/v1/embed"): ("Embed", search_pb2.EmbedRequest),
          ("GET", "/v1/index"): ("GetIndexInfo", search_pb2.GetIndexInfoRequest)}


_DATA_URL = re.compile(r"^data:[^,;]*(;[^,;]*)*;base64,", re.IGNORECASE)


def base64_image(value: str) -> str:
    """A JSON `image` field as protobuf's JSON parser takes it: a browser's data URL ("data:image/jpeg;base64,...",
    what FileReader.readAsDataURL gives) loses its prefix, and text that is not base64 (standard or URL-safe) is a
    ValueError (protobuf's parser skipped the foreign characters: "!!!" became an empty image, and a data URL's
    prefix became garbage bytes in front of the image)."""
    text = _DATA_URL.sub("", value.strip(), count=1)
    compact = "".join(text.split())  # line breaks of MIME-style base64
    if not re.fullmatch(r"[A-Za-z0-9+/_-]*={0,2}", compact) or len(compact.rstrip("=")) % 4 == 1:
        raise ValueError("field image is not base64 (standard or URL-safe alphabet, or a data: URL with ;base64,)")
    return compact


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: HttpGateway
    protocol_version = "HTTP/1.1"
    server_version = "vitrine"
    disable_nagle_algorithm = True  # headers and body are two writes: without TCP_NODELAY, +40 ms (delayed ACK)

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_OPTIONS(self) -> None:  # noqa: N802 - CORS preflight
        if self.owner.cors_origin is None:
            return self._reply(405, {"code": "UNIMPLEMENTED", "message": "CORS is not enabled on this server"})
        self.send_response(204)
        self._cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Content-Type, X-Timeout-Ms")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _dispatch(self, verb: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        path = url.path.rstrip("/") or "/"
        try:
            routed = (verb, path) in ROUTES  # a POST elsewhere answers 404/405, not what its body lacks
            body = self._body() if verb == "POST" and routed else b""
            if verb == "POST" and not routed:
                self.close_connection = True  # its body is not read: the connection cannot be reused
            if path == "/healthz" and verb == "GET":
                serving = self.owner.is_serving()
                return self._reply(200 if serving else 503, {"status": "SERVING" if serving else "NOT_SERVING"})
            if path.startswith("/v1/products/") and verb == "GET":
                product_id = urllib.parse.unquote(path[len("/v1/products/"):])
                return self._call("GetProduct", search_pb2.GetProductRequest(product_id=product_id), query)
            route = ROUTES.get((verb, path))
            if route is None:
                if path in {p for _, p in ROUTES} | {"/healthz"} or path.startswith("/v1/products/"):
                    return self._reply(405, {"code": "UNIMPLEMENTED", "message": f"{verb} is not allowed on {path}"})
                return self._reply(404, {"code": "NOT_FOUND", "message": f"no such endpoint: {verb} {path}; see "
                                                                         "engine/http_gateway.py for the routes"})
            method, kind = route
            if method in ("Search", "Embed") and (self._is_image() or self._sniffed_image(body)):
                request: Message = search_request_from_query(body, query) if method == "Search" \
                    else embed_request_from_query(body, query)
            else:
                options = sorted(set(query) - {"timeout_ms"}) if verb == "POST" else []
                if options:  # they would be ignored: a filter in the URL must not answer unfiltered hits
                    raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"query parameters {options} apply to a raw image body only; with a JSON body, "
                                     "put them in the JSON (only timeout_ms goes in the URL)")
                request = self._parse_json(body, kind)
            return self._call(method, request, query)
        except CallFailed as failed:
            return self._reply(HTTP_STATUS.get(failed.code, 500), {"code": failed.code.name, "message": failed.message})

    def _call(self, method: str, request: Message, query: dict[str, list[str]]) -> None:
        timeout, name, where = self.headers.get("X-Timeout-Ms"), "X-Timeout-Ms", "header"  # the message names
        if timeout is None and query.get("timeout_ms"):  # the one the caller set
            timeout, name, where = query["timeout_ms"][-1], "timeout_ms", "query parameter"
        timeout_s = None if timeout is None else _number(timeout, name, float, where) / 1e3
        if timeout_s is not None and not timeout_s > 0:
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"{where} {name} must be positive (milliseconds), "
                                                               f"got {timeout}")
        status, payload = self.owner.call(method, request, timeout_s)
        self._reply(status, payload)

    def _is_image(self) -> bool:
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        return kind.startswith(IMAGE_TYPES)

    def _sniffed_image(self, body: bytes) -> bool:
        """An image body sent without an image Content-Type (none, or curl --data-binary's default
        application/x-www-form-urlencoded) is recognised by its first bytes; a declared JSON body never is."""
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        return kind != "application/json" and looks_like_image(body)

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, "chunked request bodies are not supported: "
                                                               "send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, "a POST needs a Content-Length header")
        if int(length) > self.owner.max_body_bytes:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            self._reply(413, {"code": "RESOURCE_EXHAUSTED",
                              "message": f"request body of {length} bytes is over the limit of "
                                         f"{self.owner.max_body_bytes} bytes"})
            raise _Answered
        return self.rfile.read(int(length))

    def _parse_json(self, body: bytes, kind: type[Message]) -> Message:
        try:
            document = json.loads(body.decode("utf-8") if body else "{}")
            if not isinstance(document, dict):  # protobuf's parser answered "Failed to parse 1 field" for [1, 2]
                raise ValueError(f"the body must be a JSON object ({{...}}), got {type(document).__name__}")
            for holder in [document, *(r for r in document.get("requests") or () if isinstance(r, dict))]:
                if isinstance(holder.get("image"), str):
                    holder["image"] = base64_image(holder["image"])
            return json_format.ParseDict(document, kind())
        except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the body is not a valid {kind.DESCRIPTOR.full_name} in JSON: {exc}") from None

    def _cors_headers(self) -> None:
        if self.owner.cors_origin is not None:
            self.send_header("Access-Control-Allow-Origin", self.owner.cors_origin)
            if self.owner.cors_origin != "*":
                self.send_header("Vary", "Origin")

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self._cors_headers()
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("HTTP client left before the answer to %s", self.path)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _Answered:
            pass
        except (ssl.SSLError, ConnectionResetError) as exc:  # a failed handshake: no certificate, wrong CA
            logger.info("HTTP client %s: TLS failed: %s", self.client_address[0], exc)
            self.close_connection = True
        except TimeoutError:  # idle past the timeout (or stalled mid-request): close, freeing the thread
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the servicer logs each call
        logger.debug("http %s - %s", self.address_string(), format % args)


class _Answered(Exception):
    """The handler already sent its answer (a refused body): nothing more to do."""
