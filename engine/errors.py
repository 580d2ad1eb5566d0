"""Domain errors of the engine and the one place that maps errors to gRPC status codes.

Search code raises these plain exceptions (no gRPC types below the servicer); the servicer calls
`status_for` on whatever escaped and aborts the call with that code and message. Messages say what
was wrong and how to fix it, because they reach the caller verbatim.
"""

from __future__ import annotations

import grpc

from model.images import ImageDecodeError


class EngineError(Exception):
    """Base class of the engine's domain errors."""


class InvalidQuery(EngineError, ValueError):
    """The request is malformed: empty query, wrong vector dimension, bad top_k, bad filter, ..."""


class ProductNotFound(EngineError, KeyError):
    """A product-id query names a product the served index version does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "product not found"


class NotReady(EngineError):
    """The server has not finished loading (or is shutting down); the caller should retry later."""


class DeadlineExceeded(EngineError):
    """The caller's deadline passed while the request was being served."""


class ShardsUnavailable(EngineError):
    """A root got no answer from any shard server, or missed one under the require-all-shards policy."""


class AnswerTooLarge(EngineError):
    """The answer would exceed the server's message size limit (a BatchSearch of many large top_k)."""


class VersionMismatch(EngineError):
    """A shard server was asked for another index version than the one it serves."""


_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidQuery, grpc.StatusCode.INVALID_ARGUMENT),
    (ImageDecodeError, grpc.StatusCode.INVALID_ARGUMENT),
    (ProductNotFound, grpc.StatusCode.NOT_FOUND),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ShardsUnavailable, grpc.StatusCode.UNAVAILABLE),
    (VersionMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (AnswerTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception raised while serving a request.

    Domain errors keep their message; an image that cannot be decoded says so. Anything else is a
    bug or a corrupt index: INTERNAL, naming the exception type so the log line can be found.
    """
    for error_type, code in _CODES:
        if isinstance(exc, error_type):
            message = str(exc) or error_type.__name__
            if isinstance(exc, ImageDecodeError):
                message = f"cannot decode the query image: {message}"
            return code, shorten_status(message)
    return grpc.StatusCode.INTERNAL, shorten_status(f"internal error ({type(exc).__name__}): {exc}")


MAX_STATUS_CHARS = 2000  # a status message travels in response metadata: clients refuse more than 8-16 KiB


def shorten_status(message: str, limit: int = MAX_STATUS_CHARS) -> str:
    """`message` cut to `limit` characters, saying so: a longer one (an exception quoting a huge input) made the
    client fail with RESOURCE_EXHAUSTED ("Stream removed") instead of receiving the status."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... (message cut: {len(message)} characters)"
