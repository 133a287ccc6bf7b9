"""gRPC transport settings shared by servers and clients: message limits, keepalive, TLS.

`server_options` and `channel_options` are the two halves of one keepalive agreement (a client
pings no more often than the server permits); `server_credentials` and `channel_credentials` are
the two halves of (mutual) TLS, from PEM files or bytes. `open_channel` is the router's channel
to an internal service: TLS when given credentials, and the internal token on every call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from services.auth import bearer_interceptors

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
Pem = Path | str | bytes  # a PEM file's path, or its contents


def _common_options(max_message_bytes: int, keepalive_time_s: float,
                    keepalive_timeout_s: float) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1)]


def server_options(*, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                   keepalive_time_s: float = 30.0, keepalive_timeout_s: float = 10.0,
                   min_client_ping_interval_s: float = 5.0) -> list[tuple[str, int]]:
    """Message limits (larger messages get RESOURCE_EXHAUSTED), keepalive pings to idle clients,
    and permission for clients' own keepalive pings down to `min_client_ping_interval_s`."""
    return [*_common_options(max_message_bytes, keepalive_time_s, keepalive_timeout_s),
            ("grpc.http2.min_recv_ping_interval_without_data_ms",
             int(min_client_ping_interval_s * 1000)),
            ("grpc.http2.max_ping_strikes", 0)]


def channel_options(*, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    keepalive_time_s: float = 10.0,
                    keepalive_timeout_s: float = 5.0) -> list[tuple[str, int]]:
    """Client options matching `server_options`: a dead link is noticed within ~15 s, not 2 h."""
    return [*_common_options(max_message_bytes, keepalive_time_s, keepalive_timeout_s),
            ("grpc.http2.max_pings_without_data", 0)]


def _read(source: Pem) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def server_credentials(cert: Pem, key: Pem, ca: Pem | None = None) -> grpc.ServerCredentials:
    """TLS with this server's PEM certificate chain and key (paths or bytes). With `ca`, mutual
    TLS: clients without a certificate signed by that CA are refused."""
    return grpc.ssl_server_credentials([(_read(key), _read(cert))],
                                       root_certificates=_read(ca) if ca is not None else None,
                                       require_client_auth=ca is not None)


def channel_credentials(ca: Pem, cert: Pem | None = None,
                        key: Pem | None = None) -> grpc.ChannelCredentials:
    """Client side of `server_credentials`: trust `ca`; present `cert`/`key` for mutual TLS."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca),
                                        private_key=_read(key) if key is not None else None,
                                        certificate_chain=_read(cert) if cert is not None else None)


def open_channel(address: str, credentials: grpc.ChannelCredentials | None,
                 options: list[tuple[str, Any]], token: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `address` (TLS with `credentials`, plaintext without) that sends
    `token` as `authorization: Bearer <token>` on every call when given."""
    interceptors = bearer_interceptors(token)
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options, interceptors=interceptors)
