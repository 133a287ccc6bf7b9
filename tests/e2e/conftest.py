"""Fixtures of the router end-to-end tests (tests/e2e/test_router_*.py).

One cluster at a time (tp 1, then tp 2), shared by all those files: it is package-scoped, so
that it starts once for them rather than once per file. pytest runs the files in name order
(bootstrap, generation, limits, shard_kill), so the shard-kill test runs last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.router_cluster import CHAT, NEW, PROMPT, Cluster


@pytest.fixture(scope="package")
def cluster_of(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Callable[[int], Cluster]]:
    """cluster_of(tp): the running cluster of that size (stopping one of another size)."""
    made: dict[int, Cluster] = {}

    def get(tp: int) -> Cluster:
        for other in [t for t in made if t != tp]:
            made.pop(other).stop()
        if tp not in made:
            made[tp] = Cluster(smollm2_dir, tp, tmp_path_factory.mktemp(f"tp{tp}")).start()
        return made[tp]

    yield get
    for c in made.values():
        c.stop()


@pytest.fixture(scope="package")
def reference(smollm2_dir: Path) -> dict[str, tuple[list[int], str]]:
    """transformers' greedy ids and text for PROMPT and CHAT (up to NEW tokens or EOS)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    chat_ids = tok.apply_chat_template([{"role": r, "content": c} for r, c in CHAT],
                                       add_generation_prompt=True, tokenize=True)
    if not isinstance(chat_ids, list):
        chat_ids = chat_ids["input_ids"]
    out = {}
    with torch.no_grad():
        for name, prompt_ids in (("prompt", tok(PROMPT).input_ids), ("chat", chat_ids)):
            ids = torch.tensor([prompt_ids])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW, eos_token_id=tok.eos_token_id)
            new = gen[0, ids.shape[1]:].tolist()
            out[name] = (new, tok.decode(new, skip_special_tokens=True))
    return out
