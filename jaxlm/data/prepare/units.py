"""Splitting text into the units that filters, MinHash and decontamination count.

Space-separated scripts split into words; CJK text has no spaces, so each Han, kana or Hangul character
is a unit of its own. Counting "words" this way keeps English rules from misjudging Chinese.
"""

from __future__ import annotations

import regex

# One CJK character, or a run of letters/digits (with inner apostrophes and hyphens) in any other script.
_UNIT = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]|[\p{L}\p{N}\p{M}]+(?:['’\-][\p{L}\p{N}\p{M}]+)*")
_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")


def units(text: str) -> list[str]:
    return _UNIT.findall(text)


def cjk_fraction(text: str, num_units: int) -> float:
    """Share of CJK characters among the `num_units` units of `text` (0 for English, near 1 for Chinese
    prose); every CJK character is a unit of its own, so counting them in the text is enough."""
    return len(_CJK.findall(text)) / num_units if num_units else 0.0


def ngrams(items: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
