"""Decode attention read in place from the KV cache: a C++ kernel (shard_svc/csrc/
decode_attention.cpp), built at shard start for the vector ISA inductor compiles for, and
registered as the op `cpumesh_kernels::decode_attention`, which compiled decode graphs and
eager decode steps (`ShardModel.slot_decode`) call over a float KV cache.

Why: a compiled step used to gather each row's history out of the paged cache (a copy of K and
V per layer) and hand the copy to scaled_dot_product_attention, whose CPU kernel is slow for
one query token (its matrix products have G = Hq / Hkv rows). Measured on SmolLM2's shapes
(30 layers, 3 KV heads x 3 query heads, D = 64, bfloat16, 2 threads, AMD EPYC with AVX-512):
at 4096 tokens of context the gather + SDPA took 36.8 ms a step, SDPA on views of the cache
17.5, this kernel 4.4 (~21 GB/s of K and V); at 128 tokens 1.7 / 1.0 / 0.3 ms.

`load()` builds once per ISA (torch.utils.cpp_extension with ninja, cached under
~/.cache/cpumesh/kernels or $CPUMESH_KERNEL_CACHE: ~30 s on 2 cores the first time, then a
load; processes that start together take turns, see `_exclusive`) and returns
None, logged with why, where it cannot: no vectorizing ISA, no compiler, head_dim not a
supported multiple of the vector width. The caller then keeps SDPA (over a gathered history
in a compiled graph). `python -m shard_svc.decode_attention` (`make kernels`) builds it ahead.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("cpumesh.shard")
SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
OP = "cpumesh_kernels::decode_attention"
BUILD_WAIT_S = 600.0  # for another process's build of the same kernel
_loaded: dict[str, bool] = {}  # the extension's name: whether it loaded


VECTORS = (1, 2, 4, 5, 6, 8, 10, 12, 16)  # head sizes compiled, in vectors (kVectors in C++)


def supports(head_dim: int, vector_width: int) -> bool:
    """Whether the kernel is compiled for this head size on an ISA of `vector_width` floats."""
    return head_dim % vector_width == 0 and head_dim // vector_width in VECTORS


def load(head_dim: int | None = None) -> str | None:
    """Build (once) and load the kernel for this CPU; return the ISA it was built for, or None
    (logged) when it cannot run here (or not for `head_dim`)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    if not isa:
        log.warning("decode attention: no vector ISA inductor compiles for; gather + SDPA")
        return None
    if head_dim is not None and not supports(head_dim, isa.nelements()):
        log.warning("decode attention: head_dim %d is not %s vectors of %d floats (%s); "
                    "gather + SDPA", head_dim, VECTORS, isa.nelements(), isa)
        return None
    name = "cpumesh_decode_attention_" + str(isa).replace(" ", "_")
    if name not in _loaded:
        _loaded[name] = _build(name, [f"-D{m}" for m in isa.build_macro()]
                               + isa.build_arch_flags().split())
    return str(isa) if _loaded[name] else None


def _build(name: str, flags: list[str]) -> bool:
    from torch.utils import cpp_extension

    t0 = time.monotonic()
    directory = build_root() / name
    try:
        _ninja_on_path()
        directory.mkdir(parents=True, exist_ok=True)
        with _exclusive(directory / "cpumesh.lock", BUILD_WAIT_S):
            (directory / "lock").unlink(missing_ok=True)  # torch's, left by a killed builder
            source = directory / SOURCE.name  # one path for every checkout: rebuilt on change only
            if not source.exists() or source.read_bytes() != SOURCE.read_bytes():
                source.write_bytes(SOURCE.read_bytes())
            cpp_extension.load(name, [str(source)], extra_cflags=["-O3", "-fopenmp", *flags],
                               extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP's
                               build_directory=str(directory), is_python_module=False,
                               verbose=False)
    except Exception as e:  # no compiler, no ninja, a build error: the caller falls back
        errors = [line for line in str(e).splitlines() if "error" in line.lower()]
        log.warning("decode attention: building %s failed (%s); gather + SDPA", name,
                    " | ".join(errors[:3]) or f"{type(e).__name__}: {e}")
        return False
    _register_fake()
    log.info("decode attention: C++ kernel %s ready in %.1f s (%s)", name,
             time.monotonic() - t0, directory)
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


def _register_fake() -> None:
    if getattr(_register_fake, "done", False):
        return

    @torch.library.register_fake(OP)
    def _(q: Tensor, k: Tensor, v: Tensor, index: Tensor, lengths: Tensor,
          scale: float) -> Tensor:
        return q.new_empty(q.shape)

    _register_fake.done = True  # type: ignore[attr-defined]


def kernel(head_dim: int) -> Callable[..., Tensor] | None:
    """`decode_attention` where the kernel builds for this head size here, else None."""
    return decode_attention if load(head_dim) else None


def decode_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, lengths: Tensor,
                     scale: float) -> Tensor:
    """q [B, Hkv, G, D]; k, v [Hkv, slots, D] (a layer's cache); index int64 [B, L]: row b's
    history at slots index[b, :lengths[b]]; returns [B, Hkv, G, D] in q's dtype."""
    return torch.ops.cpumesh_kernels.decode_attention(q, k, v, index, lengths, scale)


if __name__ == "__main__":  # `make kernels`: build before shards start (they would wait for it)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = load()
    print(f"decode attention: {'C++ kernel for ' + built if built else 'SDPA (see above)'}")
