"""A step's text: one DetokenizeBatch (and one Decode for logprob texts) for the whole batch,
then each sequence's chunk streamed (the engine runs it while the shards compute the next step).

A stop string matched now, or a stop decided at a token, makes the chunk the sequence's last
(`end`); a tokenizer failure fails this step's sequences (`fail`), others go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from router_svc.sequence import Chunk, SeqStatus, Sequence
from router_svc.tokenizer_client import TokenizerClient
from services.errors import CpumeshError


async def stream_text(tokenizer: TokenizerClient, seqs: list[Sequence], timeout: float,
                      end: Callable[[Sequence, Chunk], None],
                      fail: Callable[[Sequence, CpumeshError], None]) -> None:
    seqs = [s for s in seqs if s.status is not SeqStatus.FINISHED]
    items = [s.detok_item() for s in seqs]
    try:
        results, texts = await asyncio.gather(
            tokenizer.detokenize([i for i in items if i is not None], timeout),
            tokenizer.token_texts([t for s in seqs for t in s.logprob_token_ids()], timeout))
    except CpumeshError as e:  # the tokenizer failed: these requests fail, others go on
        for s in seqs:
            fail(s, e)
        return
    by_seq = {r.seq_id: r for r in results}
    for s in seqs:
        if s.status is not SeqStatus.FINISHED:  # not cancelled while the tokenizer answered
            chunk = s.apply_detok(by_seq.get(s.seq_id), texts)
            if s.finish is None:
                s.push(chunk)
            else:  # a stop string matched now, or a stop decided at a token: the last chunk
                end(s, chunk)
