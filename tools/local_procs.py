"""The processes of `cpumesh local`: start one with its log, follow its phases, stop them all.

Each child runs `python -m <service>` in its own session (its own process group, away from the
terminal's Ctrl-C, which the launcher handles) and, on Linux, is sent SIGTERM by the kernel if
the launcher itself dies, so no service outlives it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from model_formats.gguf.convert import Progress

# (log line pattern, phase shown): the last pattern found in a child's log names its phase.
PHASES = [
    (re.compile(r": loading "), "loading weights"),
    (re.compile(r"weights loaded in ([\d.]+ s)"), r"weights loaded in \1; choosing kernels"),
    (re.compile(r"kernels chosen in ([\d.]+ s)"), r"kernels chosen in \1; joining the mesh"),
    (re.compile(r"warmed up in ([\d.]+ s)"), r"mesh formed; warmed up in \1"),
    (re.compile(r"compiling decode steps of ([\d ,and]+) rows"),
     r"compiling decode steps of \1 rows (about a minute each)"),
    (re.compile(r"compiled decode: (\d+) rows warm in ([\d.]+ s)"),
     r"compiled the \1-row decode step in \2"),
    (re.compile(r"router on port"), "connecting to the tokenizer and shards"),
]
SERVING = health_pb2.HealthCheckResponse.SERVING
PR_SET_PDEATHSIG = 1
# Health polls must see a server as soon as it listens, not after gRPC's reconnect backoff
# (1 s, growing to 120 s) since the last refused attempt.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100),
                  ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


class Child:
    """One service process, its log file and its health."""

    def __init__(self, name: str, address: str, args: Sequence[str]) -> None:
        self.name, self.address, self.args = name, address, list(args)
        self.log_path = Path(f"{name.replace(' ', '')}.log")
        self.env: Mapping[str, str] = os.environ
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self._phase: str | None = None
        self._channel: grpc.Channel | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *self.args], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=dict(self.env), start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def phase(self) -> str | None:
        """The child's phase when it changed since the last call, else None."""
        if self.ready:
            return None
        if self._health() == SERVING:
            self.ready, phase = True, "ready"
        else:
            phase, log = "starting", self.tail(200)
            for pattern, shown in PHASES:
                for match in pattern.finditer(log):
                    phase = match.expand(shown)
        if phase == self._phase:
            return None
        self._phase = phase
        return phase

    def _health(self) -> int | None:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address, FAST_RECONNECT)
        try:
            return health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(), timeout=0.5).status
        except grpc.RpcError:
            return None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "  <no log>"
        return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        """Send `sig` to the child's whole process group (it and anything it started)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def stop_all(children: Sequence[Child], grace_s: float, hurry: Callable[[], bool],
             say: Callable[[str], None]) -> None:
    """Stop every child: the last one (the router) first, so it drains while the services
    behind it still answer, then the rest together. SIGTERM, then SIGKILL after `grace_s` (at
    once when `hurry()` turns true); finally anything left in their process groups is killed."""
    for child in children:
        child.close()
    for group in (list(children[-1:]), list(children[:-1])):
        running = [c for c in group if c.running()]
        for child in running:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(c.running() for c in running) and time.monotonic() < deadline and not hurry():
            time.sleep(0.05)
        for child in (c for c in running if c.running()):
            say(f"{child.name} still running: killing it")
            child.signal(signal.SIGKILL)
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(10)
            except subprocess.TimeoutExpired:
                say(f"{child.name} (pid {child.proc.pid}) did not exit after SIGKILL")
    for child in children:
        child.signal(signal.SIGKILL)  # stragglers the child started, if any
    if any(c.proc is not None for c in children):
        say("stopped " + ", ".join(f"{c.name} ({c.returncode()})" for c in children
                                   if c.proc is not None))


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn: the kernel sends the child SIGTERM when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def write_internal_token(path: Path) -> None:
    """A fresh random internal token in `path`, readable by this user only."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")


def converted_gguf(gguf: Path, cache_dir: Path, progress: Progress | None = None) -> Path:
    """`gguf` converted once into `cache_dir/models`, keyed by its path, size and mtime."""
    from model_formats.embedded import CONVERTER_VERSION, convert_once

    st = gguf.stat()
    key = f"{CONVERTER_VERSION} {gguf.resolve()} {st.st_size} {st.st_mtime_ns}"
    target = cache_dir / "models" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return convert_once(gguf, target, progress)
