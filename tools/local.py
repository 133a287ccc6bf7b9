"""`cpumesh local`: the whole system on one machine, supervised until Ctrl-C.

The tokenizer, `tp` shards and the router run as separate `python -m ...` processes on loopback
(only the router listens on `--host`), each with its log file and in its own process group. The
launcher shows each one's progress, waits until every one is healthy, prints where to connect,
then watches them: when one exits, it prints that one's last log lines and stops the others; on
SIGINT or SIGTERM it drains the router first, then stops the rest and exits 0. A second signal
skips the grace periods.

Each run makes a random internal token (a file only the user can read, in the log directory,
removed at exit): the shards and the tokenizer refuse calls without it, and the router sends it,
so only the router can call them (see SECURITY.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from router_svc.config import default_served_name
from tools.local_ports import Want, addresses, reserve
from tools.local_procs import Child, stop_all, write_internal_token

POLL_S = 0.2
SERVICES = ("tokenizer", "shard", "router")
EXAMPLE_PROMPT, EXAMPLE_CHAT = "Once upon a time", "Write a haiku about CPUs."


@dataclass(frozen=True)
class LocalConfig:
    model_dir: Path
    model_name: str
    served_model_name: str = ""  # the model's name in the router's APIs; "": `served_name`
    tp: int = 2
    threads_per_shard: int = 1
    host: str = "127.0.0.1"
    port: int = 50051  # the router's; 0 means any free port
    http_port: int = 8000  # the router's OpenAI-compatible HTTP API; 0 means any free port
    dtype: str = "float32"
    kv_capacity_tokens: int | None = None
    kv_cache_mb: float | None = None
    kv_dtype: str = "auto"
    max_context: int | None = None
    log_dir: Path = Path("logs")
    ready_timeout_s: float = 600.0
    drain_grace_s: float = 10.0
    extra_args: tuple[tuple[str, ...], ...] = ((), (), ())  # tokenizer, shard, router flags

    @property
    def served_name(self) -> str:
        return self.served_model_name or default_served_name(self.model_name)

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.threads_per_shard < 1:
            raise ValueError(f"threads per shard must be >= 1, got {self.threads_per_shard}")
        for name in ("port", "http_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be 0-65535, got {getattr(self, name)}")
        for name in ("ready_timeout_s", "drain_grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def cli_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model-dir", type=Path, metavar="DIR",
                       help="Hugging Face model directory (default: the embedded SmolLM2)")
    model.add_argument("--gguf", type=Path, metavar="FILE",
                       help="a GGUF file, converted once into the cache")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model's name in the router's APIs, OpenAI's 'model' (default: the "
                   "model's name, without a cache hash)")
    p.add_argument("--tp", type=int, default=2, metavar="N", help="shards (tensor-parallel ranks)")
    p.add_argument("--threads-per-shard", default="auto", metavar="N",
                   help="torch threads per shard; 'auto' divides the available cores")
    p.add_argument("--host", default="127.0.0.1", help="address the router listens on")
    p.add_argument("--port", type=int, default=50051, help="router port (0: any free port)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="router HTTP port: OpenAI-compatible API and /metrics (0: any free port)")
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "bfloat16", "float16", "int8", "int4"],
                   help="weights, activations and KV cache in the shards; int8 / int4: weights "
                   "quantized, a GGUF (or the embedded model) read at its own precision "
                   "(default: %(default)s)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--kv-capacity-tokens", type=int, metavar="N",
                      help="KV cache per shard, in tokens (default: the shard's, 16384)")
    size.add_argument("--kv-cache-mb", type=float, metavar="MB",
                      help="KV cache per shard, in MiB (the shard fits as many tokens as it can)")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "int8"],
                   help="how the shards store K and V: as the activations, or int8 with a scale "
                   "per token and head (about 3.8x the float32 tokens per MiB); "
                   "default: %(default)s")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="longest sequence (default: the model's context length)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="converted models and logs "
                   "(default: $CPUMESH_CACHE_DIR, $XDG_CACHE_HOME/cpumesh or ~/.cache/cpumesh)")
    p.add_argument("--log-dir", type=Path, metavar="DIR",
                   help="one log file per service (default: CACHE_DIR/logs/local-<time>)")
    p.add_argument("--ready-timeout", type=float, default=600.0, metavar="S",
                   help="seconds every service may take to become healthy")
    p.add_argument("--drain-grace", type=float, default=10.0, metavar="S",
                   help="seconds in-flight requests may finish when stopping")
    for service in SERVICES:
        p.add_argument(f"--{service}-args", default="", metavar="FLAGS",
                       help=f"more flags for every `cpumesh {service}`, as one string "
                       f"after '=': --{service}-args='--log-level DEBUG'")


def build_config(args: argparse.Namespace) -> LocalConfig:
    from model_formats.embedded import MODEL_NAME, default_cache_dir, default_model_dir
    from model_formats.gguf.convert import stderr_progress

    cache_dir = args.cache_dir or default_cache_dir(args.environ)
    quantized = args.dtype in ("int8", "int4")  # a GGUF is then read as it is, not converted
    if args.model_dir is not None:
        model_dir, name = args.model_dir, args.model_dir.resolve().name
    elif quantized:
        from model_formats.embedded import embedded_gguf_path
        from model_formats.gguf.link import linked_model_dir
        gguf = args.gguf or embedded_gguf_path()
        model_dir = linked_model_dir(gguf, cache_dir)
        name = args.gguf.stem if args.gguf else MODEL_NAME
    elif args.gguf is not None:
        from tools.local_procs import converted_gguf
        say(f"preparing {args.gguf} (converted once, then cached)")
        model_dir, name = converted_gguf(args.gguf, cache_dir, stderr_progress), args.gguf.stem
    else:
        say(f"preparing the embedded {MODEL_NAME} (converted on the first run only)")
        model_dir, name = default_model_dir(cache_dir, progress=stderr_progress), MODEL_NAME
    cores = len(os.sched_getaffinity(0))
    threads = (max(1, cores // args.tp) if args.threads_per_shard == "auto"
               else int(args.threads_per_shard))
    log_dir = args.log_dir or cache_dir / "logs" / time.strftime("local-%Y%m%d-%H%M%S")
    return LocalConfig(
        model_dir=model_dir, model_name=name, served_model_name=args.served_model_name or "",
        tp=args.tp, threads_per_shard=threads,
        host=args.host, port=args.port, http_port=args.http_port, dtype=args.dtype,
        kv_capacity_tokens=args.kv_capacity_tokens, kv_cache_mb=args.kv_cache_mb,
        kv_dtype=args.kv_dtype, max_context=args.max_context,
        log_dir=log_dir, ready_timeout_s=args.ready_timeout, drain_grace_s=args.drain_grace,
        extra_args=tuple(tuple(shlex.split(getattr(args, f"{s}_args"))) for s in SERVICES))


def say(line: str) -> None:
    print(f"cpumesh local: {line}", flush=True)


def router_ports(config: LocalConfig | argparse.Namespace) -> list[Want]:
    """The router's gRPC and HTTP ports on its host, as the flags chose them."""
    return [Want(config.host, config.port, "--port"),
            Want(config.host, config.http_port, "--http-port")]


def plan(config: LocalConfig, environ: Mapping[str, str]) -> tuple[list[Child], str, str]:
    """The children (tokenizer, shards, router, in start order), the router's client address
    and its HTTP API's."""
    tp, loop = config.tp, "127.0.0.1"
    # Every port in one call (see tools/local_ports.py): none can be handed out twice.
    *ports, router_port, http_port = reserve(
        [Want(loop)] * (1 + 2 * tp) + router_ports(config))
    tokenizer = f"{loop}:{ports[0]}"
    shards = [f"{loop}:{p}" for p in ports[1:1 + tp]]
    peers = ",".join(f"{loop}:{p}" for p in ports[1 + tp:])
    listen, reach = addresses(config.host, router_port)
    http_listen, http_reach = addresses(config.host, http_port)
    env = {**environ, "PYTHONUNBUFFERED": "1"}
    grace = ["--drain-grace", str(config.drain_grace_s)]
    model = ["--model-dir", str(config.model_dir)]
    limits = [f"--{k.replace('_', '-')}={v}" for k in ("kv_capacity_tokens", "kv_cache_mb",
                                                        "kv_dtype", "max_context")
              if (v := getattr(config, k)) not in (None, "auto")]
    more_tokenizer, more_shard, more_router = config.extra_args
    token = ["--internal-token-file", str(internal_token_path(config))]
    children = [Child("tokenizer", tokenizer, [
        "-m", "tokenizer_svc", *model, "--model-name", config.model_name, "--listen", tokenizer,
        *grace, *token, *more_tokenizer])]
    children += [Child(f"shard {r}", a, [
        "-m", "shard_svc", *model, "--tp-size", str(tp), "--tp-rank", str(r), "--peers", peers,
        "--listen", a, "--threads", str(config.threads_per_shard), "--dtype", config.dtype,
        *limits, *grace, *token, *more_shard]) for r, a in enumerate(shards)]
    children.append(Child("router", reach, [
        "-m", "router_svc", "--listen", listen, "--tokenizer", tokenizer,
        "--shards", ",".join(shards), "--http-listen", http_listen,
        "--served-model-name", config.served_name, *grace, *token, *more_router]))
    for child in children:
        child.log_path = config.log_dir / f"{child.name.replace(' ', '')}.log"
        child.env = env
    return children, reach, f"http://{http_reach}"


def internal_token_path(config: LocalConfig) -> Path:
    return config.log_dir / "internal-token"


class Launcher:
    def __init__(self, config: LocalConfig, environ: Mapping[str, str]) -> None:
        self.config = config
        self.environ = environ
        self.signals = 0
        self.http = ""

    def on_signal(self, signum: int, frame: object) -> None:
        self.signals += 1
        if self.signals == 1:
            print(f"\ncpumesh local: {signal.Signals(signum).name}: stopping "
                  "(again to stop at once)", flush=True)

    def run(self) -> int:
        cfg = self.config
        children, router, self.http = plan(cfg, self.environ)
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        write_internal_token(internal_token_path(cfg))
        say(f"{cfg.served_name}: tokenizer, {cfg.tp} shard(s) with {cfg.threads_per_shard} "
            f"thread(s) each, router; logs in {cfg.log_dir}")
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self.supervise(children, router)
        finally:
            stop_all(children, cfg.drain_grace_s + 5.0, lambda: self.signals > 1, say)
            internal_token_path(cfg).unlink(missing_ok=True)
            for s, handler in previous.items():
                signal.signal(s, handler)

    def supervise(self, children: list[Child], router: str) -> int:
        t0 = time.monotonic()
        for child in children:
            child.start()
        deadline = t0 + self.config.ready_timeout_s
        while not self.signals:
            if (dead := next((c for c in children if c.exited()), None)) is not None:
                return self.report_death(dead)
            # Polled router first (it is ready only after the others), shown in start order.
            phases = {c.name: c.phase() for c in reversed(children)}
            for child in children:
                if (phase := phases[child.name]) is not None:
                    say(f"[{time.monotonic() - t0:5.1f} s] {child.name}: {phase}")
            if all(c.ready for c in children):
                self.banner(router, time.monotonic() - t0)
                break
            if time.monotonic() > deadline:
                for child in (c for c in children if not c.ready):
                    say(f"{child.name} not healthy after {self.config.ready_timeout_s:.0f} s; "
                        f"its last log lines:\n{child.tail()}")
                return 1
            time.sleep(POLL_S)
        while not self.signals:
            if (dead := next((c for c in children if c.exited()), None)) is not None:
                return self.report_death(dead)
            time.sleep(POLL_S)
        return 0

    def report_death(self, child: Child) -> int:
        say(f"{child.name} exited with code {child.returncode()}; its last log lines "
            f"({child.log_path}):\n{child.tail()}\ncpumesh local: stopping the others")
        return 1

    def banner(self, router: str, elapsed_s: float) -> None:
        cli = cli_command()
        flag = "" if router == "127.0.0.1:50051" else f" --router {router}"
        python = relative(Path(sys.executable))
        name = self.config.served_name
        print(f"\ncpumesh is ready in {elapsed_s:.1f} s: {name}, tp {self.config.tp}\n\n"
              f"  gRPC   {router}   cpumesh.v1.RouterService (Generate, ModelInfo), "
              f"grpc.health.v1\n"
              f"  HTTP   {self.http}/v1   OpenAI-compatible (completions, chat), model "
              f"\"{name}\"; {self.http}/metrics\n"
              f"  logs   {self.config.log_dir}\n\n"
              f"Try:\n"
              f"  {cli} generate{flag} \"{EXAMPLE_PROMPT}\"\n"
              f"  {cli} chat{flag}\n"
              f"  {python} -m tools.client --router {router} --chat \"{EXAMPLE_CHAT}\"\n"
              f"  curl {self.http}/v1/chat/completions -H 'Content-Type: application/json' "
              f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"{EXAMPLE_CHAT}\"}}]}}'\n"
              f"  (or the openai client: OpenAI(base_url=\"{self.http}/v1\", api_key=\"-\"))\n\n"
              f"Press Ctrl-C to stop.", flush=True)


def relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cli_command() -> str:
    """How to run `cpumesh` from here: on PATH, else this interpreter's script, else -m."""
    import shutil

    script = Path(sys.executable).parent / "cpumesh"
    on_path = shutil.which("cpumesh")
    if script.is_file() and on_path and Path(on_path).resolve() == script.resolve():
        return "cpumesh"
    if script.is_file():
        return relative(script)
    return f"{relative(Path(sys.executable))} -m services.cli"


def cli_run(args: argparse.Namespace) -> int:
    for flag, port in (("--port", args.port), ("--http-port", args.http_port)):
        if not 0 <= port < 65536:
            raise SystemExit(f"cpumesh local: error: {flag} must be 0-65535, got {port}")
    if args.port and args.port == args.http_port:
        raise SystemExit(f"cpumesh local: error: --port and --http-port are both {args.port}")
    reserve(router_ports(args))  # busy ports refused before any model is converted
    try:
        config = build_config(args)
    except ValueError as e:
        raise SystemExit(f"cpumesh local: error: {e}") from None
    return Launcher(config, args.environ).run()
