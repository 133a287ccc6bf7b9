"""Emulated hosts: network namespaces, each joined to the root namespace by a veth pair.

    python -m bench.netns NAMESPACE MODULE [ARGS...]   # run `python -m MODULE ARGS` inside it

Host r is namespace `cpumesh-<pid>-<r>` holding address 10.77.X.2/24 on its end of the pair; the
root namespace holds 10.77.X.1 on the other end and is every host's default route, so hosts
reach each other only through the root namespace (where the delay relays listen). The link
rate is a `tbf` qdisc on both ends (egress each way). Needs root and `ip`/`tc`; everything is
removed on close, and namespaces left behind by a dead process are removed on the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass

PREFIX = "cpumesh-"
CLONE_NEWNET = 0x40000000
LOCK = "/tmp/cpumesh-netns.lock"  # held while picking subnets and creating links


class NetnsError(RuntimeError):
    """The machine does not allow the emulation (the message says why)."""


@dataclass(frozen=True)
class Host:
    ns: str  # network namespace
    veth: str  # root-namespace end of the pair
    inner: str  # the end inside `ns`
    address: str  # inside the namespace: our processes bind here
    gateway: str  # root-namespace end: relays listen here


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")


def unavailable() -> str | None:
    """Why emulated hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "not root (network namespaces and qdiscs need CAP_NET_ADMIN)"
    missing = [tool for tool in ("ip", "tc") if not shutil.which(tool)]
    return f"{' and '.join(missing)} not installed" if missing else None


def tbf_burst(rate: str) -> str:
    """Bucket size: 100 µs of the rate, at least 16 KiB. Smaller buckets fall well short of the
    rate here (bulk TCP at 10gbit: 4.5 Gbit/s with 20 µs, 8 with 100 µs): the timer wakes late."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not m:
        raise ValueError(f"rate must look like 10gbit, got {rate!r}")
    bits = float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2]]
    return f"{max(16 * 1024, int(bits / 8 * 100e-6))}b"


class Hosts:
    """`n` emulated hosts; a context manager that always removes what it made."""

    def __init__(self, n: int) -> None:
        reason = unavailable()
        if reason:
            raise NetnsError(reason)
        self.hosts: list[Host] = []
        tag = str(os.getpid())
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_stale()
            used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True,
                                  text=True).stdout
            free = (x for x in range(256) if f" 10.77.{x}." not in used)
            try:
                for r in range(n):
                    x = next(free)
                    host = Host(f"{PREFIX}{tag}-{r}", f"cmh{tag}-{r}", f"cmi{tag}-{r}",
                                f"10.77.{x}.2", f"10.77.{x}.1")
                    self.hosts.append(host)
                    self._create(host)
            except BaseException:
                self.close()
                raise

    @staticmethod
    def _create(h: Host) -> None:
        _ip("ip", "netns", "add", h.ns)
        _ip("ip", "link", "add", h.veth, "type", "veth", "peer", "name", h.inner)
        _ip("ip", "link", "set", h.inner, "netns", h.ns)
        _ip("ip", "addr", "add", f"{h.gateway}/24", "dev", h.veth)
        _ip("ip", "link", "set", h.veth, "up")
        _ip("ip", "link", "set", "lo", "up", ns=h.ns)
        _ip("ip", "addr", "add", f"{h.address}/24", "dev", h.inner, ns=h.ns)
        _ip("ip", "link", "set", h.inner, "up", ns=h.ns)
        _ip("ip", "route", "add", "default", "via", h.gateway, ns=h.ns)

    def set_rate(self, rate: str | None) -> None:
        """Limit every link to `rate` each way (tbf), or lift the limit (None)."""
        for h in self.hosts:
            for dev, ns in ((h.veth, None), (h.inner, h.ns)):
                if rate is None:
                    with contextlib.suppress(NetnsError):
                        _ip("tc", "qdisc", "del", "dev", dev, "root", ns=ns)
                else:
                    _ip("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                        "burst", tbf_burst(rate), "latency", "10ms", ns=ns)

    def close(self) -> None:
        for h in self.hosts:  # deleting the namespace deletes its end, and so the pair
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
            subprocess.run(["ip", "link", "del", h.veth], capture_output=True)
        self.hosts = []

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale() -> list[str]:
    """Delete our namespaces whose creating process is gone."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    removed = []
    for line in names.splitlines():
        m = re.match(rf"{PREFIX}(\d+)-\d+", line)
        if m and not os.path.exists(f"/proc/{m[1]}"):
            subprocess.run(["ip", "netns", "del", m[0]], capture_output=True)
            removed.append(m[0])
    return removed


def enter(ns: str) -> None:
    """Move this process (before it opens sockets or starts threads) into namespace `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({ns}) failed")
    finally:
        os.close(fd)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m bench.netns NAMESPACE MODULE [ARGS...]")
    ns, module, *rest = sys.argv[1:]
    enter(ns)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
