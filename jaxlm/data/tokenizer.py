"""Tokenizers: train a sentencepiece model on a corpus and cache it, or load a given sentencepiece `.model`
or Hugging Face `tokenizer.json` (through the `tokenizers` package).

Both kinds answer the sentencepiece calls the pipeline makes: encode(list of str), bos_id(), eos_id(),
vocab_size(). A tokenizer is identified by the SHA-256 of its file (`file_hash`), which prepared data
records in its manifest.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile

import sentencepiece as spm

from jaxlm.config import ConfigError

log = logging.getLogger(__name__)


def corpus_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def train(docs, vocab_size: int, model_type: str, path: str, max_sentences: int = 0) -> None:
    """Trains a sentencepiece model and writes it atomically to `path`.

    Settings that suit CJK as well as English: byte fallback (no unknown tokens, any script), 99.95%
    character coverage (rare Han characters fall back to bytes instead of bloating the vocabulary),
    digits split one per token, no normalisation (data preparation already did it). `max_sentences`
    > 0 trains on a random sample of that many documents.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), input_sentence_size=max_sentences, shuffle_input_sentence=True, model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, character_coverage=0.9995, split_digits=True, normalization_rule_name="identity",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as tmp:
        tmp.write(model.getvalue())
    os.replace(tmp.name, path)


def load(path: str):
    """A sentencepiece processor for a `.model` file, an HFTokenizer for a `.json` file."""
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer {path} does not exist; leave data.tokenizer empty to train one")
    if path.endswith(".json"):
        from jaxlm.hf.tokenizer import HFTokenizer

        tok = HFTokenizer(path)
        if tok.eos_id() < 0:
            raise ConfigError(f"tokenizer {path} names no end-of-text token (eos_token in tokenizer_config.json or "
                              "eos_token_id in config.json); documents could not be separated")
        return tok
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"tokenizer {path} is not a sentencepiece model ({e})") from None


def get(docs: list[str], vocab_size: int, model_type: str, given: str, cache_dir: str) -> tuple[spm.SentencePieceProcessor, str]:
    """Returns (tokenizer, its path): the given model, or one trained on `docs` and cached by content."""
    if given:
        return load(given), given
    key = f"{corpus_hash(docs)}-{model_type}-{vocab_size}"
    path = os.path.join(os.path.expanduser(cache_dir), "tokenizers", f"{key}.model")
    if not os.path.isfile(path):
        log.info("training a %d-piece %s sentencepiece tokenizer on %d documents", vocab_size, model_type, len(docs))
        try:
            train(docs, vocab_size, model_type, path)
        except RuntimeError as e:
            raise ConfigError(f"sentencepiece could not train a {vocab_size}-piece tokenizer: {e}") from None
    return load(path), path
