"""`cpumesh tokenizer` (and `python -m tokenizer_svc`): flags → TokenizerConfig → the service."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.auth import read_token
from tokenizer_svc.config import TokenizerConfig

DEFAULTS = TokenizerConfig(model_dir=Path("."))


def cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path,
                   help="model directory with tokenizer.json (default: the embedded SmolLM2)")
    p.add_argument("--model-name", help="name reported by Info (default: the directory's)")
    p.add_argument("--listen", default=DEFAULTS.listen, help="gRPC address host:port")
    p.add_argument("--health-listen", help="separate plaintext health address (with TLS)")
    p.add_argument("--max-text-chars", type=int, default=DEFAULTS.max_text_chars,
                   help="longest text, or chat's total message content, accepted")
    p.add_argument("--workers", type=int, default=DEFAULTS.workers,
                   help="threads running tokenizer calls")
    p.add_argument("--chat-roles", default=",".join(DEFAULTS.chat_roles),
                   help="comma-separated chat roles accepted")
    p.add_argument("--reflection", action="store_true", help="serve gRPC reflection")
    p.add_argument("--drain-grace", type=float, default=DEFAULTS.drain_grace_s,
                   help="seconds in-flight calls may finish after SIGTERM")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM private key (TLS)")
    p.add_argument("--tls-ca", type=Path, help="require client certificates signed by this CA")
    p.add_argument("--internal-token-file", type=Path, metavar="FILE",
                   help="refuse calls (health excepted) without 'authorization: Bearer <token>' "
                   "carrying the one token in this file (the router's --internal-token-file)")
    p.add_argument("--log-level", default="INFO")


def build_config(args: argparse.Namespace) -> TokenizerConfig:
    model_dir, model_name = args.model_dir, args.model_name
    if model_dir is None:
        from model_formats.embedded import MODEL_NAME, default_cache_dir, default_model_dir
        model_dir = default_model_dir(default_cache_dir(getattr(args, "environ", None)))
        model_name = model_name or MODEL_NAME
    return TokenizerConfig(
        model_dir=model_dir, model_name=model_name, listen=args.listen,
        health_listen=args.health_listen, max_text_chars=args.max_text_chars,
        workers=args.workers,
        chat_roles=tuple(r.strip() for r in args.chat_roles.split(",") if r.strip()),
        reflection=args.reflection, drain_grace_s=args.drain_grace, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_ca=args.tls_ca,
        internal_token=read_token(args.internal_token_file) if args.internal_token_file else None)


def cli_run(args: argparse.Namespace) -> int:
    from services.server import run_service
    from tokenizer_svc.service import serve

    return run_service("tokenizer", args, build_config, serve)


# the names the issue gives the subcommand's two functions
add_arguments = cli_arguments
run = cli_run
