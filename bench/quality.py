"""Quantized quality: teacher-forced top-1 agreement with float32 and perplexity, SmolLM2.

    python -m bench.quality [--tokens 1000] [--threads 2]

On the public-domain English of tests/data/english.txt, each variant reads the same token ids in
one prefill (the shard's own code at tp 1, every position's logits) and is compared with
float32:
  int8 (from float), int4 g64 (from float), int4 of the embedded Q4_1 GGUF's own blocks (g32),
  and bfloat16 for scale. The float32 reference is the embedded model expanded to float32 (its
  weights are themselves the Q4_1 file's, so int4 from its blocks is the same weights in bf16,
  and re-quantizing them at g64 rounds a 4-bit grid again: a harder case than a float model).
Targets (issue 17): int8 >= 98 % top-1 and perplexity within 1 %; int4 >= 90 %, within 5 %.
Writes bench/results/quality.json and prints Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "english.txt"
RESULTS = Path("bench/results/quality.json")
TARGETS = {"int8": (0.98, 0.01), "int4": (0.90, 0.05)}


def english_ids(model_dir: Path, tokens: int) -> list[int]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(TEXT.read_text()).ids
    return ids[:tokens + 1]


@torch.inference_mode()
def teacher_forced(model_dir: Path, dtype: torch.dtype, ids: list[int],
                   kernels: str = "auto") -> tuple[list[int], list[float]]:
    """Top-1 and the target's negative log-likelihood after each of ids[:-1]: one prefill of
    them all whose every position's hidden state goes through the LM head (the step keeps
    only the last; `last` names them all)."""
    from model_formats.checkpoint import load_model_config
    from shard_svc.kernels import choose_kernels
    from shard_svc.mesh.communicator import SingleRank
    from shard_svc.model import ShardModel, make_batch
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights

    config = load_model_config(model_dir)
    plan = plan_shard(config, 0, 1)
    weights = load_shard_weights(model_dir, config, plan, dtype)
    model = ShardModel(config, plan, weights, SingleRank(),
                       choose_kernels(kernels, weights.embed.dtype,
                                      [x.gate_up for x in weights.layers]))
    cache = model.new_cache(len(ids) + 16, 16)
    batch = make_batch([(0, ids[:-1])], cache)  # one prefill, every position's logits kept:
    batch = dataclasses.replace(batch, last=torch.arange(len(ids) - 1))
    logp = torch.log_softmax(model.local_logits(model.forward(batch, cache)).float(), dim=-1)
    top = logp.argmax(-1).tolist()
    nll = (-logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1))).squeeze(1).tolist()
    return top, nll


def compare(ref: tuple[list[int], list[float]], ours: tuple[list[int], list[float]]
            ) -> dict[str, float]:
    agree = sum(a == b for a, b in zip(ref[0], ours[0], strict=True)) / len(ref[0])
    ppl_ref, ppl = (math.exp(sum(n) / len(n)) for n in (ref[1], ours[1]))
    return {"top1": agree, "ppl": ppl, "ppl_ref": ppl_ref, "ppl_ratio": ppl / ppl_ref}


def measure(tokens: int) -> dict[str, Any]:
    from model_formats.embedded import default_cache_dir, default_model_dir, embedded_gguf_path
    from model_formats.gguf.link import linked_model_dir
    from shard_svc.quant import INT4

    float_dir = default_model_dir()
    linked = linked_model_dir(embedded_gguf_path(), default_cache_dir())
    ids = english_ids(float_dir, tokens)
    ref = teacher_forced(float_dir, torch.float32, ids)
    rows = []
    for label, kind, model_dir, dtype in (
            ("bfloat16", "bf16", float_dir, torch.bfloat16),
            ("int8 (per row, from float)", "int8", float_dir, torch.int8),
            ("int4 g32 (from float)", "int4", float_dir, INT4),
            ("int4 g32 (the Q4_1 GGUF's own blocks)", "int4", linked, INT4),
            ("int8 (the Q4_1 GGUF, per row)", "int8", linked, torch.int8)):
        rows.append({"variant": label, "kind": kind,
                     **compare(ref, teacher_forced(model_dir, dtype, ids))})
        print(json.dumps(rows[-1]), flush=True)
    # What the bf16 activations cost: int8 weights with float32 activations (no fast kernel)
    import shard_svc.weights

    shard_svc.weights.activations_dtype = lambda: torch.float32
    rows.append({"variant": "int8 (from float), float32 activations: not served, for scale",
                 "kind": "diagnostic", **compare(ref, teacher_forced(float_dir, torch.int8, ids))})
    print(json.dumps(rows[-1]), flush=True)
    return {"model": "SmolLM2-135M-Instruct", "tokens": len(ids) - 1, "text": TEXT.name,
            "threads": torch.get_num_threads(), "rows": rows}


def section(result: dict[str, Any], command: str) -> list[str]:
    out = ["## Quantized quality (issue 17)", "",
           f"`{command}`: {result['model']}, {result['tokens']} teacher-forced tokens of "
           f"tests/data/{result['text']} (public-domain English), each variant against float32 "
           f"(perplexity {result['rows'][0]['ppl_ref']:.2f}). The float32 reference is the "
           "embedded Q4_1 file expanded, so its int4 blocks are the reference's own weights.", "",
           "| variant | top-1 = float32 | perplexity | ratio | target |",
           "|---|---|---|---|---|"]
    for r in result["rows"]:
        target = TARGETS.get(r["kind"])
        verdict = ""
        if target:
            ok = r["top1"] >= target[0] and r["ppl_ratio"] <= 1 + target[1]
            verdict = (f"{'PASS' if ok else 'MISS'} (>= {target[0]:.0%}, within "
                       f"{target[1]:.0%})")
        out.append(f"| {r['variant']} | {r['top1']:.1%} | {r['ppl']:.2f} | "
                   f"{r['ppl_ratio']:.3f} | {verdict} |")
    return [*out, ""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = measure(a.tokens)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(section(result, "python -m bench.quality")))


if __name__ == "__main__":
    main()
