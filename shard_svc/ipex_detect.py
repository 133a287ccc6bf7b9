"""Whether the IPEX backend can run here, and the one log line that says which path a shard takes.

Intel Extension for PyTorch (`intel_extension_for_pytorch`, IPEX) is built against one torch
major.minor (IPEX 2.8 needs torch 2.8) and fails at import on any other, after printing an
error. So the version is read from the installed distribution's metadata and compared with
`torch.__version__` first; the module is imported only when they match. Its fast weight-only
kernels are compiled for CPUs with AVX512-FP16 (Sapphire Rapids and later); elsewhere they
dequantize the whole weight on every call, so the backend then leaves the matrix products to the
plain kernels (see `IpexStatus.fast_linear`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from services.errors import InvalidArgument

log = logging.getLogger(__name__)

MODULE = "intel_extension_for_pytorch"
DISTRIBUTION = "intel-extension-for-pytorch"
FAST_LINEAR_FLAG = "avx512_fp16"  # IPEX's weight-only kernels are built for it
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
INSTALL = ("IPEX 2.8 runs on torch 2.8 only: install torch 2.8 (CPU build), then "
           "`pip install 'cpumesh[ipex]'` (README, \"IPEX backend\"), or try it with "
           "`make test-ipex`")


@dataclass(frozen=True)
class IpexStatus:
    module: ModuleType | None  # the imported package, None when the plain path is taken
    reason: str  # why the plain path, or what was found
    version: str | None = None
    cpu_flags: frozenset[str] = frozenset()

    @property
    def usable(self) -> bool:
        return self.module is not None

    @property
    def fast_linear(self) -> bool:
        """Whether IPEX's weight-only linear kernels are the fast ones on this CPU."""
        return FAST_LINEAR_FLAG in self.cpu_flags

    def describe(self) -> str:
        if not self.usable:
            return f"kernel backend: plain torch ({self.reason})"
        flags = " ".join(f for f in SHOWN_FLAGS if f in self.cpu_flags) or "none of " + \
            " ".join(SHOWN_FLAGS)
        linear = ("its weight-only linear for int8 weights" if self.fast_linear else
                  f"plain linear (no {FAST_LINEAR_FLAG}: IPEX would dequantize per call)")
        return (f"kernel backend: IPEX {self.version} on torch {torch.__version__} "
                f"(CPU flags: {flags}): {linear}, fused RMSNorm and rotary, paged decode "
                "attention")


def major_minor(version: str) -> str | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def installed_version() -> str | None:
    """The IPEX version installed (without importing it), None where it is not installed."""
    loaded = sys.modules.get(MODULE)
    if loaded is not None:
        return str(getattr(loaded, "__version__", "unknown"))
    try:
        if importlib.util.find_spec(MODULE) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def detect_ipex() -> IpexStatus:
    """Find, check and import IPEX; never raises (a failure is the plain path's reason)."""
    version = installed_version()
    if version is None:
        return IpexStatus(None, f"{MODULE} is not installed")
    wanted, have = major_minor(version), major_minor(torch.__version__)
    if wanted is None or wanted != have:
        return IpexStatus(None, f"{MODULE} {version} needs torch {wanted or '?'}, this is torch "
                                f"{torch.__version__}", version)
    try:
        module = importlib.import_module(MODULE)
    except (Exception, SystemExit) as e:  # IPEX exits on a mismatch it finds itself
        return IpexStatus(None, f"{MODULE} {version} failed to import: "
                                f"{type(e).__name__}: {e}", version)
    # the module's own version (e.g. 2.8.0+cpu), as a later call finds it loaded
    return IpexStatus(module, "imported", str(getattr(module, "__version__", version)),
                      cpu_flags())


def require_ipex() -> IpexStatus:
    """`detect_ipex` for `--kernels ipex`: a usable IPEX, or InvalidArgument saying why not and
    what to install."""
    status = detect_ipex()
    if not status.usable:
        raise InvalidArgument(f"kernels 'ipex': {status.reason}; {INSTALL}")
    return status


def select_backend(library: str = "auto") -> IpexStatus:
    """Which path the shard takes for `--kernels library` (auto: IPEX where usable; ipex: IPEX or
    InvalidArgument; any other: the plain kernels), with its one log line."""
    if library == "ipex":
        status = require_ipex()
    elif library == "auto":
        status = detect_ipex()
    else:
        status = IpexStatus(None, f"--kernels {library}")
    log.info("%s", status.describe())
    return status
