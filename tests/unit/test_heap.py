"""shard_svc.heap: memory freed at the top of a thread's malloc arena goes back to the system
when the shard settles (glibc's malloc_trim leaves it resident)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from shard_svc import heap

CHILD = """
import ctypes, json, os, threading
from shard_svc import heap

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
asked, done = os.pipe(), os.pipe()  # (a lock's wait would malloc in the step thread's arena)
out = {}


def rss_mib():  # read on the main thread: its buffers are not in the step thread's arena
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("RssAnon")) / 1024


def step_thread():
    libc.free(libc.malloc(16 << 20))  # a mapped block freed: glibc's thresholds rise past it
    blocks = [libc.malloc(2 << 20) for _ in range(12)]  # so these come from this thread's arena
    for b in blocks:
        libc.memset(b, 1, 2 << 20)
    os.write(done[1], b"x"); os.read(asked[0], 1)
    for b in reversed(blocks):
        libc.free(b)  # into the arena's top, under the raised trim threshold
    heap.release_freed_memory()
    os.write(done[1], b"x"); os.read(asked[0], 1)
    out["settled"] = heap.settle()
    os.write(done[1], b"x")


t = threading.Thread(target=step_thread)
t.start()
for phase in ("touched", "released", "after"):
    os.read(done[0], 1)
    out[phase] = rss_mib()
    os.write(asked[1], b"x")
t.join()
print(json.dumps(out))
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not sys.platform.startswith(
    "linux"), reason="heap.settle asks glibc's malloc; elsewhere it does nothing (tested below)")


@glibc
def test_settle_hands_back_the_top_of_the_step_threads_arena() -> None:
    """24 MiB freed at the top of a thread's arena: still resident after malloc_trim (glibc
    2.36 trims no thread arena's top), handed back by settle on that thread."""
    out = json.loads(subprocess.run([sys.executable, "-c", CHILD], capture_output=True,
                                    text=True, timeout=120, check=True).stdout)
    assert out["settled"] is True
    assert out["after"] <= out["touched"] - 20, out  # 24 MiB were freed, and are back
    if out["released"] > out["touched"] - 4:  # glibc 2.36 (CI's): malloc_trim left the top
        assert out["after"] <= out["released"] - 20, out  # so settle handed it back


def test_settle_without_glibc_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_libc", lambda: None)
    assert heap.settle() is False
    heap.release_freed_memory()  # no error either
