"""A SmolLM2 cluster whose KV cache holds 96 tokens (6 pages), less than its batch needs,
at tp 1 and tp 2, with the shards' prefix cache on: greedy output equals transformers' (which
caches nothing) for requests run alone (sharing a system prompt, so reusing its blocks), run
together (so that sequences are preempted and recomputed, two longer ones cancelled meanwhile);
KV is all free on every shard after the requests end or are cancelled. And a cache of 15 pages
in which requests sharing a system prompt run together only because the router counts the
shared pages once, as the shards hold them.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.router_cluster import Cluster, complete, until_kv_free
from tests.procs import free_ports

pytestmark = pytest.mark.asyncio
KV_TINY = 96
NEW_TOKENS = 24
SYSTEM = ("You are a careful assistant for a small town library. Answer every question briefly, "
          "in plain words, and never invent facts. ")  # 26 tokens; with a question 34
QUESTIONS = ["Question: what is a book? Answer:", "Question: why do people read? Answer:",
             "Question: where is the library? Answer:", "Question: how do I borrow? Answer:"]
PROMPTS = [SYSTEM + q for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> list[list[int]]:
    """transformers' greedy ids, NEW_TOKENS of them whatever they are (EOS included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as ignore_eos: EOS is a token like any other
    ids = torch.tensor([tok(p).input_ids for p in PROMPTS])  # all 34 tokens: one batch
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return gen[:, ids.shape[1]:].tolist()


@pytest.fixture(params=[1, 2], ids=["tp1", "tp2"])
def tiny(request: pytest.FixtureRequest, smollm2_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    (http,) = free_ports(1)
    c = Cluster(smollm2_dir, request.param, tmp_path_factory.mktemp("kv-tiny"), kv=KV_TINY,
                router_args=("--http-listen", f"127.0.0.1:{http}")).start()
    try:
        yield c, f"http://127.0.0.1:{http}/metrics"
    finally:
        c.stop()


def metric(url: str, name: str) -> float:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    match = re.search(rf"^{name} (\S+)$", body, re.MULTILINE)
    assert match, name
    return float(match[1])


async def test_greedy_output_survives_preemption_and_prefix_reuse(
        tiny: tuple[Cluster, str], reference: list[list[int]]) -> None:
    c, metrics = tiny
    params = dict(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for prompt, ids in zip(PROMPTS, reference, strict=True):  # alone: the system prompt reused
        assert (await complete(c, prompt, **params)).token_ids == ids  # type: ignore[arg-type]
    await until_kv_free(c)
    assert metric(metrics, "cpumesh_prefix_cache_hit_tokens_total") >= 3 * 16
    assert metric(metrics, "cpumesh_preemptions_total") == 0
    # Together, beside two longer ones cancelled mid-stream. Two different prompts take 5 pages
    # to start and 7 to end (their first page shared), so any two that run at once cannot both
    # grow and the newer is preempted; a longer one (94 tokens: the whole cache) cannot grow
    # beside anything. The long ones are cancelled once a preemption is seen, not at a set
    # time: cancelled earlier they could free the pages the preemption needs.
    long = dict(params, max_new_tokens=60)
    tasks = [asyncio.ensure_future(complete(c, p, **kw))  # type: ignore[arg-type]
             for p, kw in [*((p, params) for p in PROMPTS), *((p, long) for p in PROMPTS[:2])]]
    async with asyncio.timeout(60):
        while metric(metrics, "cpumesh_preemptions_total") == 0:
            await asyncio.sleep(0.05)
    assert not any(t.done() for t in tasks[4:])
    for t in tasks[4:]:
        t.cancel()
    together = await asyncio.gather(*tasks[:4])
    assert [t.token_ids for t in together] == reference
    await until_kv_free(c, timeout=10)



LIBRARY = SYSTEM + ("Our library opens at nine and closes at six, lends books for three weeks, "
                    "and keeps a reading room with quiet desks for study. ")  # 54 tokens shared
SHARED_PROMPTS = [LIBRARY + q for q in QUESTIONS]  # 61 tokens: its first 3 blocks shared
SHARED_NEW = 35  # to 95 tokens in the cache: 6 pages, 3 of them shared


def step_batches(url: str) -> tuple[float, float]:
    """(steps of at most 2 sequences, steps of at most 4), from the batch-size histogram."""
    return (metric(url, r'cpumesh_step_batch_size_bucket\{le="2\.0"\}'),
            metric(url, r'cpumesh_step_batch_size_bucket\{le="4\.0"\}'))


async def test_requests_sharing_a_prefix_run_together_where_unshared_counting_preempts(
        smollm2_dir: Path, tmp_path: Path) -> None:
    """15 pages of KV, tp 2: four requests of 6 pages each at their end, 3 of them a shared
    system prompt. Counted unshared they need 24 pages: the fourth would wait and the third be
    preempted when they grow. The router counts the shared pages once, as the shards hold them
    (3 + 4 x 3 = 15 pages), so all four run together and none is preempted; the output equals
    each prompt's alone, and every page is free at the end."""
    (http,) = free_ports(1)
    c = Cluster(smollm2_dir, 2, tmp_path, kv=240,
                router_args=("--http-listen", f"127.0.0.1:{http}")).start()
    metrics = f"http://127.0.0.1:{http}/metrics"
    params = dict(max_new_tokens=SHARED_NEW, temperature=0, ignore_eos=True)
    try:
        alone = [await complete(c, p, **params)  # type: ignore[arg-type]
                 for p in SHARED_PROMPTS]  # the shared blocks stay cached after they end
        assert [a.usage.prompt_tokens for a in alone] == [61] * 4
        await until_kv_free(c)
        assert step_batches(metrics)[0] == metric(metrics, "cpumesh_step_batch_size_count")
        together = await asyncio.gather(*(complete(c, p, **params)  # type: ignore[arg-type]
                                          for p in SHARED_PROMPTS))
        assert [t.token_ids for t in together] == [a.token_ids for a in alone]
        small, up_to_4 = step_batches(metrics)
        assert up_to_4 > small, "no step ran 3 or 4 of the requests at once"
        assert metric(metrics, "cpumesh_preemptions_total") == 0
        assert metric(metrics, "cpumesh_prefix_cache_hit_tokens_total") >= 7 * 48
        await until_kv_free(c, timeout=10)
    finally:
        c.stop()
