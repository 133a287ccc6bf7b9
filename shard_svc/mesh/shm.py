"""Shared-memory data path for ranks on one host: no socket, no kernel, a few microseconds.

Each rank owns one segment (a file `<mesh>-<rank>-<pid>-<nonce>` in `shm_dir`, mapped by every
rank of the mesh and unlinked as soon as all have mapped it; one left by a process killed while
forming is removed by the next rank that forms a mesh of that name):

    bytes 0..7     published: seq + 1 of the last collective whose partial is in the slot
    bytes 64..71   reduced:   seq + 1 of the last collective whose reduced chunk is in the slot
    bytes 128..    metadata of slot 0 and slot 1 (numel, dtype code, algorithm)
    bytes 256..    slot 0, slot 1 (`shm_slot_bytes` each), used by alternate collectives

A rank writes only its own segment, with the data before the counter (x86-64 stores are seen in
program order, which is why `auto` only picks this path there), and reads the others'. Two slots
make a wait for readers unnecessary: a peer can only be publishing collective seq+2 into the slot
of seq once every rank, us included, has published seq+1, i.e. finished reading seq.

direct: every rank sums all slots in rank order. ring (reduce-scatter + all-gather): rank r sums
chunk r of every slot in rank order, writes it back into its own slot, and every rank copies the
reduced chunks. Both give the same bits as `sum_in_rank_order`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from shard_svc.mesh.communicator import MeshError
from shard_svc.mesh.config import MeshConfig
from shard_svc.mesh.wire import DTYPE_CODES, Algo, chunk_bounds

HEADER_BYTES = 256
PUBLISHED, REDUCED, META = 0, 8, (16, 24)  # int64 word indices


def remove_orphans(shm_dir: Path, mesh_name: str) -> None:
    """Unlink segments of this mesh left by processes killed before the mesh formed (a formed
    mesh unlinks its segments at once)."""
    for path in shm_dir.glob(f"{mesh_name}-*-*-*"):
        parts = path.name[len(mesh_name) + 1:].split("-")
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


class SharedSlots:
    def __init__(self, config: MeshConfig, nonce: str) -> None:
        self.cfg = config
        self.me = config.tp_rank
        self.size = HEADER_BYTES + 2 * config.shm_slot_bytes
        remove_orphans(config.shm_dir, config.mesh_name)
        name = f"{config.mesh_name}-{self.me}-{os.getpid()}-{nonce}"
        self.path: Path | None = config.shm_dir / name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)
        self.segments: list[torch.Tensor] = []
        self.words: list[np.ndarray] = []
        self.scratch = torch.empty(0, dtype=torch.float32)

    def map_peers(self, paths: list[str | None]) -> bool:
        """Map every rank's segment (ours included); False when one cannot be mapped."""
        segments = []
        for path in paths:
            if not path:
                return False
            try:
                if os.path.getsize(path) != self.size:
                    return False
                segments.append(torch.from_file(path, shared=True, size=self.size,
                                                dtype=torch.uint8))
            except (OSError, RuntimeError):
                return False
        self.segments = segments
        self.words = [seg[:HEADER_BYTES].numpy().view(np.int64) for seg in segments]
        return True

    def unlink(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def close(self) -> None:
        self.unlink()
        self.segments, self.words = [], []

    def slot(self, rank: int, parity: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        start = HEADER_BYTES + parity * self.cfg.shm_slot_bytes
        return self.segments[rank][start:start + nbytes].view(dtype)

    def all_reduce(self, flat: torch.Tensor, seq: int, ring: bool,
                   check: Callable[[list[int]], None]) -> int:
        """Sum `flat` (1-D, contiguous) in place, in pieces of one slot; returns seqs used."""
        per_piece = self.cfg.shm_slot_bytes // flat.element_size()
        pieces = 0
        for start in range(0, max(flat.numel(), 1), per_piece):
            self._piece(flat[start:start + per_piece], seq + pieces, ring, check)
            pieces += 1
        return pieces

    def _piece(self, piece: torch.Tensor, seq: int, ring: bool,
               check: Callable[[list[int]], None]) -> None:
        n, me, parity = self.cfg.tp_size, self.me, seq % 2
        nbytes, dtype = piece.numel() * piece.element_size(), piece.dtype
        slots = [self.slot(r, parity, nbytes, dtype) for r in range(n)]
        meta = (piece.numel(), DTYPE_CODES[dtype], Algo.RING if ring else Algo.DIRECT)
        slots[me].copy_(piece)
        self.words[me][META[parity]:META[parity] + 3] = meta
        self.words[me][PUBLISHED] = seq + 1
        for r in range(n):
            if r != me:
                self._wait(r, PUBLISHED, seq + 1, check)
                peer_meta = tuple(int(x) for x in self.words[r][META[parity]:META[parity] + 3])
                if peer_meta != meta:
                    raise MeshError(f"rank {r} reduces (numel, dtype, algorithm) {peer_meta}, "
                                    f"rank {me} {meta}", r)
        if not ring:
            self._sum(slots, piece)
            return
        bounds = chunk_bounds(piece.numel(), n)
        mine = slice(bounds[me], bounds[me + 1])
        self._sum([s[mine] for s in slots], piece[mine])
        slots[me][mine].copy_(piece[mine])
        self.words[me][REDUCED] = seq + 1
        for r in range(n):
            if r != me:
                self._wait(r, REDUCED, seq + 1, check)
                piece[bounds[r]:bounds[r + 1]].copy_(slots[r][bounds[r]:bounds[r + 1]])

    def _sum(self, parts: list[torch.Tensor], out: torch.Tensor) -> None:
        """((p0 + p1) + p2) + ... into `out`; bfloat16 accumulated in float32, rounded once."""
        if out.dtype == torch.float32:
            torch.add(parts[0], parts[1], out=out)
            for p in parts[2:]:
                out += p
            return
        if self.scratch.numel() < out.numel():
            self.scratch = torch.empty(out.numel(), dtype=torch.float32)
        acc = self.scratch[:out.numel()]
        acc.copy_(parts[0])
        for p in parts[1:]:
            acc += p
        out.copy_(acc)

    def _wait(self, rank: int, word: int, target: int, check: Callable[[list[int]], None]) -> None:
        """Until rank's counter reaches target: spin, then yield, then sleep; check the peers'
        health every half millisecond and give up after recv_timeout_s."""
        counter = self.words[rank]
        if counter[word] >= target:
            return
        cfg = self.cfg
        start = last_check = time.perf_counter()
        while counter[word] < target:
            now = time.perf_counter()
            waited = now - start
            if waited < cfg.shm_spin_s:
                continue
            if now - last_check > 5e-4:
                last_check = now
                check([rank])
                if waited > cfg.recv_timeout_s:
                    what = "partial" if word == PUBLISHED else "reduced chunk"
                    raise MeshError(f"rank {self.me}: no {what} from rank {rank} within "
                                    f"{cfg.recv_timeout_s:g}s", rank)
            if waited < cfg.shm_yield_s:
                os.sched_yield()
            else:
                time.sleep(1e-4)


def stores_are_ordered() -> bool:
    """The shared-memory path relies on x86-64's in-order stores (module docstring)."""
    return platform.machine().lower() in ("x86_64", "amd64")
