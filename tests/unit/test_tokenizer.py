"""The tokenizer core against `transformers` on the same model directories (three tiny ones trained
here, the converted SmolLM2, and SmolLM2 loaded by transformers straight from its GGUF file), its
refusals, and incremental detokenization (streams equal whole decodes, property-tested)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.errors import CheckpointError, InvalidArgument
from tests.unit.test_tokenizer_models import BUILDERS
from tests.utf8_reference import byte_level_bytes, cut_bytes, without_cut_character
from tokenizer_svc.token_bytes import incomplete_utf8_tail
from tokenizer_svc.tokenizer import Detokenized, DetokenizeInput, EncodeInput, Tokenizer

TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "don't won't I'll isn't ,.",
    "def f(x):\n\treturn x**2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = 0; }",
    '{"key": [1, 2.5e-3, null], "s": "\\u00e9"}', "SELECT * FROM t WHERE a <> 'b';",
    "日本語のテキスト、漢字とかな。", "你好，世界！今天天气很好。", "한국어 문장입니다",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "Ünïcödé naïve café", "e\u0301 combining",
    "emoji 🤗🚀 👍🏽 👨‍👩‍👧‍👦 🇯🇵 🏳️‍🌈", "zero\u200bwidth\u200djoiner", "\ufeffbom",
    "", " ", "  ", "\t", "\n", "\n\n\n", "\r\n", "   leading", "trailing   ",
    " \t mixed \r\n ws \n", "a" * 300, "ab " * 100, "<|im_start|>user\nhi<|im_end|>\n",
    "a<|endoftext|>b", "<s>[INST]x</s>",
    "1234567890 3.14159 1e10 0xFF", "\u2581metaspace\u2581char", "\ufffd replacement char",
]
CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Answer in Japanese."},
     {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "四です。"},
     {"role": "user", "content": "And 🤗 times 3?  "}],
    [{"role": "user", "content": "No system prompt here.\n\nTwo paragraphs."},
     {"role": "assistant", "content": " spaced "}, {"role": "user", "content": "مرحبا"}],
]
MODELS = ["byte_level", "byte_fallback", "unigram", "smollm2"]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {"smollm2": smollm2_dir} | {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def cores(model_dirs: dict[str, Path]) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_dir(path) for name, path in model_dirs.items()}


@pytest.fixture(scope="session")
def references(model_dirs: dict[str, Path]) -> dict[str, object]:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path) for name, path in model_dirs.items()}


@pytest.fixture(scope="session")
def gguf_reference(smollm2_gguf: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


_HARD: dict[int, list[int]] = {}
_CLEANUP_PIECES = {"", ".", "?", "!", ",", "'", "n", "n'", "n't", "'t", "'s", "'m", "'ve", "'re"}


def hard_ids(tokenizer: Tokenizer) -> list[int]:
    """Specials, byte tokens, pieces of characters, and the pieces of transformers' cleanup."""
    if id(tokenizer) not in _HARD:
        ids = list(range(tokenizer._backend.get_vocab_size()))
        texts = tokenizer._backend.decode_batch([[i] for i in ids])
        _HARD[id(tokenizer)] = sorted(
            tokenizer._special_ids | tokenizer._byte_ids
            | {i for i, t in zip(ids, texts, strict=True)
               if "\ufffd" in t or t.strip(" \u2581") in _CLEANUP_PIECES})
    return _HARD[id(tokenizer)]


def random_ids(tokenizer: Tokenizer, rng: random.Random, count: int) -> list[int]:
    """Ids biased towards the hard cases (`hard_ids`)."""
    hard, size = hard_ids(tokenizer), tokenizer.info.vocab_size
    return [rng.choice(hard) if rng.random() < 0.5 else rng.randrange(size)
            for _ in range(count)]


@pytest.mark.parametrize("name", MODELS)
def test_encode_and_decode_equal_transformers(name: str, cores: dict, references: dict) -> None:
    core, ref = cores[name], references[name]
    for special in (True, False):
        ids = core.encode_batch([EncodeInput(text=t, add_special_tokens=special) for t in TEXTS])
        assert ids == [ref.encode(t, add_special_tokens=special) for t in TEXTS]
        for skip in (True, False):
            assert core.decode_batch(ids, skip) == [ref.decode(i, skip_special_tokens=skip)
                                                    for i in ids]
    rng = random.Random(name)
    for _ in range(200):  # decoding arbitrary ids: broken UTF-8, specials anywhere
        ids = random_ids(core, rng, rng.randrange(1, 12))
        ids = [i for i in ids if i < len(ref)]
        for skip in (True, False):
            assert core.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("name", ["byte_level", "byte_fallback", "smollm2"])
def test_chat_equals_apply_chat_template(name: str, cores: dict, references: dict) -> None:
    core, ref = cores[name], references[name]
    for chat in CHATS:
        if name == "byte_fallback" and chat[-1]["role"] != "user":
            continue
        for generation in (True, False):
            text = ref.apply_chat_template(chat, tokenize=False,
                                           add_generation_prompt=generation)
            assert core.render_chat(chat, generation) == text
            assert core.encode_chat(chat, generation) == ref.apply_chat_template(
                chat, add_generation_prompt=generation, return_dict=False)
            assert core.encode_chat(chat, generation, add_special_tokens=True) == ref.encode(
                text, add_special_tokens=True)


def test_smollm2_equals_transformers_on_the_gguf(cores: dict, gguf_reference) -> None:
    core, ref = cores["smollm2"], gguf_reference
    ids = core.encode_batch([EncodeInput(text=t) for t in TEXTS])
    assert ids == [ref.encode(t) for t in TEXTS]
    for skip in (True, False):
        assert core.decode_batch(ids, skip) == [ref.decode(i, skip_special_tokens=skip)
                                                for i in ids]
    for chat in CHATS:
        assert core.encode_chat(chat) == ref.apply_chat_template(
            chat, add_generation_prompt=True, return_dict=False)
        assert core.render_chat(chat, False) == ref.apply_chat_template(chat, tokenize=False)


def test_info(cores: dict) -> None:
    smol = cores["smollm2"].info
    assert (smol.vocab_size, smol.bos_token_id, smol.eos_token_ids) == (49152, 1, (2,))
    assert smol.has_chat_template and smol.end_of_turn_token_ids == ()
    tiny = cores["byte_level"]
    assert tiny.info.vocab_size == tiny._backend.get_vocab_size() + 12  # config.json's
    assert tiny.info.bos_token_id is None and tiny.info.eos_token_ids == (0,)
    assert tiny.info.end_of_turn_token_ids == (tiny._backend.token_to_id("<|im_end|>"),)
    spm = cores["byte_fallback"].info
    assert (spm.bos_token_id, spm.eos_token_ids, spm.has_chat_template) == (1, (2,), True)
    assert not cores["unigram"].info.has_chat_template


def test_bad_input_is_refused_with_a_message_naming_it(model_dirs: dict, cores: dict) -> None:
    core = Tokenizer.from_dir(model_dirs["byte_level"], max_text_chars=100)
    limit = core.info.vocab_size
    cases = [
        (lambda: core.decode([5, limit]), f"token id {limit} at position 1 is outside"),
        (lambda: core.decode([-1]), "token id -1 at position 0"),
        (lambda: core.encode_chat([]), "the chat has no messages"),
        (lambda: core.encode_chat([{"role": "wizard", "content": "x"}]), "unknown role 'wizard'"),
        (lambda: core.encode_chat([{"role": "tool", "content": "x"}]),
         "chat template failed to render: TemplateError: unknown role tool"),
        (lambda: core.encode("x" * 101), "101 characters, more than the limit of 100"),
        (lambda: core.encode_chat([{"role": "user", "content": "x" * 101}]), "101 characters"),
        (lambda: core.encode_batch([EncodeInput(text="ok"), EncodeInput()]),
         "item 1: give exactly one of a text and chat messages"),
        (lambda: core.detokenize_step([1, 2], 2, 1), "prefix_offset (2) <= read_offset (1)"),
        (lambda: core.detokenize_step([1, 2], 0, 3), "<= the number of token ids (2)"),
        (lambda: cores["unigram"].encode_chat(CHATS[0]), "the model has no chat template"),
        (lambda: cores["byte_fallback"].encode_chat([CHATS[2][0], CHATS[2][0]]),
         "roles must alternate"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            call()
    assert core.decode([5, limit - 1]) == core.decode([5])  # padding ids decode to nothing


def test_unloadable_directories_are_refused(tmp_path: Path, model_dirs: dict) -> None:
    with pytest.raises(CheckpointError, match=r"has no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json cannot be loaded"):
        Tokenizer.from_dir(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((model_dirs["unigram"] / "tokenizer.json").read_bytes())
    (broken / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(CheckpointError, match="chat template does not compile"):
        Tokenizer.from_dir(broken)


def stream(core: Tokenizer, ids: list[int], cuts: list[int], skip: bool, context: int = 0,
           rng: random.Random | None = None) -> list[str]:
    """Detokenize `ids` as a router would: new tokens arrive in chunks ending at `cuts`, the
    window sent starts anywhere at or before the prefix offset, and a final call flushes."""
    prefix = 0
    read = context
    deltas = []
    for end in [*cuts, len(ids)]:
        start = rng.randint(0, prefix) if rng else 0
        result = core.detokenize_step(ids[start:end], prefix - start, read - start,
                                      skip_special_tokens=skip, flush=end == len(ids))
        deltas.append(result.text)
        prefix, read = result.prefix_offset + start, result.read_offset + start
    return deltas


@pytest.mark.parametrize("name", MODELS)
def test_streaming_real_text_token_by_token(name: str, cores: dict) -> None:
    core = cores[name]
    for text in TEXTS:
        ids = core.encode(text)
        for skip in (True, False):
            deltas = stream(core, ids, list(range(1, len(ids))), skip)
            assert "".join(deltas) == core.decode(ids, skip)
            assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


@pytest.mark.parametrize("name", MODELS)
def test_streaming_after_a_prompt_keeps_word_initial_spaces(name: str, cores: dict) -> None:
    core, ran = cores[name], 0
    for prompt, answer in [("The quick", " brown fox jumps"), ("Say:", " 日本語 🤗 ok"),
                           ("a\n", "  indented\tcode")]:
        prompt_ids, ids = core.encode(prompt), core.encode(prompt + answer)
        if ids[:len(prompt_ids)] != prompt_ids:
            continue  # the tokenizer merges across the boundary: not a real generation
        context = prompt_ids[-5:]
        generated = ids[len(prompt_ids):]
        full = context + generated
        deltas = stream(core, full, list(range(len(context) + 1, len(full))), True, len(context))
        expected = core.decode(full, True)[len(core.decode(context, True)):]
        assert "".join(deltas) == expected
        assert expected.endswith(answer.lstrip() if name == "unigram" else answer)
        ran += 1
    assert ran >= 2


def test_byte_fallback_runs_wait_until_they_end(cores: dict) -> None:
    core = cores["byte_fallback"]
    han = [core._backend.token_to_id(f"<0x{b:02X}>") for b in "漢".encode()]
    word = core.encode("ok", add_special_tokens=False)
    assert [core.detokenize_step(han[:k], 0, 0).text for k in (1, 2, 3)] == ["", "", ""]
    done = core.detokenize_step(han + word, 0, 0)
    assert done.text == "漢 ok"
    # a byte that breaks the run turns the whole run into U+FFFD, which was never half-emitted
    broken = [*han, core._backend.token_to_id("<0x80>")]
    assert core.detokenize_step(broken, 0, 0).text == ""
    assert core.detokenize_step(broken + word, 0, 0).text == "\ufffd" * 4 + " ok"
    assert core.detokenize_step(han, 0, 0, flush=True).text == "漢"


def test_byte_level_emoji_is_emitted_whole(cores: dict) -> None:
    core = cores["smollm2"]
    ids = core.encode("🤗")
    assert len(ids) > 1
    outputs = [core.detokenize_step(ids[:k], 0, 0).text for k in range(1, len(ids) + 1)]
    assert outputs == [""] * (len(ids) - 1) + ["🤗"]


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_deltas_add_up_to_the_whole_decode(name: str, cores: dict, references: dict,
                                           data: st.DataObject) -> None:
    """...less a character cut short at the very end (see `flushed`)."""
    core = cores[name]
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = random.Random(seed)
    ids = random_ids(core, rng, data.draw(st.integers(0, 24), label="length"))
    cuts = sorted(data.draw(st.sets(st.integers(0, len(ids)), max_size=len(ids)), label="cuts"))
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    deltas = stream(core, ids, cuts, skip, rng=rng)
    whole = flushed(name, core, references[name], ids, skip)
    assert "".join(deltas) == whole
    if "\ufffd" not in whole:
        assert not any("\ufffd" in d for d in deltas)


def flushed(name: str, core: Tokenizer, reference: object, ids: list[int], skip: bool) -> str:
    """The whole text of a finished sequence: its decode, less the first bytes of a character
    whose last bytes never came, found in the raw bytes of transformers' tokens."""
    kept = [i for i in ids if not (skip and i in core._special_ids)]
    # None: an id past the vocabulary (within the model's embedding), which decodes to nothing
    tokens = [t or "" for t in reference.convert_ids_to_tokens(kept)]  # type: ignore
    if name in ("byte_level", "smollm2"):
        raw = byte_level_bytes(tokens)
        assert core.decode(ids, skip) == raw.decode("utf-8", errors="replace")  # same reading
        return without_cut_character(raw)
    if name == "byte_fallback":  # whole characters, or one byte per <0xXX> token
        raw = b"".join(bytes([int(t[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-F]{2}>", t)
                       else t.encode() for t in tokens)
        return core.decode(kept[:len(kept) - cut_bytes(raw)], skip)
    return core.decode(ids, skip)  # no token holds part of a character


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=6) | st.lists(st.sampled_from(
    [b"\x41", b"\x80", b"\x9f", b"\xa0", b"\xbf", b"\xc0", b"\xc2", b"\xdf", b"\xe0", b"\xe4",
     b"\xed", b"\xef", b"\xf0", b"\xf4", b"\xf5", b"\x8f", b"\x90"]), max_size=5).map(b"".join))
def test_a_cut_character_is_found_as_the_brute_force_reference_finds_it(data: bytes) -> None:
    assert incomplete_utf8_tail(data) == cut_bytes(data)


def test_a_completion_cut_inside_a_character_ends_before_it(cores: dict) -> None:
    """SmolLM2 writes 🤗 as three tokens, the first with the space before it: a sequence cut
    after the first or second gets "Hi ", never U+FFFD; a U+FFFD the model wrote is kept."""
    core = cores["smollm2"]
    ids = core.encode("Hi 🤗")
    assert len(ids) == 4 and core.decode(ids[:2]) == "Hi \ufffd"
    for end in (2, 3):
        assert core.detokenize_step(ids[:end], 0, 1, flush=True).text == " "
        assert core.detokenize_batch([DetokenizeInput(ids[:end], 0, 0, True)]) == \
            [Detokenized("Hi ", 0, end)]
    assert core.detokenize_step(ids, 0, 1, flush=True).text == " 🤗"
    genuine = core.encode("a\ufffd")
    assert core.detokenize_step(genuine, 0, 0, flush=True).text == "a\ufffd"
    fallback = cores["byte_fallback"]
    han = [fallback._backend.token_to_id(f"<0x{b:02X}>") for b in "漢".encode()]
    ok = fallback.encode("ok", add_special_tokens=False)
    assert fallback.detokenize_step(ok + han[:2], 0, 0, flush=True).text == fallback.decode(ok)
    assert fallback.detokenize_step(han[:1], 0, 0, flush=True).text == ""


def test_batched_detokenization_equals_one_by_one(cores: dict) -> None:
    core = cores["smollm2"]
    rng = random.Random(7)
    items = []
    for _ in range(64):
        ids = random_ids(core, rng, rng.randrange(1, 20))
        read = rng.randrange(len(ids) + 1)
        items.append(DetokenizeInput(ids, rng.randrange(read + 1), read, rng.random() < 0.2))
    batch = core.detokenize_batch(items, True)
    assert batch == [core.detokenize_step(i.token_ids, i.prefix_offset, i.read_offset,
                                          skip_special_tokens=True, flush=i.flush) for i in items]
