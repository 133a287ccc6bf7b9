"""The entry points load only what their command needs: a running router (gRPC and HTTP API)
never imports torch, numpy, transformers or the shard's code, and `cpumesh --help` lists every
command without importing any command's module.

Checked on real processes with `python -X importtime`, which reports every module the process
imports, when it imports it, for its whole life."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading

from services.cli import COMMANDS

HEAVY = ("torch", "numpy", "transformers", "tokenizers", "shard_svc", "model_formats")


def imported(importtime_lines: list[str]) -> set[str]:
    return {line.split("|")[2].strip() for line in importtime_lines
            if line.startswith("import time:") and "imported package" not in line}


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_a_serving_router_never_imports_torch_numpy_or_the_shard() -> None:
    # Nothing listens on port 1: the router starts, serves its API and keeps probing the shards.
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "router_svc", "--tokenizer", "127.0.0.1:1",
         "--shards", "127.0.0.1:1", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        while not any("waiting for the shard group" in line for line in seen):
            line = lines.get(timeout=60)  # a deadline for each line
            assert line is not None, "".join(seen[-30:])
            seen.append(line)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    modules = imported(seen)
    assert {"router_svc.service", "router_svc.engine", "router_svc.http_api"} <= modules
    assert heavy(modules) == []


def test_help_lists_every_command_and_imports_none() -> None:
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "services.cli", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    listed = run.stdout.split("options:")[0]
    assert all(f"    {name} " in listed or f"    {name}\n" in listed for name in COMMANDS)
    modules = imported(run.stderr.splitlines())
    assert not modules & {module for module, _ in COMMANDS.values()}
    assert heavy(modules) == []


def test_the_grpc_client_tool_never_imports_torch_or_numpy() -> None:
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "tools.client", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert heavy(imported(run.stderr.splitlines())) == []
