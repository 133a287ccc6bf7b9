"""The bytes behind tokens' strings, and UTF-8 characters cut short.

A generation cut by max_tokens can end inside a character: its first bytes came, the rest never
will. `incomplete_utf8_tail` finds them (by the well-formedness table, not by decoding, so bytes
that can never be a character are not mistaken for a cut one); `BYTE_LEVEL_CHARS` reads a
ByteLevel (GPT-2 style) token's string back into its bytes.
"""

from __future__ import annotations


def _gpt2_bytes() -> dict[str, int]:
    """The ByteLevel alphabet: the character that stands for each byte in a token's string
    (GPT-2's bytes_to_unicode), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(shifted)}


BYTE_LEVEL_CHARS = _gpt2_bytes()


# Well-formed UTF-8 (Unicode Table 3-7): a lead byte's length and the range of its second byte
# (every later byte is 80-BF).
_UTF8_LEADS = {lead: (2, 0x80, 0xBF) for lead in range(0xC2, 0xE0)} \
    | {lead: (3, 0x80, 0xBF) for lead in range(0xE0, 0xF0)} \
    | {lead: (4, 0x80, 0xBF) for lead in range(0xF0, 0xF5)} \
    | {0xE0: (3, 0xA0, 0xBF), 0xED: (3, 0x80, 0x9F), 0xF0: (4, 0x90, 0xBF), 0xF4: (4, 0x80, 0x8F)}


def incomplete_utf8_tail(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 character that they do not finish
    (0 when it ends in a whole character or in bytes that can never be one)."""
    for k in range(1, min(3, len(data)) + 1):
        byte = data[-k]
        if 0x80 <= byte <= 0xBF:  # a continuation byte: its lead is further back
            continue
        length, low, high = _UTF8_LEADS.get(byte, (0, 0, 0))
        rest = data[len(data) - k + 1:]
        if k >= length or (rest and not low <= rest[0] <= high):
            return 0
        return k
    return 0
