"""cpumesh's C++ kernels (shard_svc/csrc/*.cpp): one extension, built at shard start for the
vector ISA inductor compiles for, whose ops are registered under `cpumesh_kernels::`:

  decode_attention  attention of one query token per row over the paged KV cache, in place
                    (shard_svc/decode_attention.py)
  int8_linear       weight-only int8 matrix product for decode steps (shard_svc/quant_linear.py)
  group_linear      weight-only int4 and int8 products in groups of 32, cpumesh's blocked
                    layouts (the same)
  top_k_lse         each row's k best logits and log-sum-exps, what a step returns
                    (shard_svc/top_k.py)

`load()` builds once per ISA (torch.utils.cpp_extension with ninja, cached under
~/.cache/cpumesh/kernels or $CPUMESH_KERNEL_CACHE: ~40 s on 2 cores the first time, then a load;
processes that start together take turns, see `_exclusive`) and returns the ISA, or None,
logged with why, where it cannot: no vectorizing ISA, no compiler. Callers then keep their
plain-torch paths. `python -m shard_svc.native` (`make kernels`) builds it ahead.

The ISA is inductor's choice (`pick_vec_isa`), remembered in the same cache per torch version,
ATEN_CPU_CAPABILITY, compiler and CPU flags (`vector_isa`): asking inductor costs a process
~2.6 s and ~75 MB of RSS (importing it, compiling its probe; measured on an Intel Xeon, 2
vCPUs), which a shard that does not compile never needs otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("cpumesh.shard")
SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
BUILD_WAIT_S = 600.0  # for another process's build of the same kernels
_loaded: dict[str, bool] = {}  # the extension's name: whether it loaded


@dataclass(frozen=True)
class VectorIsa:
    name: str  # inductor's, e.g. "avx512 avx512_vnni amx_tile"; "" where it has none
    flags: list[str]  # the compiler's macros and architecture flags for it
    floats: int  # float32 lanes of a vector


def vector_isa() -> VectorIsa:
    """Inductor's vector ISA for this CPU and process (see the module's docstring)."""
    import torch

    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(("flags", "Features"))), "")
    key = "|".join([torch.__version__, os.environ.get("ATEN_CPU_CAPABILITY", ""),
                    os.environ.get("CXX", ""), platform.machine(), cpu])
    path = build_root() / f"isa-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        return VectorIsa(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    found = pick_vec_isa()
    isa = (VectorIsa(str(found), [f"-D{m}" for m in found.build_macro()]
                     + found.build_arch_flags().split(), found.nelements())
           if found else VectorIsa("", [], 1))
    try:  # written whole, then renamed: a reader never sees half of it
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(isa)))
        tmp.replace(path)
    except OSError as e:
        log.warning("C++ kernels: cannot remember the vector ISA in %s (%s)", path, e)
    return isa


def load() -> str | None:
    """Build (once) and load the kernels for this CPU; return the ISA they were built for, or
    None (logged) when they cannot run here."""
    isa = vector_isa()
    if not isa.name:
        log.warning("C++ kernels: no vector ISA inductor compiles for; plain torch paths")
        return None
    name = extension_name(isa.name)
    if name not in _loaded:
        _loaded[name] = _build(name, isa.flags)
    return isa.name if _loaded[name] else None


def extension_name(isa: str) -> str:
    return "cpumesh_kernels_" + isa.replace(" ", "_")


def _build(name: str, flags: list[str]) -> bool:
    from torch.utils import cpp_extension

    t0 = time.monotonic()
    directory = build_root() / name
    try:
        _ninja_on_path()
        directory.mkdir(parents=True, exist_ok=True)
        with _exclusive(directory / "cpumesh.lock", BUILD_WAIT_S):
            (directory / "lock").unlink(missing_ok=True)  # torch's, left by a killed builder
            sources = []
            for source in SOURCES:  # one path for every checkout: rebuilt on change only
                copy = directory / source.name
                if not copy.exists() or copy.read_bytes() != source.read_bytes():
                    copy.write_bytes(source.read_bytes())
                sources.append(str(copy))
            cpp_extension.load(name, sources, extra_cflags=["-O3", "-fopenmp", *flags],
                               extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP's
                               build_directory=str(directory), is_python_module=False,
                               verbose=False)
    except Exception as e:  # no compiler, no ninja, a build error: the callers fall back
        errors = [line for line in str(e).splitlines() if "error" in line.lower()]
        log.warning("C++ kernels: building %s failed (%s); plain torch paths", name,
                    " | ".join(errors[:3]) or f"{type(e).__name__}: {e}")
        return False
    log.info("C++ kernels: %s ready in %.1f s (%s)", name, time.monotonic() - t0, directory)
    return True


def build_root() -> Path:
    """Where kernels are built and cached: $CPUMESH_KERNEL_CACHE if set and not empty, else
    ~/.cache/cpumesh/kernels."""
    # (an empty value is unset: it once built the kernels into the working directory)
    return Path(os.environ.get("CPUMESH_KERNEL_CACHE") or "~/.cache/cpumesh/kernels").expanduser()


@contextmanager
def _exclusive(path: Path, wait_s: float) -> Iterator[None]:
    """One builder at a time across processes (shards of one host start together). An flock
    dies with its holder, so a killed builder never blocks the next (torch's own lock file
    would: it waits for it without end); waiting is bounded by `wait_s`."""
    with open(path, "a") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process held {path} for {wait_s:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH; the `ninja` package's binary sits in
    this environment's bin, which PATH may not name (a venv's python run by path)."""
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return
    bin_dir = str(ninja.BIN_DIR)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


if __name__ == "__main__":  # `make kernels`: build before shards start (they would wait for it)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = load()
    print(f"C++ kernels: {'built for ' + built if built else 'none (see above)'}")
