"""A brute-force reference for text cut inside a UTF-8 character (tests only).

`CUT_PREFIXES` is every proper prefix of the UTF-8 encoding of every Unicode scalar value, built
by encoding them all (~1.1 M); `without_cut_character` drops such a prefix at the end of a byte
string, then decodes it as the tokenizers library does (invalid bytes become U+FFFD)."""

from __future__ import annotations

from functools import cache


@cache
def cut_prefixes() -> frozenset[bytes]:
    prefixes = set()
    for code in range(0x80, 0x110000):
        if not 0xD800 <= code < 0xE000:
            encoded = chr(code).encode()
            prefixes.update(encoded[:j] for j in range(1, len(encoded)))
    return frozenset(prefixes)


def cut_bytes(data: bytes) -> int:
    """How many bytes at the end of `data` are a character's beginning without its end."""
    return next((k for k in (3, 2, 1) if len(data) >= k and data[-k:] in cut_prefixes()), 0)


def without_cut_character(data: bytes) -> str:
    return data[:len(data) - cut_bytes(data)].decode("utf-8", errors="replace")


def byte_level_bytes(tokens: list[str]) -> bytes:
    """The bytes behind ByteLevel (GPT-2 style) token strings, by transformers' own table."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = {c: b for b, c in bytes_to_unicode().items()}
    return b"".join(bytes(chars[c] for c in t) if all(c in chars for c in t) else t.encode()
                    for t in tokens)
