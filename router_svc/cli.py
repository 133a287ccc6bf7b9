"""`cpumesh router`: flags → RouterConfig → one router process."""

from __future__ import annotations

import argparse
from pathlib import Path

from router_svc.config import PROMPT_BYTES_PER_TOKEN, RouterConfig
from router_svc.scheduler import KV_RESERVATIONS
from services.auth import read_token, read_tokens


def cli_arguments(p: argparse.ArgumentParser) -> None:
    d = RouterConfig.__dataclass_fields__
    p.add_argument("--listen", default=d["listen"].default, help="gRPC address")
    p.add_argument("--tokenizer", required=True, help="tokenizer service address host:port")
    p.add_argument("--shards", default="127.0.0.1:50061",
                   help="comma-separated shard addresses host:port, in tp_rank order")
    p.add_argument("--max-waiting", type=int, default=d["max_waiting"].default,
                   help="queued requests beyond which Generate gets RESOURCE_EXHAUSTED")
    p.add_argument("--max-running", type=int, default=d["max_running"].default,
                   help="most sequences in one batch")
    p.add_argument("--prefill-token-budget", type=int,
                   default=d["prefill_token_budget"].default,
                   help="prompt tokens prefilled per step (a longer prompt runs alone)")
    p.add_argument("--default-max-new-tokens", type=int,
                   default=d["default_max_new_tokens"].default, metavar="N",
                   help="tokens generated for a request without max_new_tokens (OpenAI: "
                   "max_tokens); never past the model's context; default: %(default)s")
    p.add_argument("--kv-reservation", choices=KV_RESERVATIONS,
                   default=d["kv_reservation"].default,
                   help="on_demand: KV pages taken as sequences grow, the newest preempted and "
                   "recomputed when the cache is full; full: prompt + max_new_tokens reserved at "
                   "admission (the old behaviour, for comparison); default: %(default)s")
    p.add_argument("--step-timeout", type=float, default=d["step_timeout_s"].default,
                   help="seconds one shard step may take before the step fails")
    p.add_argument("--rpc-timeout", type=float, default=d["rpc_timeout_s"].default,
                   help="seconds for Info, Release, Reset, health and tokenizer calls")
    p.add_argument("--max-stop-strings", type=int, default=d["max_stop_strings"].default)
    p.add_argument("--max-prompt-bytes", type=int, metavar="BYTES",
                   help="most UTF-8 bytes of a prompt (of a chat: its roles and contents "
                   "together), refused INVALID_ARGUMENT before tokenizing (default: the "
                   f"context length x {PROMPT_BYTES_PER_TOKEN})")
    p.add_argument("--max-chat-messages", type=int, default=d["max_chat_messages"].default,
                   help="most messages in one chat, refused INVALID_ARGUMENT before tokenizing")
    p.add_argument("--max-inflight-requests", type=int,
                   default=d["max_inflight_requests"].default,
                   help="generation requests (gRPC and HTTP) in the router at once; more get "
                   "RESOURCE_EXHAUSTED (HTTP 429)")
    p.add_argument("--max-inflight-bytes", type=int, default=d["max_inflight_bytes"].default,
                   help="their encoded bytes together; more get RESOURCE_EXHAUSTED (HTTP 429)")
    p.add_argument("--max-request-bytes", type=int, default=d["max_request_bytes"].default,
                   help="largest gRPC message (gRPC refuses more, RESOURCE_EXHAUSTED) and HTTP "
                   "body (413)")
    p.add_argument("--health-listen", help="separate plaintext health address (with TLS)")
    p.add_argument("--http-listen", help="serve the OpenAI-compatible HTTP API, /health, /ready "
                   "and /metrics on HOST:PORT (HTTPS with --tls-cert; off by default)")
    p.add_argument("--drain-grace", type=float, default=d["drain_grace_s"].default)
    p.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate chain")
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-ca", type=Path, help="require client certificates signed by this CA "
                   "and connect to the shards and tokenizer with mutual TLS (needed with "
                   "--tls-cert: no plaintext to them)")
    p.add_argument("--internal-token-file", type=Path, metavar="FILE",
                   help="send the one token in this file on every call to the shards and the "
                   "tokenizer (their --internal-token-file)")
    p.add_argument("--api-keys-file", type=Path, metavar="FILE",
                   help="clients must send 'Authorization: Bearer <key>' with a key from this "
                   "file (one a line) on Generate, ModelInfo and the HTTP API's /v1/*; health, "
                   "/health, /ready and /metrics stay open (default: no authentication)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model's name in the APIs: OpenAI's 'model' (others get 404) and "
                   "ModelInfo (default: the shards' model name without its cache hash)")
    p.add_argument("--log-level", default="INFO")


def build_config(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        tokenizer=args.tokenizer,
        shards=tuple(s.strip() for s in args.shards.split(",") if s.strip()),
        listen=args.listen, health_listen=args.health_listen,
        http_listen=args.http_listen, max_waiting=args.max_waiting,
        max_running=args.max_running, prefill_token_budget=args.prefill_token_budget,
        default_max_new_tokens=args.default_max_new_tokens, kv_reservation=args.kv_reservation,
        step_timeout_s=args.step_timeout, rpc_timeout_s=args.rpc_timeout,
        max_stop_strings=args.max_stop_strings, max_prompt_bytes=args.max_prompt_bytes,
        max_chat_messages=args.max_chat_messages,
        max_inflight_requests=args.max_inflight_requests,
        max_inflight_bytes=args.max_inflight_bytes, max_request_bytes=args.max_request_bytes,
        drain_grace_s=args.drain_grace,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
        served_model_name=args.served_model_name,
        internal_token=read_token(args.internal_token_file) if args.internal_token_file else None,
        api_keys=read_tokens(args.api_keys_file, "API keys file") if args.api_keys_file else ())


def cli_run(args: argparse.Namespace) -> int:
    from router_svc.service import RouterProcess
    from services.server import run_service

    return run_service("router", args, build_config, lambda config: RouterProcess(config).serve())
