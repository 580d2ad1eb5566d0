"""TLS for vitrine's servers and clients: gRPC server and channel credentials, the HTTP gateway's SSL context.

A server with `tls_cert` and `tls_key` (PEM files) serves gRPC (and its HTTP gateway) over TLS only.
With `tls_ca` as well it is mutual TLS: a client must present a certificate signed by that CA, and a
root uses the same CA to verify its shard servers and presents its own certificate to them (one CA for
the cluster). Clients: `VisualSearchClient(..., tls_ca=...)` (or `tls=True` for the system's CAs) and
`vitrine query --tls-ca ca.pem [--tls-cert --tls-key]`. File errors name the file and the setting.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc


class TlsError(ValueError):
    """A TLS file is missing, unreadable or not PEM, or the settings do not fit together."""


def read_pem(path: str | Path, what: str) -> bytes:
    """The bytes of a PEM file; TlsError naming `what` when it cannot be read or holds no PEM block."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise TlsError(f"the {what} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def check_pair(cert: str | Path | None, key: str | Path | None, who: str) -> None:
    """TlsError unless the certificate and its key are given together."""
    if (cert is None) != (key is None):
        raise TlsError(f"{who} needs both a TLS certificate and its private key (tls_cert and tls_key), or neither")


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None) -> grpc.ServerCredentials:
    """gRPC server credentials; with `client_ca`, clients must present a certificate it signed (mTLS)."""
    pair = [(read_pem(key, "TLS private key"), read_pem(cert, "TLS certificate"))]
    roots = read_pem(client_ca, "TLS CA certificate") if client_ca is not None else None
    return grpc.ssl_server_credentials(pair, root_certificates=roots, require_client_auth=roots is not None)


def channel_credentials(ca: str | Path | None, cert: str | Path | None = None,
                        key: str | Path | None = None) -> grpc.ChannelCredentials:
    """gRPC channel credentials: servers verified against `ca` (None: the system's CAs), `cert`/`key` presented."""
    check_pair(cert, key, "a TLS client")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "TLS CA certificate") if ca is not None else None,
        private_key=read_pem(key, "TLS private key") if key is not None else None,
        certificate_chain=read_pem(cert, "TLS certificate") if cert is not None else None)


def http_ssl_context(cert: str | Path, key: str | Path, client_ca: str | Path | None) -> ssl.SSLContext:
    """The HTTP gateway's server-side SSL context (TLS 1.2+; client certificates required with `client_ca`)."""
    for path, what in ((cert, "TLS certificate"), (key, "TLS private key")):
        read_pem(path, what)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
        if client_ca is not None:
            context.load_verify_locations(cafile=str(client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise TlsError(f"the TLS certificate {cert} and key {key} do not load: {exc}") from exc
    return context
