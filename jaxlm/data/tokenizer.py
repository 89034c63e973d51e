"""Sentencepiece tokenizers: train one on a corpus and cache it, or load a given `.model` file."""

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


def train(docs: list[str], vocab_size: int, model_type: str, path: str) -> None:
    """Trains a sentencepiece model with byte fallback, and writes it atomically to `path`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, character_coverage=0.9995, split_digits=True, normalization_rule_name="identity",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1,
        train_extremely_large_corpus=False, minloglevel=2,
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as tmp:
        tmp.write(model.getvalue())
    os.replace(tmp.name, path)


def load(path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer {path} does not exist; leave data.tokenizer empty to train one")
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
