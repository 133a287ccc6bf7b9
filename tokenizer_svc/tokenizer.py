"""Text ↔ token ids for one model, on the `tokenizers` library, equal to `transformers`' tokenizer.

Encode (plain text, or chat messages rendered with the model's chat template), decode, and
stateless incremental detokenization (`detokenize_step`, vLLM/TGI style) that never emits text a
later token would change:

* a window `ids[prefix_offset:read_offset]` of already emitted tokens is decoded with the new ones,
  so the new text is what they add *in context* (word-initial spaces of sentencepiece vocabularies
  come out right, and a window never starts inside a character);
* text ending in U+FFFD (an incomplete UTF-8 character of byte-level tokens) waits for more tokens;
* a trailing run of byte-fallback tokens (`<0xE4>`) waits until the run ends, because the
  tokenizers' ByteFallback decoder turns the whole run into U+FFFDs if any byte of it is invalid;
* with cleanup of tokenization spaces (non-BPE vocabularies), text ending where a cleanup pattern
  could still match (" ", " n", ...) waits.

So the deltas of one sequence always add up to `decode` of the whole of it, and `flush=True` emits
whatever is still pending when the sequence ends, but for an incomplete UTF-8 character at the
very end (a generation cut by max_tokens inside a character): those bytes are dropped, as vLLM
and llama.cpp do, rather than sent as U+FFFD. A U+FFFD the model really wrote (its three bytes,
or bytes that can never be a character) is kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from services.errors import InvalidArgument
from tokenizer_svc.chat_template import DEFAULT_ROLES, ChatTemplate
from tokenizer_svc.model_files import ModelFiles, build_backend, read_model_files
from tokenizer_svc.token_bytes import BYTE_LEVEL_CHARS, incomplete_utf8_tail

DEFAULT_MAX_TEXT_CHARS = 1 << 18  # 262,144 characters: about 64k tokens of English
# Tokens that end an assistant's turn in the chat formats we know; one counts when the model's chat
# template writes it.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                       "<|end_of_turn|>", "<|END_OF_TURN_TOKEN|>", "<|endofturn|>")
# transformers' `clean_up_tokenization`, in its order
CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# text ending in one of these can still change when the next token's text arrives
_CLEANUP_PENDING = tuple({p[:k] for p, _ in CLEANUP for k in range(1, len(p))})
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int  # the model's (config.json) when known, else the tokenizer's
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    end_of_turn_token_ids: tuple[int, ...]  # beyond eos_token_ids
    has_chat_template: bool
    model_name: str


@dataclass(frozen=True)
class EncodeInput:
    """Exactly one of `text` and `messages` ({"role", "content"} mappings)."""

    text: str | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # None: True for text, False for chat


class DetokenizeInput(NamedTuple):  # tuples: a batch of 64 is built and read in every step
    token_ids: Sequence[int]
    prefix_offset: int
    read_offset: int
    flush: bool = False


class Detokenized(NamedTuple):
    text: str
    prefix_offset: int
    read_offset: int


class Tokenizer:
    """One model's tokenizer; thread-safe, holds no per-request state."""

    def __init__(self, files: ModelFiles, *, model_name: str,
                 max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
                 chat_roles: Iterable[str] = DEFAULT_ROLES) -> None:
        if max_text_chars < 1:
            raise ValueError(f"max_text_chars must be positive, got {max_text_chars}")
        self.max_text_chars = max_text_chars
        self._backend = build_backend(files)
        is_bpe = type(self._backend.model).__name__ == "BPE"
        self._cleanup = files.clean_up_tokenization_spaces and (
            not is_bpe or files.clean_up_even_for_bpe)

        vocab = self._backend.get_vocab(with_added_tokens=True)
        self._id_limit = max(max(vocab.values(), default=-1) + 1, files.model_vocab_size or 0)
        added = self._backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._byte_ids = frozenset(
            i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t)) \
            if "ByteFallback" in repr(self._backend.decoder) else frozenset()
        self._byte_level = "ByteLevel" in repr(self._backend.decoder)

        special = files.special_tokens
        self._chat = ChatTemplate(files.chat_template, special, chat_roles) \
            if files.chat_template is not None else None
        literal = self._chat.literal_text() if self._chat else ""
        bos = self._token_id(special.get("bos_token"))
        eos = tuple(dict.fromkeys(
            [i for i in [self._token_id(special.get("eos_token"))] if i is not None]
            + list(files.model_eos_token_ids)))
        turn = [self._token_id(m) for m in END_OF_TURN_MARKERS if m in literal]
        self.info = TokenizerInfo(
            vocab_size=files.model_vocab_size or self._backend.get_vocab_size(True),
            bos_token_id=bos if bos is not None else files.model_bos_token_id,
            eos_token_ids=eos,
            end_of_turn_token_ids=tuple(i for i in turn if i is not None and i not in eos),
            has_chat_template=self._chat is not None,
            model_name=model_name)

    @classmethod
    def from_dir(cls, model_dir: Path | str, *, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
                 chat_roles: Iterable[str] = DEFAULT_ROLES,
                 model_name: str | None = None) -> Tokenizer:
        """Load `tokenizer.json` and its companions from a Hugging Face model directory."""
        model_dir = Path(model_dir)
        return cls(read_model_files(model_dir), model_name=model_name or model_dir.name,
                   max_text_chars=max_text_chars, chat_roles=chat_roles)

    # ---- encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([EncodeInput(text=text, add_special_tokens=add_special_tokens)])[0]

    def render_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, as `apply_chat_template(..., tokenize=False)`."""
        if self._chat is None:
            raise InvalidArgument("the model has no chat template: send plain text")
        chars = sum(len(m["content"]) for m in messages)
        if chars > self.max_text_chars:
            raise InvalidArgument(f"the chat has {chars} characters of content, more than the "
                                  f"limit of {self.max_text_chars}")
        return self._chat.render(messages, add_generation_prompt)

    def encode_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True,
                    add_special_tokens: bool = False) -> list[int]:
        return self.encode_batch([EncodeInput(
            messages=messages, add_generation_prompt=add_generation_prompt,
            add_special_tokens=add_special_tokens)])[0]

    def encode_batch(self, items: Sequence[EncodeInput]) -> list[list[int]]:
        """Token ids of each item; `InvalidArgument` naming the first bad item."""
        texts: dict[bool, list[tuple[int, str]]] = {True: [], False: []}
        index = 0
        try:
            for index, item in enumerate(items):
                text, special = self._prompt(item)
                texts[special].append((index, text))
        except InvalidArgument as e:  # the template's, or a limit's: name the item
            raise InvalidArgument(f"item {index}: {e}") from None
        out: list[list[int]] = [[] for _ in items]
        for special, group in texts.items():
            if group:
                encodings = self._backend.encode_batch_fast(
                    [t for _, t in group], add_special_tokens=special)
                for (index, _), encoding in zip(group, encodings, strict=True):
                    out[index] = encoding.ids
        return out

    def _prompt(self, item: EncodeInput) -> tuple[str, bool]:
        if (item.text is None) == (item.messages is None):
            raise InvalidArgument("give exactly one of a text and chat messages")
        if item.text is not None:
            if len(item.text) > self.max_text_chars:
                raise InvalidArgument(f"the text has {len(item.text)} characters, more than the "
                                      f"limit of {self.max_text_chars}")
            special = True if item.add_special_tokens is None else item.add_special_tokens
            return item.text, special
        assert item.messages is not None
        text = self.render_chat(item.messages, item.add_generation_prompt)
        return text, bool(item.add_special_tokens)

    # ---- decoding

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.decode_batch([token_ids], skip_special_tokens)[0]

    def decode_batch(self, sequences: Sequence[Sequence[int]],
                     skip_special_tokens: bool = False) -> list[str]:
        lists = [list(ids) for ids in sequences]
        for index, ids in enumerate(lists):
            self._check_ids(ids, index)
        return self._decode(lists, skip_special_tokens)

    def detokenize_step(self, token_ids: Sequence[int], prefix_offset: int, read_offset: int,
                        *, skip_special_tokens: bool = False,
                        flush: bool = False) -> Detokenized:
        """The text `token_ids[read_offset:]` adds, and the offsets for the next step."""
        step = DetokenizeInput(token_ids, prefix_offset, read_offset, flush)
        return self.detokenize_batch([step], skip_special_tokens)[0]

    def detokenize_batch(self, items: Sequence[DetokenizeInput],
                         skip_special_tokens: bool = False) -> list[Detokenized]:
        """One `detokenize_step` per item, decoded together in one library call."""
        olds: list[list[int]] = []
        news: list[list[int]] = []
        ends: list[int] = []
        for index, (token_ids, p, r, flush) in enumerate(items):
            ids = list(token_ids)
            if not 0 <= p <= r <= len(ids):
                raise InvalidArgument(
                    f"item {index}: offsets must satisfy 0 <= prefix_offset ({p}) <= "
                    f"read_offset ({r}) <= the number of token ids ({len(ids)})")
            self._check_ids(ids, index)
            end = len(ids) if flush else self._stable_end(ids, r, skip_special_tokens)
            olds.append(ids[p:r])
            news.append(ids[p:end])
            ends.append(end)
        texts = self._decode(olds + news, skip_special_tokens)
        n, cleanup, results = len(items), self._cleanup, []
        for k, (token_ids, p, r, flush) in enumerate(items):
            old, new, end = texts[k], texts[n + k], ends[k]
            if flush and new.endswith("\ufffd"):
                new = self._without_broken_tail(list(token_ids), p, r, new, skip_special_tokens)
            if flush or (end > r and len(new) > len(old) and not new.endswith("\ufffd")
                         and not (cleanup and new.endswith(_CLEANUP_PENDING))):
                results.append(Detokenized(new[len(old):], r, end))
            else:
                results.append(Detokenized("", p, r))
        return results

    def _without_broken_tail(self, ids: list[int], prefix_offset: int, read_offset: int,
                             text: str, skip_special: bool) -> str:
        """`text`, the decode of `ids[prefix_offset:]`, less an incomplete UTF-8 character at
        its end (the tokens' last bytes, read from the vocabulary)."""
        tail, kept = b"", []  # the last bytes, and the tokens (from the end) they come from
        for i in reversed(range(read_offset, len(ids))):
            if skip_special and ids[i] in self._special_ids:
                continue
            tail = self._token_bytes(ids[i]) + tail
            kept.append(i)
            if len(tail) >= 4:
                break
        broken = incomplete_utf8_tail(tail)
        if not broken:
            return text
        if self._byte_level:  # one U+FFFD stands for the incomplete character (from_utf8_lossy)
            return text[:-1]
        # Byte-fallback: a byte token each, whose run decodes as a whole: decode without them.
        end = max(kept[broken - 1], read_offset)
        return self._decode([ids[prefix_offset:end]], skip_special)[0]

    def _token_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to the text (exact for byte tokens and ByteLevel
        vocabularies; other tokens are whole characters)."""
        token = self._backend.id_to_token(token_id) or ""
        if token_id in self._byte_ids:
            return bytes([int(token[3:5], 16)])
        if self._byte_level and all(c in BYTE_LEVEL_CHARS for c in token):
            return bytes(BYTE_LEVEL_CHARS[c] for c in token)
        return token.encode()

    def _stable_end(self, ids: list[int], read_offset: int, skip_special: bool) -> int:
        """End of the tokens whose text no later token can change: before a trailing run of
        byte-fallback tokens (and the skipped special tokens inside it)."""
        if not self._byte_ids or not ids or (ids[-1] not in self._byte_ids and not skip_special):
            return len(ids)
        end, has_bytes = len(ids), False
        while end > read_offset:
            token = ids[end - 1]
            if token in self._byte_ids:
                has_bytes = True
            elif not (skip_special and token in self._special_ids):
                break
            end -= 1
        return end if has_bytes else len(ids)

    def _decode(self, sequences: list[list[int]], skip_special_tokens: bool) -> list[str]:
        texts = self._backend.decode_batch(sequences, skip_special_tokens=skip_special_tokens)
        return [_clean_up(t) for t in texts] if self._cleanup else list(texts)

    def _check_ids(self, ids: list[int], index: int) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self._id_limit):
            position, bad = next((k, i) for k, i in enumerate(ids) if not 0 <= i < self._id_limit)
            raise InvalidArgument(f"item {index}: token id {bad} at position {position} is "
                                  f"outside the vocabulary (ids 0 to {self._id_limit - 1})")

    # ---- loading

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)


def _clean_up(text: str) -> str:
    for old, new in CLEANUP:
        text = text.replace(old, new)
    return text
