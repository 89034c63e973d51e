"""Text normalisation: mojibake repair (ftfy), Unicode NFKC, control characters and whitespace.

ftfy is told not to straighten quotes or touch anything else that is legitimate text; it only undoes
encoding accidents ("Ã©" -> "é") and HTML entities. NFKC then folds compatibility forms (full-width
Latin letters and digits, ligatures, the ideographic space) to their plain forms, except full-width
punctuation (，！？：；（）), which is the ordinary punctuation of Chinese text and is kept as written.
"""

from __future__ import annotations

import re
import unicodedata

import ftfy

_FTFY = ftfy.TextFixerConfig(
    unescape_html="auto", uncurl_quotes=False, fix_latin_ligatures=False, fix_character_width=False,
    fix_line_breaks=True, remove_terminal_escapes=True, normalization=None, explain=False,
)
# C0/C1 controls except tab and newline, plus zero-width spaces and the byte-order mark.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
_FULLWIDTH_PUNCT = re.compile(r"([\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65])")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    text = ftfy.fix_text(text, _FTFY)
    parts = _FULLWIDTH_PUNCT.split(text)  # odd indices are the kept punctuation
    text = "".join(p if i % 2 else unicodedata.normalize("NFKC", p) for i, p in enumerate(parts))
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()
