"""Tokenizer speed on one core: encode and incremental-detokenize tokens/s, and the latency of one
DetokenizeBatch call of 64 sequences through the real gRPC service, each against peers measured in
the same run.

    python -m bench.tokenizer [--model-dir DIR] [--sequences 64] [--calls 400] [--cpus 0,1]

Without --model-dir it uses the embedded SmolLM2-135M-Instruct (converted once). The benchmark
process is pinned to the first CPU of --cpus and the service process to the second, and the
`tokenizers` thread pool is limited to one thread, so every figure is per core.

Peers: encode against the raw `tokenizers` library (our floor) and transformers' tokenizer;
detokenization against the same incremental algorithm done per sequence through transformers'
`decode` (the usual Python way); the gRPC call against the same batch on the core in process
and against an empty RPC (Info).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PIECES = [
    "The committee met on Tuesday to discuss the budget, and after a long debate it agreed to "
    "fund the new library, the bridge repairs and two more buses for the northern routes. ",
    "def fibonacci(n: int) -> list[int]:\n    a, b = 0, 1\n    out = []\n    for _ in range(n):\n"
    "        out.append(a)\n        a, b = b, a + b\n    return out\n\n",
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。今日は晴れています。",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "اللغة العربية هي إحدى أكثر اللغات انتشارا في العالم، ويتحدثها أكثر من ٤٠٠ مليون شخص. ",
    "Great job 🎉🚀 — see you soon 👋🏽 (family: 👨‍👩‍👧‍👦)\n\n\t  indented   spaces  \r\n",
]


def corpus(count: int, chars: int) -> list[str]:
    """`count` texts of about `chars` characters, each a different rotation of the pieces."""
    texts = []
    for i in range(count):
        parts, length, k = [], 0, i
        while length < chars:
            piece = PIECES[k % len(PIECES)]
            parts.append(piece)
            length, k = length + len(piece), k + 1 + i % 3
        texts.append("".join(parts))
    return texts


def rate(fn: Any, tokens: int, repeats: int) -> float:
    """Best-of-`repeats` tokens per second of `fn()`."""
    best = min(_timed(fn) for _ in range(repeats))
    return tokens / best


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_encode(core: Any, reference: Any, texts: list[str], repeats: int) -> dict[str, float]:
    from tokenizer_svc.tokenizer import EncodeInput

    batches = [texts[i:i + 64] for i in range(0, len(texts), 64)]
    tokens = sum(len(ids) for ids in core.encode_batch([EncodeInput(text=t) for t in texts]))
    return {
        "tokens": tokens,
        "cpumesh": rate(lambda: [core.encode_batch([EncodeInput(text=t) for t in b])
                                 for b in batches], tokens, repeats),
        "tokenizers": rate(lambda: [core._backend.encode_batch_fast(b) for b in batches],
                           tokens, repeats),
        "transformers": rate(lambda: [reference(b)["input_ids"] for b in batches],
                             tokens, repeats),
    }


def detokenize_stream(step: Any, sequences: list[list[int]], context: int) -> int:
    """Stream every sequence one token per call (all sequences in each call) through
    `step(items) -> [(text, prefix, read)]`; returns the number of tokens detokenized."""
    state = [(context, 0, context) for _ in sequences]  # seen, prefix, read
    longest = max(len(s) for s in sequences)
    for _ in range(longest - context):
        active = [k for k, s in enumerate(sequences) if state[k][0] < len(s)]
        items = []
        for k in active:
            seen, prefix, read = state[k]
            items.append((sequences[k][prefix:seen + 1], 0, read - prefix, seen + 1 == len(
                sequences[k])))
        for k, (_, new_prefix, new_read) in zip(active, step(items), strict=True):
            seen, prefix, _ = state[k]
            state[k] = (seen + 1, prefix + new_prefix, prefix + new_read)
    return sum(len(s) - context for s in sequences)


def core_step(core: Any) -> Any:
    from tokenizer_svc.tokenizer import DetokenizeInput

    def step(items: list[tuple[list[int], int, int, bool]]) -> list[tuple[str, int, int]]:
        results = core.detokenize_batch([DetokenizeInput(*i) for i in items], True)
        return [(r.text, r.prefix_offset, r.read_offset) for r in results]
    return step


def transformers_step(reference: Any) -> Any:
    """The same algorithm, one sequence at a time through transformers' decode."""
    def step(items: list[tuple[list[int], int, int, bool]]) -> list[tuple[str, int, int]]:
        out = []
        for ids, prefix, read, flush in items:
            old = reference.decode(ids[prefix:read], skip_special_tokens=True)
            new = reference.decode(ids[prefix:], skip_special_tokens=True)
            if flush or (len(new) > len(old) and not new.endswith("\ufffd")):
                out.append((new[len(old):], read, len(ids)))
            else:
                out.append(("", prefix, read))
        return out
    return step


def bench_grpc(model_dir: Path, sequences: list[list[int]], calls: int, cpu: int | None,
               core: Any) -> dict[str, float]:
    from services.pb.cpumesh.v1 import tokenizer_pb2 as pb
    from services.pb.cpumesh.v1 import tokenizer_pb2_grpc as pb_grpc
    service, channel = start_service(model_dir, cpu)
    try:
        stub = pb_grpc.TokenizerServiceStub(channel)
        grpc_ms: list[float] = []
        core_ms: list[float] = []
        core_call = core_step(core)

        def step(items: list[tuple[list[int], int, int, bool]]) -> list[tuple[str, int, int]]:
            request = pb.DetokenizeBatchRequest(skip_special_tokens=True, items=[
                pb.DetokenizeItem(seq_id=k, token_ids=ids, prefix_offset=p, read_offset=r,
                                  flush=f) for k, (ids, p, r, f) in enumerate(items)])
            t0 = time.perf_counter()
            response = stub.DetokenizeBatch(request, timeout=10)
            grpc_ms.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            core_call(items)
            core_ms.append((time.perf_counter() - t0) * 1e3)
            return [(r.text, r.prefix_offset, r.read_offset) for r in response.results]

        while len(grpc_ms) < calls:
            detokenize_stream(step, sequences, 5)
        empty_ms = []
        for _ in range(calls):
            t0 = time.perf_counter()
            stub.Info(pb.TokenizerInfoRequest(), timeout=10)
            empty_ms.append((time.perf_counter() - t0) * 1e3)
    finally:
        channel.close()
        service.terminate()
        service.wait(20)
    return {f"{name}_{q}": _quantile(values, q) for name, values in
            (("grpc_ms", grpc_ms), ("core_ms", core_ms), ("empty_rpc_ms", empty_ms))
            for q in ("p50", "p90", "p99")}


def start_service(model_dir: Path, cpu: int | None) -> tuple[subprocess.Popen[bytes], Any]:
    """`python -m tokenizer_svc` on a free port (pinned to `cpu`), once it reports SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = subprocess.Popen(
        [sys.executable, "-m", "tokenizer_svc", "--model-dir", str(model_dir), "--listen",
         f"127.0.0.1:{port}", "--workers", "1", "--log-level", "WARNING"],
        env={**os.environ, "RAYON_NUM_THREADS": "1"})
    if cpu is not None:
        os.sched_setaffinity(service.pid, {cpu})
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and service.poll() is None:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return service, channel
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    service.kill()
    raise RuntimeError("the tokenizer service did not start")


def _quantile(values: list[float], q: str) -> float:
    cuts = statistics.quantiles(values, n=100)
    return round(cuts[{"p50": 49, "p90": 89, "p99": 98}[q]], 3)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--sequences", type=int, default=64, help="sequences per DetokenizeBatch")
    p.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    p.add_argument("--calls", type=int, default=400, help="gRPC calls timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus", default="0,1", help="CPU for this process, CPU for the service")
    p.add_argument("--out", type=Path, default=Path("bench/results/tokenizer.json"))
    args = p.parse_args(argv)
    cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else []
    # Entry point: one core for us, one thread for the tokenizers library (set before it starts).
    os.environ["RAYON_NUM_THREADS"] = "1"
    if cpus:
        os.sched_setaffinity(0, {cpus[0]})

    from transformers import AutoTokenizer

    from tokenizer_svc.tokenizer import Tokenizer

    model_dir = args.model_dir
    if model_dir is None:
        from model_formats.embedded import default_model_dir
        model_dir = default_model_dir()
    core = Tokenizer.from_dir(model_dir)
    reference = AutoTokenizer.from_pretrained(model_dir)

    texts = corpus(256, 2000)
    encode = bench_encode(core, reference, texts, args.repeats)
    sequences = [core.encode(t, add_special_tokens=False)[:args.tokens + 5]
                 for t in corpus(args.sequences, 4 * args.tokens)]
    detok_tokens = detokenize_stream(core_step(core), sequences, 5)
    detok = {"tokens": detok_tokens,
             "cpumesh": rate(lambda: detokenize_stream(core_step(core), sequences, 5),
                             detok_tokens, args.repeats),
             "transformers_loop": rate(
                 lambda: detokenize_stream(transformers_step(reference), sequences, 5),
                 detok_tokens, 1)}
    latency = bench_grpc(model_dir, sequences, args.calls, cpus[1] if len(cpus) > 1 else None,
                         core)

    result = {"model_dir": str(model_dir), "machine": platform.processor() or platform.machine(),
              "python": sys.version.split()[0], "sequences_per_call": args.sequences,
              "encode_tokens_per_s": encode, "detokenize_tokens_per_s": detok,
              "detokenize_batch_latency": latency}
    print(f"model: {model_dir}  (one core each; {args.sequences} sequences per call)")
    print(f"{'encode tokens/s':<34}{'cpumesh':>12}{'tokenizers':>12}{'transformers':>14}")
    print(f"{'':<34}{encode['cpumesh']:>12,.0f}{encode['tokenizers']:>12,.0f}"
          f"{encode['transformers']:>14,.0f}")
    print(f"{'detokenize tokens/s (streamed)':<34}{'cpumesh':>12}{'':>12}{'hf loop':>14}")
    print(f"{'':<34}{detok['cpumesh']:>12,.0f}{'':>12}{detok['transformers_loop']:>14,.0f}")
    print(f"{'DetokenizeBatch x64 latency, ms':<34}{'p50':>12}{'p90':>12}{'p99':>14}")
    for name, label in (("grpc_ms", "through gRPC"), ("core_ms", "same batch, core in process"),
                        ("empty_rpc_ms", "empty RPC (Info)")):
        print(f"  {label:<32}{latency[name + '_p50']:>12.3f}{latency[name + '_p90']:>12.3f}"
              f"{latency[name + '_p99']:>14.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
