"""Which precision may `make serve` default to: greedy output of each dtype against float32's.

    python -m bench.greedy_agreement [--tokens 24] [--threads 2] [--out FILE]

The SmolLM2 test prompts (tests/unit/test_smollm2.py), decoded greedily by the shard's own code
(tp 1) in float32, bfloat16 and float16 from the embedded model: per prompt, whether the text
equals float32's and where it first differs; and the share of tokens equal up to that point.
The issue's rule (decode-speed issue): `make serve` defaults to the fastest dtype whose greedy
output still matches the float32 path on the test prompts. Writes
bench/results/greedy_agreement.json and prints Markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

RESULTS = Path("bench/results/greedy_agreement.json")
DTYPES = ("float32", "bfloat16", "float16")


def greedy(model_dir: Path, dtype: str, prompts: list[list[int]], tokens: int
           ) -> list[list[int]]:
    from model_formats.checkpoint import load_model_config
    from shard_svc.mesh.communicator import SingleRank
    from shard_svc.model import ShardModel, make_batch
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights

    config = load_model_config(model_dir)
    plan = plan_shard(config, 0, 1)
    weights = load_shard_weights(model_dir, config, plan, getattr(torch, dtype))
    model = ShardModel(config, plan, weights, SingleRank())
    cache = model.new_cache(capacity_tokens=1024)
    steps: list[tuple[int, list[int]]] = list(enumerate(prompts))
    for i, _ in steps:
        cache.add(i)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(tokens):
        best = model.local_logits(model.forward(make_batch(steps, cache), cache)).argmax(-1)
        steps = [(i, [int(t)]) for i, t in enumerate(best)]
        for i, t in steps:
            out[i].append(t[0])
    return out


def measure(tokens: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from model_formats.embedded import default_model_dir
    from tests.unit.test_smollm2 import PROMPTS

    model_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(p).input_ids for p in PROMPTS]
    outputs = {d: greedy(model_dir, d, prompts, tokens) for d in DTYPES}
    rows = []
    for dtype in DTYPES[1:]:
        first = [next((j for j, (a, b) in enumerate(zip(o, r, strict=True)) if a != b), None)
                 for o, r in zip(outputs[dtype], outputs["float32"], strict=True)]
        rows.append({"dtype": dtype, "first_difference": first,
                     "equal_prompts": sum(f is None for f in first),
                     "equal_tokens": sum(tokens if f is None else f for f in first)})
    return {"model": "SmolLM2-135M-Instruct", "prompts": PROMPTS, "tokens": tokens,
            "threads": torch.get_num_threads(), "rows": rows}


def section(result: dict[str, Any]) -> list[str]:
    n, t = len(result["prompts"]), result["tokens"]
    out = ["## Greedy output by precision: the `make serve` default (the decode-speed issue)", "",
           f"`python -m bench.greedy_agreement`: {result['model']}, its {n} test prompts "
           f"(tests/unit/test_smollm2.py), {t} greedy tokens each, the shard's code at tp 1, "
           "each dtype against float32. *Tokens before the first difference*: of "
           f"{n * t}.", "",
           "| dtype | prompts equal to float32 | first difference (token index, per prompt) "
           "| tokens before the first difference |", "|---|---|---|---|"]
    for r in result["rows"]:
        first = ", ".join("-" if f is None else str(f) for f in r["first_difference"])
        out.append(f"| {r['dtype']} | {r['equal_prompts']} / {n} | {first} | "
                   f"{r['equal_tokens']} / {n * t} ({r['equal_tokens'] / (n * t):.0%}) |")
    matching = [r["dtype"] for r in result["rows"] if r["equal_prompts"] == n]
    out += ["", "Default of `make serve`: " + (
        f"{matching[0]} (its greedy output equals float32's on every test prompt)." if matching
        else "float32: no half precision keeps float32's greedy output on every test prompt "
        "(the rule of the decode-speed issue), though bfloat16 decodes faster (the sections "
        "above); `make serve SERVE_ARGS=\"--dtype bfloat16\"` trades that exactness for "
        "speed."), ""]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = measure(a.tokens)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(section(result)))


if __name__ == "__main__":
    main()
