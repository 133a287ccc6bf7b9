"""Bearer tokens on gRPC calls: who may call what.

Two uses of one mechanism:

* the **internal token**: one secret shared by the router, the shards and the tokenizer (read
  from `--internal-token-file`); the router sends it on every call to a shard or the tokenizer,
  which refuse calls without it. Clients holding only a router API key, or a client certificate
  from the same CA, cannot call a shard's Step/Reset/Release.
* the router's **API keys** (`--api-keys-file`, one a line): clients send one on Generate and
  ModelInfo, and on the HTTP API (`router_svc/http_api.py` checks it with `TokenCheck` too).

On the wire a token is gRPC metadata `authorization: Bearer <token>` (the HTTP header on HTTP).
Servers compare tokens in constant time (SHA-256 digests, then `hmac.compare_digest` against
every accepted token). Health checking and reflection stay open: probes and tools carry no token.
"""

from __future__ import annotations

import hashlib
import hmac
import string
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

AUTHORIZATION = "authorization"
# Methods callable without a token: health (kubelet probes, the router's polls) and reflection.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation)


def read_tokens(path: Path, what: str = "token file") -> tuple[str, ...]:
    """The tokens in `path`, one a line (blank lines and `#` comments skipped); ValueError
    naming the file when it cannot be read, holds none, or a token is not printable ASCII."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the {what} {path}: {e}") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not set(token) <= _TOKEN_CHARS:
            raise ValueError(f"{what} {path}, line {number}: a token must be printable ASCII "
                             "without spaces")
        tokens.append(token)
    if not tokens:
        raise ValueError(f"the {what} {path} holds no token")
    return tuple(tokens)


def read_token(path: Path, what: str = "internal token file") -> str:
    """The one token in `path` (see `read_tokens`)."""
    tokens = read_tokens(path, what)
    if len(tokens) != 1:
        raise ValueError(f"the {what} {path} must hold one token, it holds {len(tokens)}")
    return tokens[0]


def bearer(token: str) -> str:
    return f"Bearer {token}"


class TokenCheck:
    """Accepts any of `tokens`, compared in constant time."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = [_digest(t) for t in tokens]
        if not self._digests:
            raise ValueError("a TokenCheck needs at least one token")

    def accepts(self, authorization: str | None) -> bool:
        """Whether an `Authorization` value ("Bearer <token>") carries an accepted token."""
        if authorization is None:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = _digest(token.strip())
        accepted = False
        for digest in self._digests:  # no early exit: the time says nothing about which
            accepted |= hmac.compare_digest(given, digest)
        return accepted


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _metadata_value(metadata: Any, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted bearer token with UNAUTHENTICATED (health and
    reflection excepted; `open_methods` adds full method names callable without one)."""

    def __init__(self, check: TokenCheck, what: str = "token",
                 open_methods: Sequence[str] = ()) -> None:
        self.check = check
        self.what = what
        self.open_methods = frozenset(open_methods)

    async def intercept_service(self, continuation: Callable[[Any], Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if (handler is None or method.startswith(OPEN_PREFIXES) or method in self.open_methods
                or self.check.accepts(_metadata_value(
                    handler_call_details.invocation_metadata, AUTHORIZATION))):
            return handler
        details = (f"{method} needs 'authorization: Bearer <{self.what}>' metadata with an "
                   f"accepted {self.what}")
        return _refusing(handler, details)


def _refusing(handler: Any, details: str) -> Any:
    """`handler` with its behaviour replaced by an UNAUTHENTICATED refusal."""
    code = grpc.StatusCode.UNAUTHENTICATED
    if handler.unary_stream is not None or handler.stream_stream is not None:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(code, details)
            yield  # pragma: no cover - an async generator that never yields
        field = "unary_stream" if handler.unary_stream is not None else "stream_stream"
        return handler._replace(**{field: stream})

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details)
    field = "unary_unary" if handler.unary_unary is not None else "stream_unary"
    return handler._replace(**{field: unary})


def _with_token(details: Any, value: str) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[AUTHORIZATION] = value
    return details._replace(metadata=metadata)


# Two classes: a channel files an interceptor under the first call kind it implements only.
class _BearerUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.value = bearer(token)

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                                    request: Any) -> Any:
        return await continuation(_with_token(client_call_details, self.value), request)


class _BearerUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.value = bearer(token)

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any,
                                     request: Any) -> Any:
        return await continuation(_with_token(client_call_details, self.value), request)


def internal_auth(token: str | None) -> AuthInterceptor | None:
    """The interceptor of an internal service (shard, tokenizer) given the internal token."""
    return None if token is None else AuthInterceptor(TokenCheck([token]), "internal token")


def bearer_interceptors(token: str | None) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors sending `token` on every unary and server-streaming call ([] without
    one)."""
    return [] if token is None else [_BearerUnaryUnary(token), _BearerUnaryStream(token)]
