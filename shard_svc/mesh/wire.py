"""The mesh's wire format: one fixed header frame, then a payload frame (tensor bytes or JSON).

Every message is two ZeroMQ frames: a 32-byte header and a payload. DATA payloads are raw tensor
memory (sent and received without copies in Python); control payloads are small JSON objects.
The header carries the formation id (which mesh incarnation), the collective's sequence number
and the step inside it, so a late message from an aborted collective or an earlier formation is
recognised and dropped, never summed.
"""

from __future__ import annotations

import hashlib
import json
import struct
from enum import IntEnum
from typing import Any, NamedTuple

import torch

HEADER = struct.Struct("<BBHHBxQQQQ")  # see Header
WIRE_VERSION = 2  # 2: HELLO offers a tcp data listener; Algo.SCATTER


class Kind(IntEnum):
    HELLO = 1  # handshake: who I am, and whose hello I accept (JSON)
    READY = 2  # handshake done on the sender's side (JSON, empty)
    DATA = 3  # a partial, an accumulator or a final chunk (tensor bytes)
    ABORT = 4  # the sender saw a collective fail (JSON: failed peer and reason)
    BYE = 5  # the sender is closing the mesh (JSON, empty)
    REFUSE = 6  # the sender refused a HELLO (JSON: the refused nonce and why)


DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class Algo(IntEnum):
    NONE = 0
    DIRECT = 1  # every rank sends its partial to every other
    RING = 2  # reduce-scatter then all-gather around the ring
    SCATTER = 3  # reduce-scatter then all-gather, each one direct exchange


class Header(NamedTuple):
    kind: int  # Kind
    dtype: int  # DTYPE_CODES of the tensor being reduced
    sender: int  # tp_rank
    step: int  # message index within the collective
    algo: int  # Algo
    formation: int  # formation id (0 in HELLO)
    seq: int  # collective sequence number within the formation
    numel: int  # elements of the whole tensor being reduced
    nbytes: int  # bytes of the payload frame (DATA)

    def pack(self) -> bytes:
        return HEADER.pack(*self)

    @staticmethod
    def unpack(raw: bytes) -> Header | None:
        """The header, or None when `raw` is not one of ours."""
        if len(raw) != HEADER.size:
            return None
        header = Header._make(HEADER.unpack(raw))
        return header if header.kind in KINDS else None


KINDS = frozenset(int(k) for k in Kind)


def data_header(dtype: torch.dtype, sender: int, step: int, algo: Algo, formation: int, seq: int,
                numel: int, nbytes: int) -> bytes:
    """The header of DATA message `step` of collective `seq` from `sender`: `nbytes` of a
    `numel`-element `dtype` tensor."""
    return HEADER.pack(Kind.DATA, DTYPE_CODES[dtype], sender, step, algo, formation, seq, numel,
                       nbytes)


def control(kind: Kind, sender: int, formation: int = 0, seq: int = 0,
            **body: Any) -> list[bytes]:
    """A control message: header + JSON body."""
    return [Header(kind, 0, sender, 0, 0, formation, seq, 0, 0).pack(), json.dumps(body).encode()]


def parse_body(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def chunk_bounds(numel: int, parts: int) -> list[int]:
    """Contiguous, nearly equal ranges: chunk c is [bounds[c], bounds[c + 1])."""
    return [c * numel // parts for c in range(parts + 1)]


def formation_id(nonces: list[str]) -> int:
    """The id all ranks derive from every rank's nonce (in rank order): 64 bits of a hash."""
    digest = hashlib.sha256("/".join(nonces).encode()).digest()
    return int.from_bytes(digest[:8], "little")
