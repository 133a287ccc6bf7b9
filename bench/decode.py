"""Decode speed of cpumesh at tp 1 against transformers' generate, same weights, same run.

    python -m bench.decode [--model-dir DIR] [--threads 2] [--tokens 64] [--repeats 3]

Without --model-dir it uses the embedded SmolLM2-135M-Instruct (converted once). Prints a table and
writes bench/results/decode.json. Decode time per token excludes the prefill in both systems.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

PROMPT_LEN = 32


def cpumesh_decode_ms(model_dir: Path, tokens: int, dtype: torch.dtype) -> list[float]:
    from model_formats.checkpoint import load_model_config
    from shard_svc.engine import SeqWork, ShardEngine
    from shard_svc.mesh.communicator import SingleRank
    from shard_svc.model import ShardModel
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights

    config = load_model_config(model_dir)
    plan = plan_shard(config, 0, 1)
    weights = load_shard_weights(model_dir, config, plan, dtype)
    model = ShardModel(config, plan, weights, SingleRank())
    engine = ShardEngine(model, model.new_cache(PROMPT_LEN + tokens + 16))
    prompt = tuple(range(100, 100 + PROMPT_LEN))
    out = engine.step(engine.next_step_id, [SeqWork(1, prompt, True)])
    token = out.results[0].token_ids[0]
    times = []
    for _ in range(tokens - 1):
        t0 = time.perf_counter()
        out = engine.step(engine.next_step_id, [SeqWork(1, (token,), False)])
        times.append((time.perf_counter() - t0) * 1e3)
        token = out.results[0].token_ids[0]
    return times


def transformers_decode_ms(model_dir: Path, tokens: int, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    ids = torch.arange(100, 100 + PROMPT_LEN).unsqueeze(0)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)
        return time.perf_counter() - t0

    run(2)  # warm-up
    # generate(n) = prefill + first token + (n - 1) decode steps: the difference isolates decode.
    return (run(tokens) - run(1)) / (tokens - 1) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", type=Path, default=Path("bench/results/decode.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model_dir = args.model_dir
    if model_dir is None:
        from model_formats.embedded import default_model_dir
        model_dir = default_model_dir()

    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(statistics.median(cpumesh_decode_ms(model_dir, args.tokens, dtype)))
        theirs.append(transformers_decode_ms(model_dir, args.tokens, dtype))
    result = {
        "model_dir": str(model_dir), "threads": args.threads, "dtype": args.dtype,
        "tokens": args.tokens, "prompt_len": PROMPT_LEN, "machine": platform.processor()
        or platform.machine(), "torch": torch.__version__,
        "cpumesh_tp1_ms_per_token": ours, "transformers_ms_per_token": theirs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    med_o, med_t = statistics.median(ours), statistics.median(theirs)
    print(f"decode, batch 1, {args.dtype}, {args.threads} threads, {args.tokens} tokens, "
          f"median of {args.repeats} (min–max)")
    print(f"{'system':<22}{'ms/token':>10}{'min':>8}{'max':>8}")
    print(f"{'cpumesh tp1':<22}{med_o:>10.1f}{min(ours):>8.1f}{max(ours):>8.1f}")
    print(f"{'transformers generate':<22}{med_t:>10.1f}{min(theirs):>8.1f}{max(theirs):>8.1f}")
    print(f"ratio transformers / cpumesh: {med_t / med_o:.2f}× (>1: cpumesh faster)")


if __name__ == "__main__":
    main()
