"""llama.cpp's prefill and decode through llama-cpp-python's low-level API, for the peer rows.

    build/bench-venv/bin/python bench/llamacpp_peer.py --gguf FILE --batch 8 --prompt 32 \
        --tokens 32 --threads 2 --repeats 3

Runs in the bench environment (no torch, no cpumesh imports) and prints one JSON object:
per repeat, the prefill time of `batch` prompts of `prompt` token ids (100, 101, ...; one
llama_decode, logits of each sequence's last token only) and the median decode step of
`batch` sequences, one token each, greedy (argmax), like cpumesh's benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import llama_cpp as L
import numpy as np


def clear(ctx: object) -> None:
    if hasattr(L, "llama_memory_clear"):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
    else:  # older llama.cpp
        L.llama_kv_self_clear(ctx)


def fill(batch: object, rows: list[tuple[int, int, int, bool]]) -> None:
    """rows: (token, position, seq_id, want logits)."""
    batch.n_tokens = len(rows)  # type: ignore[attr-defined]
    for i, (tok, pos, seq, want) in enumerate(rows):
        batch.token[i] = tok  # type: ignore[attr-defined]
        batch.pos[i] = pos  # type: ignore[attr-defined]
        batch.n_seq_id[i] = 1  # type: ignore[attr-defined]
        batch.seq_id[i][0] = seq  # type: ignore[attr-defined]
        batch.logits[i] = want  # type: ignore[attr-defined]


def argmax(ctx: object, index: int, n_vocab: int) -> int:
    ptr = L.llama_get_logits_ith(ctx, index)
    return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-extra-bufts", action="store_true",
                   help="no AMX / repacked weight buffers (use_extra_bufts = false)")
    a = p.parse_args()
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    if a.no_extra_bufts:  # llama.cpp's AMX repack of quantized weights crashed here (SIGSEGV)
        mparams.use_extra_bufts = False
    model = L.llama_model_load_from_file(a.gguf.encode(), mparams)
    if not model:
        sys.exit(f"llama.cpp could not load {a.gguf}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    cparams = L.llama_context_default_params()
    cparams.n_ctx = a.batch * (a.prompt + a.tokens + 16)
    cparams.n_batch = cparams.n_ubatch = max(512, a.batch * a.prompt)
    cparams.n_seq_max = a.batch
    cparams.n_threads = cparams.n_threads_batch = a.threads
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        sys.exit("llama.cpp could not create a context")
    batch = L.llama_batch_init(max(cparams.n_batch, a.batch), 0, a.batch)
    prompt = list(range(100, 100 + a.prompt))
    prefill_ms, decode_ms = [], []
    for r in range(a.repeats + 1):  # the first pass warms up and is not reported
        clear(ctx)
        fill(batch, [(t, i, s, i == a.prompt - 1) for s in range(a.batch)
                     for i, t in enumerate(prompt)])
        t0 = time.perf_counter()
        if L.llama_decode(ctx, batch) != 0:
            sys.exit("llama_decode failed (prefill)")
        tokens = [argmax(ctx, (s + 1) * a.prompt - 1, n_vocab) for s in range(a.batch)]
        t_prefill = time.perf_counter() - t0
        steps = []
        for k in range(a.tokens - 1):
            fill(batch, [(tokens[s], a.prompt + k, s, True) for s in range(a.batch)])
            t0 = time.perf_counter()
            if L.llama_decode(ctx, batch) != 0:
                sys.exit("llama_decode failed (decode)")
            tokens = [argmax(ctx, s, n_vocab) for s in range(a.batch)]
            steps.append(time.perf_counter() - t0)
        if r:
            prefill_ms.append(t_prefill * 1e3)
            decode_ms.append(statistics.median(steps) * 1e3)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    print(json.dumps({"prefill_ms": prefill_ms, "decode_step_ms": decode_ms,
                      "version": L.__version__}))


if __name__ == "__main__":
    main()
