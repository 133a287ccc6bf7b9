"""`cpumesh shard`: flags → ShardConfig → one shard process."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from services.auth import read_token
from shard_svc.config import COMPILE, DTYPES, KERNELS, KV_DTYPES, ShardConfig, rank_from_hostname
from shard_svc.mesh.config import TRANSPORTS as MESH_TRANSPORTS


def cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path,
                   help="Hugging Face model directory (default: the embedded SmolLM2)")
    p.add_argument("--tp-size", type=int, default=1, help="ranks in the tensor-parallel group")
    p.add_argument("--tp-rank", default="0",
                   help="this rank, or 'auto' for the StatefulSet ordinal of the hostname")
    p.add_argument("--peers", default="127.0.0.1:5555",
                   help="comma-separated mesh addresses host:port of all ranks, in rank order")
    p.add_argument("--listen", default="127.0.0.1:50061", help="gRPC address")
    p.add_argument("--health-listen", help="separate plaintext health address (with TLS)")
    p.add_argument("--threads", default="auto",
                   help="torch threads, or 'auto' for the CPUs this process may use")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights, activations and KV cache (norms and softmax accumulate in "
                   "float32); int8 / int4: the weights quantized at load (a linked GGUF's Q8_0 "
                   "/ Q4 blocks served as they are); int8 in groups of 32 with float32 "
                   "activations and KV cache where cpumesh's kernels build (else, and with "
                   "--kernels ipex, per row); int4's activations, KV cache and int8 embedding "
                   "in bfloat16 (float32 on CPUs without AVX-512); default: %(default)s")
    p.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="library for the matrix products: aten, onednn, packed (oneDNN with "
                   "weights reordered at load), or auto (timed at start on this CPU, the choice "
                   "logged); with int8/int4, aten = ATen's weight-only kernels, onednn = "
                   "dequantize per call, cpumesh = cpumesh's int8 / int4 kernel (for int8 in "
                   "groups and blocked int4, aten means it too); ipex: "
                   "Intel Extension for PyTorch's kernels around the plain ones (auto takes "
                   "them where IPEX is installed for this torch); default: %(default)s")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--kv-capacity-tokens", type=int, metavar="N",
                      help="KV cache size in tokens (default: 16384)")
    size.add_argument("--kv-cache-mb", type=float, metavar="MB",
                      help="KV cache size in MiB (K, V and int8 scales): as many whole pages "
                      "as fit, for the KV heads of this rank; Info reports the tokens")
    p.add_argument("--kv-dtype", default="auto", choices=KV_DTYPES,
                   help="how K and V are stored: auto (as the activations) or int8 (a float32 "
                   "scale per token and head, dequantized on read: D + 4 bytes per row instead "
                   "of 4 D in float32); default: %(default)s")
    p.add_argument("--kv-page-size", type=int, default=16)
    p.add_argument("--prefix-cache", default="on", choices=["on", "off"],
                   help="reuse the KV of full pages of tokens identical to another sequence's "
                   "(system prompts, earlier chat turns), kept after release until evicted; "
                   "default: %(default)s")
    p.add_argument("--max-context", type=int, help="default: the model's context length")
    p.add_argument("--compile", default="off", choices=COMPILE,
                   help="decode: decode steps run as torch.compile graphs with the weights "
                   "frozen into them, one per --compile-rows batch size, compiled before the "
                   "shard serves (float weights and KV cache; prefill stays eager, on plain "
                   "kernels; the graphs hold float weights again, int8 / int4 codes not); "
                   "default: %(default)s")
    p.add_argument("--compile-rows", type=rows_list, default=(1, 8), metavar="N,N,...",
                   help="with --compile decode: the batch sizes compiled (a step of more "
                   "sequences than the largest runs eager; fewer are padded up to the next); "
                   "each is a graph, a minute or so to compile (and, for float weights, "
                   "more memory); default: 1,8")
    p.add_argument("--mesh-name", default="cpumesh")
    p.add_argument("--mesh-listen",
                   help="bind the mesh here (host:port; default: our --peers entry)")
    p.add_argument("--mesh-transport", default="auto", choices=MESH_TRANSPORTS,
                   help="auto: shm when every rank is on one host, else tcp (zmq with CURVE)")
    p.add_argument("--mesh-stream-port", type=int, default=0,
                   help="tcp transport: our data listener's port (default: any free one)")
    p.add_argument("--mesh-timeout", type=float, default=120.0,
                   help="seconds to wait for every peer when forming the mesh")
    p.add_argument("--drain-grace", type=float, default=10.0)
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-ca", type=Path, help="require client certificates signed by this CA")
    p.add_argument("--curve-secret-key", type=Path, help="this shard's CURVE key pair file")
    p.add_argument("--curve-public-keys", type=Path, help="directory of the peers' public keys")
    p.add_argument("--internal-token-file", type=Path, metavar="FILE",
                   help="refuse calls (health excepted) without 'authorization: Bearer <token>' "
                   "carrying the one token in this file (the router's --internal-token-file)")
    p.add_argument("--log-level", default="INFO")


def available_cpus() -> int:
    return len(os.sched_getaffinity(0))


def rows_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}") \
            from None


def build_config(args: argparse.Namespace) -> ShardConfig:
    model_dir = args.model_dir
    if model_dir is None:
        from model_formats.embedded import default_cache_dir, default_model_dir
        model_dir = default_model_dir(default_cache_dir(getattr(args, "environ", None)))
    if args.tp_rank == "auto":
        tp_rank = rank_from_hostname(args.environ.get("HOSTNAME") or socket.gethostname())
    else:
        tp_rank = int(args.tp_rank)
    threads = available_cpus() if args.threads == "auto" else int(args.threads)
    return ShardConfig(
        model_dir=model_dir, tp_rank=tp_rank, tp_size=args.tp_size,
        peers=tuple(p.strip() for p in args.peers.split(",") if p.strip()),
        listen=args.listen, health_listen=args.health_listen, threads=threads,
        dtype=args.dtype, kernels=args.kernels,
        kv_capacity_tokens=16384 if args.kv_capacity_tokens is None else args.kv_capacity_tokens,
        kv_cache_mb=args.kv_cache_mb, kv_dtype=args.kv_dtype, kv_page_size=args.kv_page_size,
        prefix_cache=args.prefix_cache == "on", max_context=args.max_context,
        compile=getattr(args, "compile", "off"),
        compile_rows=tuple(sorted(set(getattr(args, "compile_rows", (1, 8))))),
        mesh_name=args.mesh_name, mesh_listen=args.mesh_listen,
        mesh_transport=args.mesh_transport, mesh_stream_port=args.mesh_stream_port,
        mesh_timeout_s=args.mesh_timeout,
        drain_grace_s=args.drain_grace, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_ca=args.tls_ca, curve_secret_key=args.curve_secret_key,
        curve_public_keys=args.curve_public_keys,
        internal_token=read_token(args.internal_token_file) if args.internal_token_file else None)


def cli_run(args: argparse.Namespace) -> int:
    from services.server import run_service
    from shard_svc.service import ShardProcess

    return run_service("shard", args, build_config, lambda config: ShardProcess(config).serve())
