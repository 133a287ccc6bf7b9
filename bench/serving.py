"""Service-level load test: cpumesh (tokenizer, shards, router as real processes, tp 1 and 2)
and llama-cpp-python's OpenAI-compatible server on the same model, each at several numbers of
concurrent users (closed loop), with `cpumesh loadtest`'s engine.

    python -m bench.serving [--users 1,4,16,64] [--duration 60] [--requests 200]

Writes one JSON per system; the report plots latency against throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.machine import BENCH_PYTHON
from tests.procs import Service, free_ports, wait_serving
from tools.loadtest import LoadConfig, run_load


@contextlib.contextmanager
def cpumesh_cluster(model_dir: Path, tp: int, cores: int, log_dir: Path,
                    max_context: int = 1024, dtype: str = "float32",
                    shard_args: tuple[str, ...] = ()) -> Iterator[str]:
    """Tokenizer, `tp` shards (cores // tp threads each) and a router; yields grpc://router."""
    ports = free_ports(2 + 2 * tp)
    tok, router = (f"127.0.0.1:{p}" for p in ports[:2])
    shards = [f"127.0.0.1:{p}" for p in ports[2:2 + tp]]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports[2 + tp:])
    services = [Service("tokenizer", ["-m", "tokenizer_svc", "--model-dir", str(model_dir),
                                      "--listen", tok], log_dir)]
    services += [Service(f"shard{r}", [
        "-m", "shard_svc", "--model-dir", str(model_dir), "--tp-size", str(tp), "--tp-rank",
        str(r), "--peers", peers, "--listen", a, "--threads", str(max(1, cores // tp)),
        "--kv-capacity-tokens", "16384", "--max-context", str(max_context),
        "--mesh-timeout", "120", "--dtype", dtype, *shard_args], log_dir)
        for r, a in enumerate(shards)]
    services.append(Service("router", ["-m", "router_svc", "--tokenizer", tok, "--shards",
                                       ",".join(shards), "--listen", router,
                                       "--max-running", "64", "--max-waiting", "256"], log_dir))
    try:
        for s in services:
            s.start()
        wait_serving(router, services[-1], deadline_s=900)  # compiled shards take minutes
        yield f"grpc://{router}"
    finally:
        for s in reversed(services):
            s.stop()


@contextlib.contextmanager
def llama_server(gguf: Path, threads: int, log_dir: Path, n_ctx: int = 4096) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server (bench environment); yields its base URL."""
    (port,) = free_ports(1)
    server = Service("llama-server", ["-m", "llama_cpp.server", "--model", str(gguf),
                                      "--n_threads", str(threads), "--n_threads_batch",
                                      str(threads), "--n_ctx", str(n_ctx), "--port", str(port),
                                      "--host", "127.0.0.1",
                                      # by default a waiting request ends the streaming one
                                      "--interrupt_requests", "False"], log_dir)
    try:  # the bench environment's interpreter, not ours
        log = server.log_path.open("ab")
        server.proc = subprocess.Popen([str(BENCH_PYTHON), *server.args], stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if server.proc.poll() is not None:
                raise RuntimeError(f"llama server exited:\n{server.log_tail()}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/v1/models", timeout=1).read()
                break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"llama server not up:\n{server.log_tail()}")
        yield url
    finally:
        server.stop()


def sweep(target: str, users: list[int], requests: int, duration_s: float, prompt: str,
          output: str, slo_ttft_s: float, slo_itl_s: float) -> list[dict[str, Any]]:
    rows = []
    for n in users:
        cfg = LoadConfig(target, users=n, requests=max(requests, n), duration_s=duration_s,
                         prompt_tokens=prompt, output_tokens=output, slo_ttft_s=slo_ttft_s,
                         slo_itl_s=slo_itl_s, timeout_s=max(120.0, 4 * duration_s))
        report = asyncio.run(run_load(cfg))
        report["users"] = n
        rows.append(report)
    return rows


def run(model_dir: Path, gguf: Path | None, cores: int, users: list[int], requests: int,
        duration_s: float, prompt: str = "16:64", output: str = "16:48",
        tps: tuple[int, ...] = (1, 2), slo_ttft_s: float = 2.0,
        slo_itl_s: float = 0.5, dtype: str = "float32",
        shard_args: tuple[str, ...] = ()) -> dict[str, Any]:
    systems: dict[str, Any] = {}
    args = (users, requests, duration_s, prompt, output, slo_ttft_s, slo_itl_s)
    with tempfile.TemporaryDirectory() as logs:
        for tp in tps:
            with cpumesh_cluster(model_dir, tp, cores, Path(logs), dtype=dtype,
                                 shard_args=shard_args) as target:
                systems[f"cpumesh tp {tp}"] = sweep(target, *args)
        if gguf is not None:
            with llama_server(gguf, cores, Path(logs)) as target:
                systems[f"llama-cpp-python server ({gguf.name.split('.')[-2]})"] = sweep(
                    target, *args)
    return {"dtype": dtype, "shard_args": list(shard_args), "prompt_tokens": prompt,
            "output_tokens": output,
            "duration_s": duration_s,
            "requests": requests, "slo_ttft_s": slo_ttft_s, "slo_itl_s": slo_itl_s,
            "systems": systems}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--gguf", type=Path)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--users", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--tp", default="1,2", help="tensor-parallel sizes of cpumesh")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shard-args", default="", metavar="FLAGS",
                   help="more flags for every shard: --shard-args='--compile decode'")
    p.add_argument("--out", type=Path, default=Path("bench/results/serving.json"))
    a = p.parse_args(argv)
    if a.model_dir is None:
        from model_formats.embedded import default_model_dir
        a.model_dir = default_model_dir()
    result = run(a.model_dir, a.gguf, a.cores, [int(u) for u in a.users.split(",")],
                 a.requests, a.duration, tps=tuple(int(t) for t in a.tp.split(",")),
                 dtype=a.dtype, shard_args=tuple(shlex.split(a.shard_args)))
    a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
