"""`cpumesh local` as a user runs it (what `make serve` starts): one launcher subprocess that
brings up tokenizer, shards and router, serves the same greedy text to the gRPC client and to the
CLI, drains on Ctrl-C and leaves no process behind; and stops everything when a service dies."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.procs import free_ports
from tools.client import RouterClient

PROMPT = "The capital of France is"
NEW = 24


class Launcher:
    """`python -m services.cli local ...` with its output collected line by line."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "local", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while not any(text in line for line in self.lines):
            try:
                if self._new.get(timeout=max(0.0, end - time.monotonic())) is None:
                    pytest.fail(f"launcher exited ({self.proc.wait()}):\n{self.output()}")
            except queue.Empty:
                pytest.fail(f"no {text!r} after {deadline_s} s:\n{self.output()}")

    def services(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self) -> None:
        """Only when a test failed midway: Ctrl-C, then SIGKILL (its services then get SIGTERM
        from the kernel, as they would if the launcher were killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[list[Launcher]]:
    made: list[Launcher] = []
    yield made
    for launcher in made:
        launcher.stop()


def start(launch: list[Launcher], model_dir: Path, tp: int, log_dir: Path,
          *extra: str) -> tuple[Launcher, str]:
    port = free_ports(1)[0]
    launcher = Launcher(["--model-dir", str(model_dir), "--tp", str(tp), "--port", str(port),
                         "--log-dir", str(log_dir), "--kv-capacity-tokens", "1024",
                         "--max-context", "512", "--ready-timeout", "150", *extra])
    launch.append(launcher)
    launcher.wait_for("Press Ctrl-C to stop.", 180)
    return launcher, f"127.0.0.1:{port}"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def gone(procs: list[psutil.Process], deadline_s: float = 5.0) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=deadline_s)
    return alive


def assert_internal_calls_need_the_run_token(procs: list[psutil.Process], logs: Path) -> None:
    """Every service got the run's token file (this user's only); a shard refuses a Reset
    without it and the tokenizer an Encode."""
    import grpc

    from services.pb.cpumesh.v1 import shard_pb2, shard_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

    token = logs / "internal-token"
    assert token.stat().st_mode & 0o777 == 0o600
    for p in procs:
        args = p.cmdline()
        assert args[args.index("--internal-token-file") + 1] == str(token)
    listen = {p.cmdline()[2]: p.cmdline()[p.cmdline().index("--listen") + 1] for p in procs}
    with grpc.insecure_channel(listen["shard_svc"]) as shard, \
            grpc.insecure_channel(listen["tokenizer_svc"]) as tokenizer:
        for call in (lambda: shard_pb2_grpc.ShardServiceStub(shard).Reset(
                         shard_pb2.ResetRequest(next_step_id=0), timeout=10),
                     lambda: tokenizer_pb2_grpc.TokenizerServiceStub(tokenizer).Encode(
                         tokenizer_pb2.EncodeRequest(), timeout=10)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_grpc_and_cli_stream_the_same_text_and_ctrl_c_drains_and_leaves_nothing(
        launch: list[Launcher], smollm2_dir: Path, tmp_path: Path) -> None:
    launcher, router = start(launch, smollm2_dir, 2, tmp_path / "logs")
    assert f"generate --router {router}" in launcher.output()
    # The model's name, not its cache directory's "SmolLM2-135M-Instruct-<hash>".
    assert 'model "SmolLM2-135M-Instruct";' in launcher.output()
    procs = launcher.services()
    assert sorted(p.cmdline()[2] for p in procs) == \
        ["router_svc", "shard_svc", "shard_svc", "tokenizer_svc"]
    assert_internal_calls_need_the_run_token(procs, tmp_path / "logs")

    async def through_grpc() -> list[str]:
        async with RouterClient(router) as client:
            return [r.text async for r in client.generate(
                PROMPT, max_new_tokens=NEW, temperature=0, ignore_eos=True, timeout=60)]

    chunks = asyncio.run(through_grpc())
    text = "".join(chunks)
    assert len([c for c in chunks if c]) >= NEW // 2 and len(text) > 30

    greedy = ["--router", router, "--temperature", "0", "--max-new-tokens", str(NEW),
              "--ignore-eos"]
    plain = cli("generate", *greedy, PROMPT)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == text + "\n"
    assert f"{NEW} generated tokens" in plain.stderr

    # --json streams one line per chunk, as the chunks come, then the whole.
    stream = subprocess.Popen([sys.executable, "-m", "services.cli", "generate", *greedy,
                               "--json", PROMPT], stdout=subprocess.PIPE, text=True)
    assert stream.stdout is not None
    arrivals = [(time.monotonic(), json.loads(line)) for line in stream.stdout]
    assert stream.wait(60) == 0
    *deltas, (_, final) = arrivals
    assert "".join(d["text"] for _, d in deltas) == final["text"] == text
    assert len(deltas) >= NEW // 2 and deltas[-1][0] - deltas[0][0] > 0.2
    assert final["done"] and final["finish_reason"] == "length"
    assert final["usage"]["generated_tokens"] == NEW

    # chat: two turns over a pipe; the second sees the first.
    talk = subprocess.run([sys.executable, "-m", "services.cli", "chat", "--router", router,
                           "--temperature", "0", "--max-new-tokens", "12", "--json"],
                          input="Hello!\nSay that again.\n/exit\n", capture_output=True,
                          text=True, timeout=120)
    assert talk.returncode == 0, talk.stderr
    turns = [d for d in map(json.loads, talk.stdout.splitlines()) if d.get("done")]
    assert [t["turn"] for t in turns] == [1, 2]
    assert turns[1]["usage"]["prompt_tokens"] > \
        turns[0]["usage"]["prompt_tokens"] + len(turns[0]["token_ids"])

    # Ctrl-C while a request streams: it finishes (drain), then every process is gone.
    async def interrupted() -> tuple[str, int]:
        async with RouterClient(router) as client:
            got = []
            async for r in client.generate(PROMPT, max_new_tokens=NEW, temperature=0,
                                           ignore_eos=True, timeout=60):
                got.append(r.text)
                if len(got) == 3:
                    os.kill(launcher.proc.pid, signal.SIGINT)
                if r.finish_reason:
                    return "".join(got), r.usage.generated_tokens
        raise AssertionError("the stream ended without a finish")

    assert asyncio.run(interrupted()) == (text, NEW)
    assert launcher.proc.wait(60) == 0, launcher.output()
    assert "stopped tokenizer (0), shard 0 (0), shard 1 (0), router (0)" in launcher.output()
    assert gone(procs) == []
    assert not (tmp_path / "logs" / "internal-token").exists()  # removed with the run


def test_int8_at_tp2_answers_as_the_float_model(
        launch: list[Launcher], smollm2_dir: Path, tmp_path: Path) -> None:
    """`cpumesh local --tp 2 --dtype int8`: cpumesh's int8 kernel on blocked weights, rank 1's
    LM head a slice of the blocked embedding. It once served garbage (" indiff indiff ..."):
    the warm-up twin re-sliced that LM head. SmolLM2's greedy continuation at float32 (and in
    transformers) names Paris."""
    _, router = start(launch, smollm2_dir, 2, tmp_path / "logs", "--dtype", "int8")
    out = cli("generate", "--router", router, "--temperature", "0", "--max-new-tokens", "4",
              PROMPT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0].strip(".,") == "Paris", out.stdout


def test_a_service_that_dies_is_reported_and_the_rest_are_stopped(
        launch: list[Launcher], smollm2_dir: Path, tmp_path: Path) -> None:
    launcher, _ = start(launch, smollm2_dir, 1, tmp_path / "logs")
    procs = launcher.services()
    shard = next(p for p in procs if p.cmdline()[2] == "shard_svc")
    shard.kill()
    assert launcher.proc.wait(60) == 1
    out = launcher.output()
    assert "shard 0 exited with code -9; its last log lines" in out
    assert "| " in out and "rank 0 SERVING" in out  # the shard's own log, quoted
    assert gone(procs) == []


@pytest.mark.parametrize("flag", ["--port", "--http-port"])
def test_a_busy_port_is_refused_before_the_model_is_converted(flag: str, tmp_path: Path) -> None:
    """`make serve` on a busy port: the console script exits at once, naming the port and its
    flag, having converted nothing and made no log directory."""
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = "--http-port" if flag == "--port" else "--port"
        run = subprocess.run(
            [str(Path(sys.executable).parent / "cpumesh"), "local", "--cache-dir", str(cache),
             "--log-dir", str(logs), flag, str(port), other, "0"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 1
    assert f"127.0.0.1:{port}" in run.stderr and f"Pass {flag} with another number" in run.stderr
    assert "preparing" not in run.stdout and "converting" not in run.stderr
    assert not cache.exists() and not logs.exists()


def test_the_same_port_for_grpc_and_http_is_refused(tmp_path: Path) -> None:
    run = subprocess.run(
        [str(Path(sys.executable).parent / "cpumesh"), "local", "--cache-dir",
         str(tmp_path / "cache"), "--port", "50999", "--http-port", "50999"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode != 0
    assert "--port and --http-port are both 50999" in run.stderr
    assert not (tmp_path / "cache").exists()


# The commands README.md's option tables cover (a new flag on one of them needs a row there).
DOCUMENTED = ("local", "generate", "chat", "router", "shard", "tokenizer", "convert",
              "prepare-default")


def test_readme_documents_every_option_of_the_serving_commands() -> None:
    import argparse

    from services.cli import _subcommands

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = []
    for name, command in _subcommands().items():
        if name not in DOCUMENTED:
            continue
        parser = argparse.ArgumentParser(prog=f"cpumesh {name}")
        command.add_arguments(parser)
        missing += [f"cpumesh {name} {option}" for action in parser._actions
                    for option in action.option_strings
                    if option.startswith("--") and option != "--help"
                    and f"`{option}" not in readme]
    assert not missing, f"add these to README.md's option tables: {missing}"
