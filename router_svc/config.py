"""RouterConfig: everything one router process needs, built once from flags at the entry point."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from router_svc.scheduler import KV_RESERVATIONS

# A converted model's cache directory ends in "-" and 12 hex digits of its fingerprint
# (model_formats/embedded.py): not part of the model's name.
_CACHE_HASH = re.compile(r"-[0-9a-f]{12}$")
# The default bound on a prompt's UTF-8 bytes: the context length times this. Generous: English
# text averages ~4 bytes a token, and a prompt over it could not fit the context anyway unless
# its tokens averaged more than 32 bytes each (raise --max-prompt-bytes for such prompts).
PROMPT_BYTES_PER_TOKEN = 32
MiB = 1024 * 1024


def default_served_name(model_name: str) -> str:
    """The name clients use for a model: its name without a trailing cache hash."""
    return _CACHE_HASH.sub("", model_name) or model_name


def check_address(name: str, address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{name} {address!r} is not host:port")


@dataclass(frozen=True)
class RouterConfig:
    tokenizer: str  # the tokenizer service, host:port
    shards: tuple[str, ...]  # the shard services, host:port, in tp_rank order
    listen: str = "127.0.0.1:50051"
    health_listen: str | None = None  # separate plaintext health address (with TLS)
    http_listen: str | None = None  # OpenAI-compatible HTTP API and /metrics; off when None
    max_waiting: int = 256  # queued requests beyond which Generate gets RESOURCE_EXHAUSTED
    max_running: int = 64  # sequences in one batch
    prefill_token_budget: int = 2048  # prompt tokens prefilled per step (one longer one alone)
    # A request without max_new_tokens (OpenAI: without max_tokens) generates at most this many
    # tokens, and never past the model's context (TGI's max_new_tokens default, larger).
    default_max_new_tokens: int = 1024
    # KV pages: "on_demand" (taken as sequences grow, the newest preempted when full) or "full"
    # (prompt + max_new_tokens reserved at admission, the behaviour before on-demand pages).
    kv_reservation: str = "on_demand"
    step_timeout_s: float = 30.0  # one shard step, prefill included
    rpc_timeout_s: float = 5.0  # Info, Release, Reset, health, tokenizer calls
    health_interval_s: float = 2.0  # while idle: how often to check that the group is whole
    recover_poll_s: float = 0.25  # while not whole: how often to poll the shards' health
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_request_id_chars: int = 256
    # Bounds checked before any work: a prompt's UTF-8 bytes (a chat's roles and contents
    # together; None: the context length x PROMPT_BYTES_PER_TOKEN) and a chat's messages
    # (INVALID_ARGUMENT, HTTP 400); generation requests in flight and their encoded bytes together
    # (RESOURCE_EXHAUSTED, HTTP 429); one gRPC message or HTTP body (RESOURCE_EXHAUSTED from gRPC
    # itself, HTTP 413).
    max_prompt_bytes: int | None = None
    max_chat_messages: int = 4096
    max_inflight_requests: int = 512
    max_inflight_bytes: int = 256 * MiB
    max_request_bytes: int = 16 * MiB
    drain_grace_s: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # require client certificates; also trust it for shards/tokenizer
    # The model's name in the APIs (OpenAI "model", ModelInfo); None: the shards' model name
    # without its cache hash (default_served_name).
    served_model_name: str | None = None
    # Sent on every call to the shards and the tokenizer (services/auth.py); None: none sent.
    internal_token: str | None = field(default=None, repr=False)
    # Clients must send one of these on Generate, ModelInfo and /v1/* ("Authorization: Bearer
    # <key>"); empty: no authentication.
    api_keys: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        check_address("tokenizer", self.tokenizer)
        if not self.shards:
            raise ValueError("shards must list at least one address")
        for address in self.shards:
            check_address("shard", address)
        if len(set(self.shards)) != len(self.shards):
            raise ValueError(f"shards lists an address twice: {', '.join(self.shards)}")
        check_address("listen", self.listen)
        if self.health_listen is not None:
            check_address("health_listen", self.health_listen)
        if self.http_listen is not None:
            check_address("http_listen", self.http_listen)
        for name in ("max_waiting", "max_running", "prefill_token_budget",
                     "default_max_new_tokens", "max_stop_strings",
                     "max_stop_string_chars", "max_stop_token_ids", "max_request_id_chars",
                     "max_chat_messages", "max_inflight_requests", "max_inflight_bytes",
                     "max_request_bytes", *(["max_prompt_bytes"] if self.max_prompt_bytes
                                            is not None else [])):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("step_timeout_s", "rpc_timeout_s", "health_interval_s", "recover_poll_s",
                     "drain_grace_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"kv_reservation must be one of {KV_RESERVATIONS}, got "
                             f"{self.kv_reservation!r}")
        if self.max_inflight_bytes < self.max_request_bytes:
            raise ValueError(f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least "
                             f"max_request_bytes ({self.max_request_bytes}), or the largest "
                             "request could never be admitted")
        if self.served_model_name is not None and (
                not self.served_model_name.strip() or len(self.served_model_name) > 256):
            raise ValueError(f"served_model_name must be 1-256 characters and not blank, got "
                             f"{self.served_model_name!r}")
        tls = (self.tls_cert, self.tls_key)
        if any(tls) and not all(tls):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if self.tls_ca is not None and not all(tls):
            raise ValueError("tls_ca (mutual TLS) needs tls_cert and tls_key")
        if all(tls) and self.tls_ca is None:
            raise ValueError("TLS with tls_cert and tls_key needs --tls-ca too: without the CA "
                             "of the shards' and tokenizer's certificates the router would talk "
                             "to them in plaintext")

    def prompt_bytes_limit(self, context_length: int) -> int:
        """The most UTF-8 bytes a prompt (or a chat's roles and contents) may have."""
        if self.max_prompt_bytes is not None:
            return self.max_prompt_bytes
        return context_length * PROMPT_BYTES_PER_TOKEN
