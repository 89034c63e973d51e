"""Quality filters in the spirit of Gopher (Rae et al. 2021) and C4, plus language ID.

`check` returns the name of the first rule a document fails, or None to keep it. Length and repetition
rules count units (`jaxlm.data.prepare.units`): words, or single characters in CJK text, so that a Chinese
article is not "one enormous word". The mean-word-length rule applies only to text that is mostly
space-separated. Language ID is py3langid (the langid.py model, shipped inside the package, numpy only).
"""

from __future__ import annotations

import collections
import functools

from jaxlm.core.config import PrepareConfig
from jaxlm.data.prepare.units import cjk_fraction, ngrams, units

LANGID_CHARS = 1000  # the first characters decide as well as the whole of a long document, much faster


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


# The model tells Chinese varieties apart (Wu, Cantonese, ...) on written Chinese that readers would call
# simply Chinese; their probabilities are summed under "zh".
_MERGED = {"wuu": "zh", "yue": "zh", "gan": "zh", "hak": "zh", "nan": "zh", "lzh": "zh", "cmn": "zh"}


def language(text: str) -> tuple[str, float]:
    """The most likely language of `text` as (ISO 639 code, probability)."""
    probs: dict[str, float] = collections.defaultdict(float)
    for lang, prob in _identifier().rank(text[:LANGID_CHARS]):
        probs[_MERGED.get(lang, lang)] += float(prob)
    return max(probs.items(), key=lambda kv: kv[1])


def _covered_fraction(words: list[str], grams: list[tuple[str, ...]], selected) -> float:
    """Fraction of the characters of `words` that lie inside the n-grams whose index is in `selected`."""
    total = sum(len(w) for w in words)
    if not total or not grams:
        return 0.0
    n = len(grams[0])
    covered = [False] * len(words)
    for i in selected:
        covered[i : i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / total


def check(text: str, c: PrepareConfig) -> str | None:
    words = units(text)
    if len(words) < c.min_words:
        return "too_short"
    if len(words) > c.max_words:
        return "too_long"
    cjk = cjk_fraction(text, len(words))
    if cjk < 0.5:
        mean = sum(len(w) for w in words) / len(words)
        if not c.min_mean_word_len <= mean <= c.max_mean_word_len:
            return "mean_word_length"
    visible = len(text) - sum(map(str.isspace, text))
    if sum(map(str.isalnum, text)) < c.min_alnum_ratio * visible:
        return "alnum_ratio"
    if (text.count("#") + text.count("...") + text.count("…")) > c.max_symbol_ratio * len(words):
        return "symbol_ratio"
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > c.max_dup_line_frac:
        return "duplicate_lines"
    # Chinese characters repeat far more than English words do ("中国", "人民"), so for CJK text the
    # repetition rules look at 2x longer n-grams, roughly one Chinese word per English word.
    scale = 2 if cjk >= 0.5 else 1
    bigrams = ngrams(words, 2 * scale)
    if bigrams:
        top, _ = collections.Counter(bigrams).most_common(1)[0]
        if _covered_fraction(words, bigrams, [i for i, g in enumerate(bigrams) if g == top]) > c.max_top_ngram_frac:
            return "top_ngram"
    fives = ngrams(words, 5 * scale)
    seen, repeated = set(), []
    for i, g in enumerate(fives):
        if g in seen:
            repeated.append(i)
        seen.add(g)
    if _covered_fraction(words, fives, repeated) > c.max_dup_ngram_frac:
        return "duplicate_ngrams"
    if c.languages:
        lang, prob = language(text)
        if lang not in c.languages or prob < c.min_language_prob:
            return "language"
    return None
