"""The shard's weights moved into one arena of transparent huge pages (2 MiB), so that a decode
step's stream through them is not also a stream of TLB misses, one per 4 KiB page.

A step reads every weight once; from 4 KiB pages that is a page walk every 4 KiB (SmolLM2's
134 MB of int8 codes: 33,000 a step). The same 121 int8 products over the same codes read
26.5 GB/s from torch's allocations and 29.5 GB/s from a huge-page arena (AMD EPYC, 2 threads,
interleaved in one process; 10-16 % in every run). torch allocates each matrix by itself, most
under 2 MiB, and this kernel (THP "madvise") backs none of them with huge pages.

`adopt` copies each storage the weights use into the arena, one at a time (memory grows by
TRIM_BYTES, not by the model: the arena's pages are only backed as they are written, the old
copies handed back to the system as it goes), and points the weights' tensors at it, views as
views: a tied LM head stays a slice of the embedding. Where the kernel offers no THP (not Linux,
THP "never") the weights stay where they are.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from shard_svc.heap import release_freed_memory
from shard_svc.quant import Int4Weight, Int8Weight
from shard_svc.quant_groups import Int8GroupWeight
from shard_svc.weights import LayerWeights, ShardWeights

log = logging.getLogger("cpumesh.shard")
HUGE_PAGE = 2 << 20
ALIGN = 64  # each storage starts on a cache line
TRIM_BYTES = 32 << 20  # moved between two hand-backs of the old copies (the peak's excess)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_HOLDERS = (ShardWeights, LayerWeights, Int8Weight, Int4Weight, Int8GroupWeight)


def available() -> bool:
    """Whether anonymous memory can be advised into huge pages here."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def adopt(weights: ShardWeights) -> ShardWeights:
    """`weights` (in place) with every plain tensor's storage copied into a huge-page arena;
    as they were where huge pages are not available or the weights are already there."""
    if weights.huge_pages or not available():
        return weights
    users: dict[int, list[tuple[Any, str]]] = {}  # storage address -> (holder, field)s
    for holder, name in _tensor_slots(weights):
        address = getattr(holder, name).untyped_storage().data_ptr()
        users.setdefault(address, []).append((holder, name))
    storages = {a: n for a, u in users.items()  # (an empty one stays where it is)
                if (n := getattr(*u[0]).untyped_storage().nbytes())}
    size = sum(_aligned(n) for n in storages.values())
    if size < HUGE_PAGE:
        return weights
    arena, start = _arena(size)
    offset, untrimmed = start, 0
    for address, nbytes in storages.items():  # one storage at a time, its old copy freed
        moved = torch.frombuffer(arena, dtype=torch.uint8, count=nbytes, offset=offset)
        moved.copy_(_bytes_of(getattr(*users[address][0])))
        for holder, name in users.pop(address):
            setattr(holder, name, _like(getattr(holder, name), moved))
        offset += _aligned(nbytes)
        untrimmed += nbytes
        if untrimmed >= TRIM_BYTES:  # glibc keeps what was freed in its heap until trimmed
            release_freed_memory()
            untrimmed = 0
    weights.huge_pages = True
    release_freed_memory()
    log.info("weights: %.0f MB moved into a huge-page arena (%.0f MB of it in huge pages)",
             size / 1e6, min(size, backed_bytes(_address(arena) + start)) / 1e6)
    return weights


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype), in huge pages where they are available (the KV cache:
    a long history is read as a stream too). Every page is written here, as torch.zeros does:
    the memory is held from the start, not when the cache first fills."""
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < HUGE_PAGE or not available():
        return torch.zeros(shape, dtype=dtype)
    arena, start = _arena(nbytes)
    return torch.frombuffer(arena, dtype=dtype, count=count, offset=start).view(shape).zero_()


def backed_bytes(address: int) -> int:
    """The bytes of the mapping holding `address` that the kernel backs with huge pages."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):  # a mapping's first line: "lo-hi perms ..."
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


def _tensor_slots(obj: Any) -> Iterator[tuple[Any, str]]:
    """(holder, field) of every strided CPU tensor in the weights' dataclasses."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, torch.Tensor):
            if value.layout == torch.strided and value.device.type == "cpu":
                yield obj, field.name
        elif isinstance(value, _HOLDERS):
            yield from _tensor_slots(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, _HOLDERS):
                    yield from _tensor_slots(item)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under `t`, as bytes."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def _like(t: torch.Tensor, storage_bytes: torch.Tensor) -> torch.Tensor:
    """`t`'s view (offset, sizes, strides) of its storage, on `storage_bytes` instead."""
    with torch.inference_mode(t.is_inference()):
        return torch.empty(0, dtype=t.dtype).set_(
            storage_bytes.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _arena(size: int) -> tuple[mmap.mmap, int]:
    """Private anonymous memory for `size` bytes advised into huge pages, and the offset in it
    of the first huge-page boundary, where the `size` bytes start."""
    arena = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(mmap.MADV_HUGEPAGE)
    return arena, (-_address(arena)) % HUGE_PAGE


def _address(arena: mmap.mmap) -> int:
    probe = torch.frombuffer(arena, dtype=torch.uint8, count=1)
    return probe.data_ptr()
