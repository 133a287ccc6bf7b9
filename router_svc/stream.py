"""A request's stream of chunks, as `Engine.submit` returns it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router_svc.sequence import Chunk, Sequence

if TYPE_CHECKING:
    from router_svc.engine import Engine


class Stream:
    """A request's chunks, in order; ends after the chunk that carries the finish."""

    def __init__(self, engine: Engine, seq: Sequence) -> None:
        self.engine, self.seq, self.request_id = engine, seq, seq.request_id
        self._ended = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Chunk:
        if self._ended:
            raise StopAsyncIteration
        chunk = await self.seq.queue.get()
        self._ended = chunk.finish is not None
        return chunk

    def close(self) -> None:
        """Cancel the request unless it has ended; its KV is released within one step."""
        self.engine.cancel(self.seq)
