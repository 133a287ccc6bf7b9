"""TokenizerService served for real on port 0 in process (a server thread with its own event
loop), driven through the generated stubs: results equal the core's, every bad input gets
INVALID_ARGUMENT naming the problem and the server keeps serving, batched streaming through
DetokenizeBatch adds up to Decode (property test), and the process entry point stops on SIGTERM."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.pb.cpumesh.v1 import common_pb2
from services.pb.cpumesh.v1 import tokenizer_pb2 as pb
from services.pb.cpumesh.v1 import tokenizer_pb2_grpc as pb_grpc
from tests.procs import Service, free_ports, health_status, wait_serving
from tests.unit.test_tokenizer import CHATS, TEXTS, random_ids
from tests.unit.test_tokenizer_models import build_byte_level, build_unigram
from tests.utf8_reference import byte_level_bytes, without_cut_character
from tokenizer_svc.service import LIVENESS, build_server
from tokenizer_svc.servicer import TokenizerServicer
from tokenizer_svc.tokenizer import Tokenizer

SERVING = health_pb2.HealthCheckResponse.SERVING
TIMEOUT = 10.0


class ServerThread:
    """A TokenizerService on 127.0.0.1:0, served by an event loop in a daemon thread."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.servicer = TokenizerServicer(tokenizer, workers=2)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self._call(self._start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.TokenizerServiceStub(self.channel)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    async def _start(self):
        server, port = build_server(self.servicer)
        await server.start(serving=True)
        await server.set_serving(True, LIVENESS)
        return server, port

    def close(self) -> None:
        self.channel.close()
        self._call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.servicer.executor.shutdown()


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> Iterator[ServerThread]:
    server = ServerThread(Tokenizer.from_dir(smollm2_dir))
    yield server
    server.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = build_byte_level(tmp_path_factory.mktemp("byte_level"))
    server = ServerThread(Tokenizer.from_dir(path, max_text_chars=1000))
    yield server
    server.close()


def chat_item(messages: list[dict[str, str]], **flags: bool) -> pb.EncodeItem:
    return pb.EncodeItem(chat=common_pb2.ChatMessages(
        messages=[common_pb2.ChatMessage(**m) for m in messages]), **flags)


def test_results_equal_the_core(smollm2: ServerThread) -> None:
    core = smollm2.servicer.tokenizer
    items = [pb.EncodeItem(text=t) for t in TEXTS] + [chat_item(c) for c in CHATS]
    items += [pb.EncodeItem(text=TEXTS[0], add_special_tokens=False),
              chat_item(CHATS[0], add_generation_prompt=False, add_special_tokens=True)]
    results = smollm2.stub.Encode(pb.EncodeRequest(items=items), timeout=TIMEOUT).results
    expected = [core.encode(t) for t in TEXTS] + [core.encode_chat(c) for c in CHATS]
    expected += [core.encode(TEXTS[0], False), core.encode_chat(CHATS[0], False, True)]
    assert [list(r.token_ids) for r in results] == expected
    assert [r.count for r in results] == [len(e) for e in expected]
    for skip in (True, False):
        decoded = smollm2.stub.Decode(pb.DecodeRequest(
            items=[pb.DecodeItem(token_ids=e) for e in expected], skip_special_tokens=skip),
            timeout=TIMEOUT)
        assert list(decoded.texts) == core.decode_batch(expected, skip)
    info = smollm2.stub.Info(pb.TokenizerInfoRequest(), timeout=TIMEOUT)
    assert (info.vocab_size, info.bos_token_id, list(info.eos_token_ids)) == (49152, 1, [2])
    assert info.has_chat_template and info.model_name.startswith("SmolLM2-135M-Instruct")
    health = health_pb2_grpc.HealthStub(smollm2.channel)
    for name in ("", "cpumesh.v1.TokenizerService", LIVENESS):
        request = health_pb2.HealthCheckRequest(service=name)
        assert health.Check(request, timeout=TIMEOUT).status == SERVING


def test_bad_input_gets_invalid_argument_and_the_server_keeps_serving(
        tiny: ServerThread, tmp_path: Path) -> None:
    limit = tiny.servicer.tokenizer.info.vocab_size
    user = {"role": "user", "content": "hi"}
    cases = [
        ("Decode", pb.DecodeRequest(items=[pb.DecodeItem(token_ids=[1]),
                                           pb.DecodeItem(token_ids=[3, limit])]),
         f"item 1: token id {limit} at position 1 is outside the vocabulary"),
        ("DetokenizeBatch", pb.DetokenizeBatchRequest(items=[pb.DetokenizeItem(
            token_ids=[1, 2 * limit], read_offset=1)]), f"item 0: token id {2 * limit}"),
        ("DetokenizeBatch", pb.DetokenizeBatchRequest(items=[pb.DetokenizeItem(
            token_ids=[1, 2], prefix_offset=2, read_offset=1)]),
         "prefix_offset (2) <= read_offset (1)"),
        ("Encode", pb.EncodeRequest(items=[pb.EncodeItem(text="ok"), chat_item([])]),
         "item 1: the chat has no messages"),
        ("Encode", pb.EncodeRequest(items=[chat_item([{"role": "robot", "content": "x"}])]),
         "item 0: message 0: unknown role 'robot'"),
        ("Encode", pb.EncodeRequest(items=[chat_item([user, {"role": "tool", "content": "x"}])]),
         "the chat template failed to render: TemplateError: unknown role tool"),
        ("Encode", pb.EncodeRequest(items=[pb.EncodeItem(text="x" * 1001)]),
         "item 0: the text has 1001 characters, more than the limit of 1000"),
        ("Encode", pb.EncodeRequest(items=[chat_item([{"role": "user", "content": "x" * 1001}])]),
         "the chat has 1001 characters of content, more than the limit of 1000"),
        ("Encode", pb.EncodeRequest(items=[pb.EncodeItem()]),
         "give exactly one of a text and chat messages"),
    ]
    for method, request, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            getattr(tiny.stub, method)(request, timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
        assert message in caught.value.details()
        assert tiny.stub.Encode(pb.EncodeRequest(items=[pb.EncodeItem(text="still here")]),
                                timeout=TIMEOUT).results[0].count > 0
    garbage = tiny.channel.unary_unary("/cpumesh.v1.TokenizerService/Encode")
    with pytest.raises(grpc.RpcError) as caught:
        garbage(b"\xff\xff\xff", timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert health_status(f"127.0.0.1:{tiny.port}") == SERVING

    no_template = ServerThread(Tokenizer.from_dir(build_unigram(tmp_path / "unigram")))
    try:
        with pytest.raises(grpc.RpcError) as caught:
            no_template.stub.Encode(pb.EncodeRequest(items=[chat_item([user])]), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the model has no chat template" in caught.value.details()
        assert not no_template.stub.Info(pb.TokenizerInfoRequest()).has_chat_template
    finally:
        no_template.close()


def test_calls_before_the_tokenizer_is_loaded_are_unavailable() -> None:
    server = ServerThread(None)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            server.stub.Info(pb.TokenizerInfoRequest(), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_batched_streams_add_up_to_decode(smollm2: ServerThread, data: st.DataObject) -> None:
    """Several sequences stream together, each with its own random chunking; every call sends a
    window that starts at or before each sequence's prefix offset."""
    core, stub = smollm2.servicer.tokenizer, smollm2.stub
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    sequences = [random_ids(core, rng, rng.randrange(0, 20)) for _ in range(rng.randrange(1, 9))]
    state = {seq: (0, 0, 0) for seq in range(len(sequences))}  # seen, prefix, read (absolute)
    texts = {seq: "" for seq in state}
    while state:
        items, starts = [], {}
        for seq, (seen, prefix, read) in state.items():
            seen = min(len(sequences[seq]), seen + rng.choice([0, 1, 1, 2, 5]))
            start = rng.randint(0, prefix)
            starts[seq] = (start, seen)
            items.append(pb.DetokenizeItem(
                seq_id=seq, token_ids=sequences[seq][start:seen], prefix_offset=prefix - start,
                read_offset=read - start, flush=seen == len(sequences[seq])))
        response = stub.DetokenizeBatch(pb.DetokenizeBatchRequest(
            items=items, skip_special_tokens=skip), timeout=TIMEOUT)
        for item, result in zip(items, response.results, strict=True):
            assert result.seq_id == item.seq_id
            texts[item.seq_id] += result.text
            start, seen = starts[item.seq_id]
            if item.flush:
                del state[item.seq_id]
            else:
                state[item.seq_id] = (seen, result.prefix_offset + start,
                                      result.read_offset + start)
    wholes = stub.Decode(pb.DecodeRequest(items=[pb.DecodeItem(token_ids=s) for s in sequences],
                                          skip_special_tokens=skip), timeout=TIMEOUT).texts
    assert [texts[seq] for seq in range(len(sequences))] == [
        finished_text(core, ids, whole, skip) for ids, whole in zip(sequences, wholes, strict=True)]


def finished_text(core: Tokenizer, ids: list[int], whole: str, skip: bool) -> str:
    """`whole` (the Decode of SmolLM2's `ids`) less a character cut short at its end, found in
    the tokens' raw bytes by the brute-force reference."""
    tokens = [core._backend.id_to_token(i) or "" for i in ids
              if not (skip and i in core._special_ids)]
    raw = byte_level_bytes(tokens)
    assert whole == raw.decode("utf-8", errors="replace")
    return without_cut_character(raw)


def test_a_sequence_cut_inside_a_character_is_flushed_without_it(smollm2: ServerThread) -> None:
    """The router's last call for a sequence that max_tokens cut after the first of 🤗's three
    tokens: the flush sends what came before the character, no U+FFFD."""
    core, stub = smollm2.servicer.tokenizer, smollm2.stub
    ids = core.encode("Once upon a time 🤗🤗", add_special_tokens=False)
    whole = core.decode(ids)
    cuts = [n for n in range(1, len(ids) + 1) if core.decode(ids[:n]).endswith("\ufffd")]
    assert cuts and whole.endswith("🤗🤗")
    items = [pb.DetokenizeItem(seq_id=n, token_ids=ids[:n], prefix_offset=0, read_offset=0,
                               flush=True) for n in cuts]
    response = stub.DetokenizeBatch(pb.DetokenizeBatchRequest(items=items), timeout=TIMEOUT)
    for n, result in zip(cuts, response.results, strict=True):
        assert "\ufffd" not in result.text
        assert result.text == without_cut_character(byte_level_bytes(
            [core._backend.id_to_token(i) for i in ids[:n]]))
        assert whole.startswith(result.text) and result.read_offset == n


def test_process_serves_until_sigterm(tmp_path: Path) -> None:
    model_dir = build_byte_level(tmp_path / "model")
    port, health_port = free_ports(2)
    service = Service("tokenizer", ["-m", "tokenizer_svc", "--model-dir", str(model_dir),
                                    "--listen", f"127.0.0.1:{port}", "--health-listen",
                                    f"127.0.0.1:{health_port}", "--model-name", "tiny"], tmp_path)
    service.start()
    try:
        wait_serving(f"127.0.0.1:{port}", service, deadline_s=60)
        assert health_status(f"127.0.0.1:{health_port}", LIVENESS) == SERVING
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = pb_grpc.TokenizerServiceStub(channel).Info(pb.TokenizerInfoRequest(),
                                                              timeout=TIMEOUT)
        assert info.model_name == "tiny"
        service.signal(signal.SIGTERM)
        assert service.proc is not None and service.proc.wait(20) == 0, service.log_tail()
    finally:
        service.stop()


def test_the_service_never_imports_torch() -> None:
    code = ("import sys, tokenizer_svc.cli, tokenizer_svc.service; "
            "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
