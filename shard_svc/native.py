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
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("cpumesh.shard")
SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
BUILD_WAIT_S = 600.0  # for another process's build of the same kernels
_loaded: dict[str, bool] = {}  # the extension's name: whether it loaded


def load() -> str | None:
    """Build (once) and load the kernels for this CPU; return the ISA they were built for, or
    None (logged) when they cannot run here."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    if not isa:
        log.warning("C++ kernels: no vector ISA inductor compiles for; plain torch paths")
        return None
    name = extension_name(str(isa))
    if name not in _loaded:
        _loaded[name] = _build(name, [f"-D{m}" for m in isa.build_macro()]
                               + isa.build_arch_flags().split())
    return str(isa) if _loaded[name] else None


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
    """Where kernels are built and cached: $CPUMESH_KERNEL_CACHE, else
    ~/.cache/cpumesh/kernels."""
    return Path(os.environ.get("CPUMESH_KERNEL_CACHE", "~/.cache/cpumesh/kernels")).expanduser()


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
