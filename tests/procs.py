"""Real service processes for tests: start, wait until healthy (with a deadline), stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools import local_ports


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1, below the ephemeral range (as `cpumesh local`
    chooses them: tools/local_ports.py says why)."""
    return local_ports.free_ports(n)


class Service:
    """One `python -m <module> ...` subprocess with its log in a file."""

    def __init__(self, name: str, args: Sequence[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_dir / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, *self.args], stdout=log,
                                     stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "<no log>"

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(5)


def health_status(address: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The grpc.health.v1 status of `service` at `address`, or None when unreachable."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=service),
                              timeout=timeout).status
        except grpc.RpcError:
            return None


def wait_serving(address: str, service: Service, deadline_s: float = 120.0) -> None:
    """Block until `address` reports SERVING; fail with the log tail on exit or deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if service.proc is not None and service.proc.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.proc.returncode}:\n"
                               f"{service.log_tail()}")
        if health_status(address) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{service.name} not SERVING after {deadline_s}s:\n{service.log_tail()}")


@contextlib.contextmanager
def running(services: Sequence[Service]) -> Iterator[Sequence[Service]]:
    """Start services; always stop them all, even when the body fails."""
    try:
        for s in services:
            s.start()
        yield services
    finally:
        for s in services:
            s.stop()
