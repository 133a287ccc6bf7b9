"""The whole system over real processes on loopback: tokenizer, router and SmolLM2 shards.

One cluster at a time (tp 1, then tp 2), shared by the tests; the shard-kill test runs last.
Shards are limited to a context of 1024 and a KV cache of 2048 tokens, so that the limits are
cheap to reach.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from services.client import Completion, RouterClient
from services.pb.cpumesh.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from tests.procs import Service, free_ports, health_status, wait_serving

pytestmark = pytest.mark.asyncio
CONTEXT, KV, PAGE = 1024, 2048, 16
PROMPT = "The capital of France is"
CHAT = [("user", "What is the capital of France? Answer in one sentence.")]
NEW = 20
SERVING = health_pb2.HealthCheckResponse.SERVING


class Cluster:
    def __init__(self, model_dir: Path, tp: int, log_dir: Path) -> None:
        ports = free_ports(2 + 2 * tp)
        self.tokenizer_addr, self.router_addr = (f"127.0.0.1:{p}" for p in ports[:2])
        self.shard_addrs = [f"127.0.0.1:{p}" for p in ports[2:2 + tp]]
        peers = ",".join(f"127.0.0.1:{p}" for p in ports[2 + tp:])
        self.log_dir = log_dir
        self.tokenizer = Service("tokenizer", ["-m", "tokenizer_svc", "--model-dir",
                                               str(model_dir), "--listen", self.tokenizer_addr],
                                 log_dir)
        self.shards = [Service(f"shard{r}", [
            "-m", "shard_svc", "--model-dir", str(model_dir), "--tp-size", str(tp),
            "--tp-rank", str(r), "--peers", peers, "--listen", a, "--threads", "1",
            "--kv-capacity-tokens", str(KV), "--kv-page-size", str(PAGE),
            "--max-context", str(CONTEXT), "--mesh-timeout", "60"], log_dir)
            for r, a in enumerate(self.shard_addrs)]
        self.router = Service("router", [
            "-m", "router_svc", "--tokenizer", self.tokenizer_addr,
            "--shards", ",".join(self.shard_addrs), "--listen", self.router_addr,
            "--max-waiting", "8", "--max-running", "16", "--max-stop-strings", "4"], log_dir)

    def start(self) -> Cluster:
        for s in [self.tokenizer, *self.shards, self.router]:
            s.start()
        wait_serving(self.router_addr, self.router, deadline_s=180)
        return self

    def stop(self) -> None:
        for s in [self.router, *self.shards, self.tokenizer]:
            s.stop()

    def router_log(self) -> str:
        return self.router.log_path.read_text()

    async def kv_used(self) -> list[int]:
        """KV tokens in use on each shard, from its Info."""
        used = []
        for a in self.shard_addrs:
            async with grpc.aio.insecure_channel(a) as channel:
                info = await shard_pb2_grpc.ShardServiceStub(channel).Info(
                    shard_pb2.ShardInfoRequest(), timeout=5)
                used.append(info.kv_capacity_tokens - info.kv_free_tokens)
        return used


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> dict[str, tuple[list[int], str]]:
    """transformers' greedy ids and text for PROMPT and CHAT (up to NEW tokens or EOS)."""
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


async def until_kv_free(c: Cluster, timeout: float = 5.0) -> None:
    """Every shard's KV cache empties (a finished stream is released before the next step)."""
    async with asyncio.timeout(timeout):
        while await c.kv_used() != [0] * len(c.shards):
            await asyncio.sleep(0.01)


async def complete(c: Cluster, prompt: str | None = PROMPT, **params: object) -> Completion:
    async with RouterClient(c.router_addr) as client:
        return await client.complete(prompt, timeout=120, **params)


async def test_router_without_shards_is_alive_not_ready_and_stops_on_sigterm(
        tmp_path: Path) -> None:
    tokenizer_port, shard_port, router_port = free_ports(3)
    address = f"127.0.0.1:{router_port}"
    router = Service("router", ["-m", "router_svc", "--tokenizer", f"127.0.0.1:{tokenizer_port}",
                                "--shards", f"127.0.0.1:{shard_port}", "--listen", address],
                     tmp_path).start()
    try:
        async with asyncio.timeout(30):
            while health_status(address, "liveness") != SERVING:
                await asyncio.sleep(0.1)
        assert health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        async with RouterClient(address) as client:
            for call in (client.complete(PROMPT, timeout=10), client.model_info()):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert f"127.0.0.1:{shard_port}" in (e.value.details() or "")
        router.signal(signal.SIGTERM)
        assert router.proc is not None and router.proc.wait(15) == 0
    finally:
        router.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_mutual_tls_between_all_services(smollm2_dir: Path, tmp_path: Path) -> None:
    from tests.service.test_server import _make_certs

    _make_certs(tmp_path)
    tls = ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"),
           "--tls-ca", str(tmp_path / "ca.pem")]
    ports = free_ports(7)
    tok, shard, router, mesh, *health = (f"127.0.0.1:{p}" for p in ports)
    services = [
        Service("tokenizer", ["-m", "tokenizer_svc", "--model-dir", str(smollm2_dir), "--listen",
                              tok, "--health-listen", health[0], *tls], tmp_path),
        Service("shard0", ["-m", "shard_svc", "--model-dir", str(smollm2_dir), "--peers", mesh,
                           "--listen", shard, "--threads", "1", "--kv-capacity-tokens", "512",
                           "--health-listen", health[1], *tls], tmp_path),
        Service("router", ["-m", "router_svc", "--tokenizer", tok, "--shards", shard,
                           "--listen", router, "--health-listen", health[2], *tls], tmp_path)]
    try:
        for s in services:
            s.start()
        wait_serving(health[2], services[2], deadline_s=120)
        mine = grpc.ssl_channel_credentials(
            (tmp_path / "ca.pem").read_bytes(), (tmp_path / "client.key").read_bytes(),
            (tmp_path / "client.pem").read_bytes())
        async with RouterClient(router, mine) as client:
            done = await client.complete(PROMPT, max_new_tokens=4, temperature=0, timeout=60)
            assert len(done.token_ids) == 4
        no_cert = grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes())
        async with RouterClient(router, no_cert) as client:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.complete(PROMPT, max_new_tokens=4, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for s in reversed(services):
            s.stop()


@pytest.mark.parametrize("tp", [1, 2])
async def test_greedy_equals_transformers(cluster_of: Callable[[int], Cluster],
                                          reference: dict[str, tuple[list[int], str]],
                                          tp: int) -> None:
    c = cluster_of(tp)
    plain = await complete(c, max_new_tokens=NEW, temperature=0)
    chat = await complete(c, None, messages=CHAT, max_new_tokens=NEW, temperature=0)
    for got, name in ((plain, "prompt"), (chat, "chat")):
        ids, text = reference[name]
        assert got.token_ids == ids, name
        assert got.text == text, name
        assert got.usage.generated_tokens == len(ids)
        assert got.finish_name == ("stop" if ids[-1] == 2 else "length")
    assert chat.finish_name == "stop" and chat.stop_token_id == 2
    async with RouterClient(c.router_addr) as client:
        info = await client.model_info()
    assert (info.tp_size, info.vocab_size, info.context_length, info.kv_capacity_tokens) == \
        (tp, 49152, CONTEXT, KV)
    assert info.has_chat_template and 2 in info.eos_token_ids and info.max_batch_size == 16


CONCURRENT = [  # all greedy: each must equal its solo run
    dict(prompt="The capital of France is", max_new_tokens=6),
    dict(prompt="def fibonacci(n):\n   ", max_new_tokens=16, logprobs=True, top_logprobs=2),
    dict(prompt=None, messages=[("user", "Name three colors.")], max_new_tokens=12),
    dict(prompt="Once upon a time", max_new_tokens=14, stop=[" the"]),
    dict(prompt="1, 2, 3, 4,", max_new_tokens=9, top_k=1, temperature=1.3),
    dict(prompt="Résumé: 東京 is a city where 🍣 is", max_new_tokens=11),
    dict(prompt="The quick brown fox", max_new_tokens=4, ignore_eos=True),
    dict(prompt="Paris is", max_new_tokens=15, stop_token_ids=[30]),
]


def same(a: Completion, b: Completion) -> None:
    assert (a.token_ids, a.text, a.finish_reason, a.finish_detail, a.stop_string) == \
        (b.token_ids, b.text, b.finish_reason, b.finish_detail, b.stop_string)
    assert [p.token.token_id for p in a.logprobs] == [p.token.token_id for p in b.logprobs]
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert x.token.logprob == pytest.approx(y.token.logprob, abs=1e-3)
        assert [t.token_id for t in x.top] == [t.token_id for t in y.top]


async def test_concurrent_requests_equal_their_solo_runs(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    params = [{"temperature": 0.0, **p} for p in CONCURRENT]
    solo = [await complete(c, **p) for p in params]  # type: ignore[arg-type]

    async def staggered(i: int) -> Completion:
        await asyncio.sleep(0.12 * i)
        return await complete(c, request_id=f"batch-{i}", **params[i])  # type: ignore[arg-type]

    batch = await asyncio.gather(*(staggered(i) for i in range(len(params))))
    for s, b in zip(solo, batch, strict=True):
        same(s, b)
    assert len(batch[1].logprobs) == len(batch[1].token_ids) and batch[1].logprobs[0].top
    assert batch[3].finish_name == "stop" and batch[3].stop_string == " the"
    spans = {int(m[1]): (int(m[2]), int(m[3])) for m in re.finditer(
        r"request batch-(\d+) .* steps (\d+)-(\d+);", c.router_log())}
    assert len(spans) == len(params)
    joins, leaves = {j for j, _ in spans.values()}, {v for _, v in spans.values()}
    most_live = max(sum(j <= s < v for j, v in spans.values()) for s in joins)
    assert len(joins) >= 3 and len(leaves) >= 3 and most_live >= 3, spans


async def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    sampled = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, ignore_eos=True)
    a = await complete(c, seed=7, **sampled)  # type: ignore[arg-type]
    b = await complete(c, seed=7, **sampled)  # type: ignore[arg-type]
    others = [await complete(c, seed=s, **sampled) for s in (8, 9)]  # type: ignore[arg-type]
    assert (a.token_ids, a.text) == (b.token_ids, b.text)
    assert any(o.token_ids != a.token_ids for o in others)
    greedy = await complete(c, max_new_tokens=8, temperature=0)
    top1 = await complete(c, max_new_tokens=8, top_k=1, temperature=1.0, seed=3)
    assert top1.token_ids == greedy.token_ids


async def test_stop_strings_split_across_tokens_are_never_streamed(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    texts: list[str] = []
    async with RouterClient(c.router_addr) as client:
        async for r in client.generate("Once upon a time", max_new_tokens=24, temperature=0,
                                       ignore_eos=True, timeout=60):
            texts.append(r.text)
        full = "".join(texts)
        # the first boundary between two chunks of 2+ characters: end of one, start of the next
        i = next(i for i in range(1, len(texts)) if len(texts[i - 1]) >= 2 and len(texts[i]) >= 2
                 and len("".join(texts[:i])) >= 4)
        stop = texts[i - 1][-2:] + texts[i][:2]
        assert full.index(stop) == len("".join(texts[:i])) - 2
        chunks = [r async for r in client.generate(
            "Once upon a time", max_new_tokens=24, temperature=0, ignore_eos=True,
            stop=["never ever", stop], timeout=60)]
    streamed = "".join(r.text for r in chunks)
    assert streamed == full[:full.index(stop)]
    assert all(stop[:3] not in r.text for r in chunks)
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and last.stop_string == stop


INVALID = [  # (params, the field named in the error)
    (dict(prompt=""), "prompt"),
    (dict(prompt=None, messages=[]), "chat.messages"),
    (dict(temperature=-1.0), "sampling.temperature"),
    (dict(temperature=float("nan")), "sampling.temperature"),
    (dict(top_p=0.0), "sampling.top_p"),
    (dict(top_p=1.01), "sampling.top_p"),
    (dict(top_k=5000), "sampling.top_k"),
    (dict(max_new_tokens=0), "sampling.max_new_tokens"),
    (dict(max_new_tokens=CONTEXT + 1), "sampling.max_new_tokens"),
    (dict(prompt="word " * 600, max_new_tokens=500), "prompt"),
    (dict(stop=["a", "b", "c", "d", "e"]), "sampling.stop"),
    (dict(stop=[""]), "sampling.stop[0]"),
    (dict(stop_token_ids=[49152]), "sampling.stop_token_ids[0]"),
    (dict(logprobs=True, top_logprobs=21), "sampling.top_logprobs"),
    (dict(top_logprobs=2), "sampling.top_logprobs"),
    (dict(prompt=None, messages=[("", "hi")]), "chat.messages[0].role"),
    (dict(prompt=None, messages=[("wizard", "hi")]), "chat"),
    (dict(request_id="bad\nid"), "request_id"),
]


async def test_each_invalid_parameter_gets_invalid_argument(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    async with RouterClient(c.router_addr) as client:
        for params, field in INVALID:
            p = {"prompt": PROMPT, **params}
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.complete(timeout=30, **p)  # type: ignore[arg-type]
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (params, e.value)
            assert (e.value.details() or "").startswith(field), (params, e.value.details())
        garbage = client.channel.unary_stream("/cpumesh.v1.RouterService/Generate")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in garbage(b"\xff\xff\xff", timeout=10):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert health_status(c.router_addr) == SERVING


async def test_full_queue_is_refused_at_once_and_cancels_free_the_kv(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    async with RouterClient(c.router_addr) as client:
        # Two of these fill the KV cache (2 x 1008 of 2048 tokens); eight more fill the queue.
        async def long(i: int) -> None:
            async for _ in client.generate("Hello", max_new_tokens=1000, ignore_eos=True,
                                           request_id=f"long-{i}", timeout=120):
                pass

        tasks = []
        for i in range(10):
            tasks.append(asyncio.ensure_future(long(i)))
            await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.complete("Hello", max_new_tokens=5, timeout=30)
        assert time.perf_counter() - t0 < 1.0
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "waiting queue full (8 requests)" in (e.value.details() or "")
        assert all(not t.done() for t in tasks)
        assert await c.kv_used() != [0] * len(c.shards)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await until_kv_free(c)


async def test_cancel_and_deadline_free_the_kv_within_one_step(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    other_params = dict(max_new_tokens=40, temperature=0, ignore_eos=True)
    solo = await complete(c, "Hi", **other_params)  # type: ignore[arg-type]
    async with RouterClient(c.router_addr) as client:
        other_tokens: list[int] = []

        async def other() -> None:
            async for r in client.generate("Hi", timeout=120, **other_params):  # type: ignore
                other_tokens.extend(r.token_ids)

        other_task = asyncio.ensure_future(other())
        victim = client.generate("Tell me a long story. " * 30, max_new_tokens=500,
                                 ignore_eos=True, timeout=120)
        got = 0
        async for r in victim:
            got += len(r.token_ids)
            if got >= 3:
                break
        assert min(await c.kv_used()) >= 150  # the victim's prompt holds its pages
        at_cancel = len(other_tokens)
        await victim.aclose()  # cancels the call
        async with asyncio.timeout(5):
            while max(await c.kv_used()) > 48:  # only the other one's pages (<= 3) remain
                await asyncio.sleep(0.005)
        assert len(other_tokens) - at_cancel <= 2, "released within one step"
        # A deadline passing mid-stream is a cancel too.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.complete("Tell me a long story.", max_new_tokens=500,
                                  ignore_eos=True, timeout=1.0)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await other_task
        assert other_tokens == solo.token_ids, "the others are not disturbed"
        await until_kv_free(c)


async def test_killing_a_shard_fails_streams_fast_and_the_router_recovers(
        cluster_of: Callable[[int], Cluster],
        reference: dict[str, tuple[list[int], str]]) -> None:
    c = cluster_of(2)
    async with RouterClient(c.router_addr) as client:
        progress = [0, 0]

        async def stream(i: int) -> None:
            async for r in client.generate(PROMPT, max_new_tokens=500, ignore_eos=True,
                                           timeout=120):
                progress[i] += len(r.token_ids)

        tasks = [asyncio.ensure_future(stream(i)) for i in range(2)]
        async with asyncio.timeout(60):
            while min(progress) < 3:
                await asyncio.sleep(0.01)
        c.shards[1].signal(signal.SIGKILL)
        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        elapsed = time.perf_counter() - t0
        for r in results:
            assert isinstance(r, grpc.aio.AioRpcError), r
            assert r.code() == grpc.StatusCode.UNAVAILABLE, r
            # The killed shard is named: by its address when the router sees its link drop
            # first, or as "rank 1" when its surviving peer reports the broken mesh first.
            details = r.details() or ""
            assert c.shard_addrs[1] in details or "rank 1" in details, details
        assert elapsed < 3.0, elapsed
        assert await client.health() != SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.complete(PROMPT, max_new_tokens=2, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert c.shards[1].proc is not None
        c.shards[1].proc.wait(10)
        # The group comes back whole (as Kubernetes replaces it), at the same addresses; the
        # router itself is not restarted.
        c.shards[0].stop()
        for s in c.shards:
            s.start()
        wait_serving(c.router_addr, c.router, deadline_s=120)
        again = await client.complete(PROMPT, max_new_tokens=NEW, temperature=0, timeout=60)
        assert again.token_ids == reference["prompt"][0]
        await until_kv_free(c)
