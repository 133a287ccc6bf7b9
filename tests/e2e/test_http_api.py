"""The router's OpenAI-compatible HTTP API and /metrics over real processes (tp 1, SmolLM2).

The official `openai` client, unchanged, against `--http-listen`: streaming and not, completions
and chat, give the same greedy text as the gRPC client; errors have OpenAI's status codes and
shape; `/metrics` parses with prometheus_client's parser and its counters move.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import Service, free_ports, wait_serving
from tests.utf8_reference import byte_level_bytes, cut_bytes, without_cut_character
from tools.client import RouterClient
from tools.loadtest import LoadConfig, run_load

pytestmark = pytest.mark.asyncio
PROMPT = "The capital of France is"
CHAT = [("user", "What is the capital of France? Answer in one sentence.")]
NEW = 12


class Cluster:
    def __init__(self, model_dir: Path, log_dir: Path, served_name: str | None = None) -> None:
        tok, router, shard, peer, http = free_ports(5)
        served = ["--served-model-name", served_name] if served_name is not None else []
        self.router_addr, self.http = f"127.0.0.1:{router}", f"http://127.0.0.1:{http}"
        self.services = [
            Service("tokenizer", ["-m", "tokenizer_svc", "--model-dir", str(model_dir),
                                  "--listen", f"127.0.0.1:{tok}"], log_dir),
            Service("shard0", ["-m", "shard_svc", "--model-dir", str(model_dir), "--tp-size", "1",
                               "--tp-rank", "0", "--peers", f"127.0.0.1:{peer}", "--listen",
                               f"127.0.0.1:{shard}", "--threads", "1", "--kv-capacity-tokens",
                               "2048", "--max-context", "1024"], log_dir),
            Service("router", ["-m", "router_svc", "--tokenizer", f"127.0.0.1:{tok}", "--shards",
                               f"127.0.0.1:{shard}", "--listen", self.router_addr,
                               "--http-listen", f"127.0.0.1:{http}", "--max-waiting", "4",
                               *served], log_dir)]

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.http}/v1", api_key="unused", max_retries=0)

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(self.http + path) as r:
            return r.status, await r.text()

    async def metrics(self) -> dict[str, float]:
        """Every sample, by name and labels ('cpumesh_requests_total{outcome=stop}')."""
        status, text = await self.get("/metrics")
        assert status == 200
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return samples


@pytest.fixture(scope="module")
def cluster(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(smollm2_dir, tmp_path_factory.mktemp("http"))
    for s in c.services:
        s.start()
    try:
        wait_serving(c.router_addr, c.services[-1], deadline_s=180)
        yield c
    finally:
        for s in reversed(c.services):
            s.stop()


async def test_openai_client_sees_the_grpc_greedy_text(cluster: Cluster) -> None:
    async with RouterClient(cluster.router_addr) as client:
        grpc_text = (await client.complete(PROMPT, max_new_tokens=NEW, temperature=0,
                                           timeout=60)).text
        grpc_chat = (await client.complete(messages=CHAT, max_new_tokens=NEW, temperature=0,
                                           timeout=60)).text
    assert grpc_text and grpc_chat
    api = cluster.openai()
    model = (await api.models.list()).data[0].id
    done = await api.completions.create(model=model, prompt=PROMPT, max_tokens=NEW,
                                        temperature=0)
    assert done.choices[0].text == grpc_text
    assert done.usage is not None and done.usage.completion_tokens <= NEW
    parts = [c.choices[0].text async for c in await api.completions.create(
        model=model, prompt=PROMPT, max_tokens=NEW, temperature=0, stream=True)]
    assert "".join(parts) == grpc_text and len(parts) > 1
    chat = await api.chat.completions.create(
        model=model, messages=[{"role": r, "content": c} for r, c in CHAT], max_tokens=NEW,
        temperature=0)
    assert chat.choices[0].message.content == grpc_chat
    chunks = [c async for c in await api.chat.completions.create(
        model=model, messages=[{"role": r, "content": c} for r, c in CHAT], max_tokens=NEW,
        temperature=0, stream=True, stream_options={"include_usage": True})]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == grpc_chat
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    await api.close()


async def test_errors_have_openai_status_codes_and_shape(cluster: Cluster) -> None:
    api = cluster.openai()
    model = (await api.models.list()).data[0].id
    with pytest.raises(openai.BadRequestError) as e:
        await api.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, top_p=1.5)
    assert e.value.status_code == 400 and e.value.param == "top_p"
    assert "top_p" in e.value.message
    with pytest.raises(openai.BadRequestError):
        await api.chat.completions.create(model=model, messages=[], max_tokens=NEW)
    with pytest.raises(openai.NotFoundError):
        await api.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=NEW)
    await api.close()
    async with aiohttp.ClientSession() as s, s.post(cluster.http + "/v1/completions",
                                                    data=b"{not json") as r:
        body = await r.json()
        assert r.status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert (await cluster.get("/health"))[0] == 200
    assert (await cluster.get("/ready"))[0] == 200


async def test_the_model_id_is_the_model_name_and_any_other_is_model_not_found(
        cluster: Cluster, smollm2_dir: Path) -> None:
    from model_formats.embedded import MODEL_NAME

    # The shards serve a cache directory "SmolLM2-135M-Instruct-<12 hex digits>"; clients see
    # the model's name.
    assert smollm2_dir.name != MODEL_NAME and smollm2_dir.name.startswith(MODEL_NAME + "-")
    api = cluster.openai()
    assert [m.id for m in (await api.models.list()).data] == [MODEL_NAME]
    done = await api.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    assert done.model == MODEL_NAME
    for wrong in (smollm2_dir.name, "gpt-4o"):
        with pytest.raises(openai.NotFoundError) as e:
            await api.chat.completions.create(
                model=wrong, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert e.value.status_code == 404 and e.value.param == "model"
        assert e.value.code == "model_not_found"
        assert isinstance(e.value.body, dict)
        assert (e.value.body["type"], e.value.body["param"], e.value.body["code"]) == \
            ("invalid_request_error", "model", "model_not_found")
        assert wrong in e.value.message and MODEL_NAME in e.value.message
    await api.close()
    async with RouterClient(cluster.router_addr) as client:
        assert (await client.model_info()).model_name == MODEL_NAME


async def test_a_completion_cut_inside_a_character_ends_before_it(
        cluster: Cluster, smollm2_dir: Path) -> None:
    """Greedy SmolLM2 goes on writing 🤗, three tokens each: max_tokens that cuts one leaves
    its first bytes out of the text (no U+FFFD), streamed or not."""
    from transformers import AutoTokenizer

    prompt = "Emoji: 🤗🤗🤗"
    async with RouterClient(cluster.router_addr) as client:
        ids = (await client.complete(prompt, max_new_tokens=6, temperature=0, ignore_eos=True,
                                     timeout=60)).token_ids
    tokens = AutoTokenizer.from_pretrained(smollm2_dir).convert_ids_to_tokens(ids)
    cuts = [n for n in range(1, len(ids) + 1) if cut_bytes(byte_level_bytes(tokens[:n]))]
    assert cuts, f"no character cut in {tokens}: pick another prompt"
    api = cluster.openai()
    for n in cuts[:2]:
        expected = without_cut_character(byte_level_bytes(tokens[:n]))
        done = await api.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt,
                                            max_tokens=n, temperature=0,
                                            extra_body={"ignore_eos": True})
        assert done.choices[0].text == expected and "\ufffd" not in expected
        assert done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.completion_tokens == n
        parts = [c.choices[0].text async for c in await api.completions.create(
            model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=n, temperature=0,
            stream=True, extra_body={"ignore_eos": True})]
        assert "".join(parts) == expected
    await api.close()


async def test_loadtest_client_gets_exactly_the_asked_tokens(cluster: Cluster) -> None:
    """`cpumesh loadtest` over HTTP: its extra fields (ignore_eos, min_tokens) are accepted and
    every request is as long as asked."""
    report = await run_load(LoadConfig(cluster.http, users=2, requests=4, duration_s=60,
                                       prompt_tokens="8", output_tokens="6:10", timeout_s=60))
    assert report["ok"] == 4 and report["length_mismatches"] == 0
    assert report["output_tokens_per_request"] == report["requested_tokens_per_request"]


async def test_metrics_parse_and_move_as_requests_complete(cluster: Cluster) -> None:
    before = await cluster.metrics()
    api = cluster.openai()
    model = (await api.models.list()).data[0].id
    await api.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0,
                                 extra_body={"ignore_eos": True})
    await api.close()
    # A client that disconnects mid-stream cancels its request.
    async with aiohttp.ClientSession() as s, s.post(cluster.http + "/v1/completions", json={
            "model": model, "prompt": PROMPT, "max_tokens": 500, "stream": True,
            "ignore_eos": True}) as r:
        assert r.status == 200
        await r.content.readuntil(b"\n\n")
    async with asyncio.timeout(10):
        while (after := await cluster.metrics())["cpumesh_requests_total{outcome=cancelled}"] \
                == before["cpumesh_requests_total{outcome=cancelled}"]:
            await asyncio.sleep(0.05)
    assert after["cpumesh_requests_total{outcome=length}"] == \
        before["cpumesh_requests_total{outcome=length}"] + 1
    assert after["cpumesh_generation_tokens_total"] >= before["cpumesh_generation_tokens_total"] + 5
    assert after["cpumesh_prompt_tokens_total"] > before["cpumesh_prompt_tokens_total"]
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert after[f"cpumesh_{name}_count"] == before[f"cpumesh_{name}_count"] + 2, name
    assert after["cpumesh_inter_token_latency_seconds_count"] >= \
        before["cpumesh_inter_token_latency_seconds_count"] + 3
    assert after["cpumesh_steps_total"] > before["cpumesh_steps_total"]
    assert after["cpumesh_step_part_seconds_count{part=shard_compute}"] > 0
    assert after["cpumesh_kv_cache_tokens_free"] > 0
    assert after["cpumesh_num_requests_running"] == 0 and after["cpumesh_serving"] == 1


async def test_router_without_shards_is_alive_not_ready_and_answers_503(tmp_path: Path) -> None:
    tok, shard, router, http = free_ports(4)
    proc = Service("router", ["-m", "router_svc", "--tokenizer", f"127.0.0.1:{tok}", "--shards",
                              f"127.0.0.1:{shard}", "--listen", f"127.0.0.1:{router}",
                              "--http-listen", f"127.0.0.1:{http}"], tmp_path).start()
    base = f"http://127.0.0.1:{http}"
    try:
        async with aiohttp.ClientSession() as s:
            async with asyncio.timeout(30):
                while True:
                    try:
                        async with s.get(base + "/health") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.1)
            async with s.get(base + "/ready") as r:
                assert r.status == 503
            async with s.post(base + "/v1/completions", json={"prompt": "hi"}) as r:
                assert r.status == 503
                assert (await r.json())["error"]["type"] == "service_unavailable"
    finally:
        proc.stop()


async def test_sigterm_lets_an_http_stream_finish_and_refuses_new_connections(
        smollm2_dir: Path, tmp_path: Path) -> None:
    """SIGTERM to the router: it stops listening for HTTP at once, the stream in flight still
    gets every token, its usage and [DONE] (within --drain-grace), and the router exits 0."""
    c = Cluster(smollm2_dir, tmp_path, served_name="smol")  # and a name of one's own
    for service in c.services:
        service.start()
    router = c.services[-1]
    try:
        wait_serving(c.router_addr, router, deadline_s=180)
        async with aiohttp.ClientSession() as s, s.post(c.http + "/v1/completions", json={
                "model": "smol", "prompt": PROMPT, "max_tokens": 24, "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True}}) as r:
            assert r.status == 200
            first = await r.content.readuntil(b"\n\n")
            router.signal(signal.SIGTERM)
            async with asyncio.timeout(10):  # draining: new connections are refused
                while True:
                    try:
                        async with aiohttp.ClientSession() as probe, probe.get(c.http + "/health"):
                            pass
                    except aiohttp.ClientConnectionError:
                        break
                    await asyncio.sleep(0.05)
            async with asyncio.timeout(60):
                rest = await r.content.read()
        events = (first + rest).decode().strip().split("\n\n")
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == 24
        assert {ch["model"] for ch in chunks} == {"smol"}
        assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == \
            "length"
        assert router.proc is not None and router.proc.wait(30) == 0
    finally:
        for service in reversed(c.services):
            service.stop()
