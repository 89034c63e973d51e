"""Tokenizers: one interface (`Tokenizer`), two backends behind it, and sentencepiece training.

    tok = tokenizer.load("tokenizer.model")          # a sentencepiece model, or a Hugging Face tokenizer.json
    tok = tokenizer.load_for_run(run_dir)            # the run's tokenizer.json, else its tokenizer.model
    ids = [tok.bos_id(), *tok.encode("Hello"), tok.eos_id()]

Every caller speaks `Tokenizer` only; which backend reads a file is decided by its name (`.json`: Hugging
Face `tokenizers`, else sentencepiece), here and nowhere else. The methods follow sentencepiece's names
(bos_id(), vocab_size()...), which is what jaxlm grew up on and what test doubles implement.

A tokenizer is identified by the SHA-256 of its file (`file_hash`), which prepared data records in its
manifest. With no tokenizer given, `get` trains a sentencepiece model on the corpus and caches it by content.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from typing import Iterable, Protocol, Sequence, runtime_checkable

import sentencepiece as spm

from jaxlm.core import atomic, rundir
from jaxlm.core.config import ConfigError

log = logging.getLogger(__name__)


@runtime_checkable
class Tokenizer(Protocol):
    """What jaxlm asks of a tokenizer. Special-token ids are -1 when the tokenizer has no such token."""

    path: str  # the file it was read from
    # True when encode() turns the text of a special token ("<|im_end|>", "<|begin_of_text|>") into its id, as
    # Hugging Face tokenizers do: chat templates that write BOS out then produce it themselves. False for
    # sentencepiece, which encodes such text as ordinary pieces, so a BOS must be prepended as an id.
    special_tokens_in_text: bool

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of each text, faster than one at a time."""

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens left out."""

    def vocab_size(self) -> int: ...

    def bos_id(self) -> int: ...

    def eos_id(self) -> int: ...

    def pad_id(self) -> int: ...

    def unk_id(self) -> int: ...

    def id_to_piece(self, i: int) -> str: ...


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file."""

    special_tokens_in_text = False

    def __init__(self, path: str):
        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"tokenizer {path} is not a sentencepiece model ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def bos_id(self) -> int:
        return self._sp.bos_id()

    def eos_id(self) -> int:
        return self._sp.eos_id()

    def pad_id(self) -> int:
        return self._sp.pad_id()

    def unk_id(self) -> int:
        return self._sp.unk_id()

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)


USUAL_NAMES = {"bos": ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]"),
               "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "[SEP]")}


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None


def tokenizer_config(directory: str) -> dict:
    """The tokenizer_config.json of a Hugging Face tokenizer (its special tokens and chat template), {} when none."""
    return _read_json(os.path.join(directory, rundir.TOKENIZER_CONFIG))


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: "<s>", or {"content": "<s>", ...} in older ones."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`. Its special tokens come from tokenizer_config.json beside it, else the
    model's config.json (or a run's hf_config.json), else their usual names. Models without a BOS token
    (Qwen) start documents with their separator <|endoftext|> (else EOS), as they were pretrained."""

    special_tokens_in_text = True

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizerFile

        self.path = path
        try:
            self._tok = HFTokenizerFile.from_file(path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
            raise ConfigError(f"{path} is not a Hugging Face tokenizer.json ({e})") from None
        directory = os.path.dirname(path)
        tc = tokenizer_config(directory)
        configs = [_read_json(os.path.join(directory, name)) for name in (rundir.HF_CONFIG, "config.json")]
        self._eos, self._pad, self._unk = (self._special_id(k, tc, configs) for k in ("eos", "pad", "unk"))
        bos, separator = self._special_id("bos", tc, configs), self._piece_id("<|endoftext|>")
        self._bos = bos if bos >= 0 else separator if separator >= 0 else self._eos

    def _piece_id(self, piece: str) -> int:
        found = self._tok.token_to_id(piece)
        return -1 if found is None else found

    def _special_id(self, key: str, tc: dict, configs: list[dict]) -> int:
        """The id of the `key` ("bos", "eos"...) token: named by tokenizer_config.json, numbered by a config."""
        name = token_text(tc.get(f"{key}_token"))
        if name is not None and self._piece_id(name) >= 0:
            return self._piece_id(name)
        for cfg in configs:
            value = cfg.get(f"{key}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int):
                return value
        # A bare tokenizer.json (no config beside it): the usual names of the special tokens.
        return next((i for i in map(self._piece_id, USUAL_NAMES.get(key, ())) if i >= 0), -1)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def bos_id(self) -> int:
        return self._bos

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return self._pad

    def unk_id(self) -> int:
        return self._unk

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(i)


def _open(path: str) -> Tokenizer:
    return HFTokenizer(path) if path.endswith(".json") else SentencePieceTokenizer(path)


def load(path: str) -> Tokenizer:
    """The tokenizer in `path` (a `.json` file: Hugging Face, else sentencepiece), for tokenizing training data:
    it must have an end-of-text token, which separates documents."""
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer {path} does not exist; leave data.tokenizer empty to train one")
    tok = _open(path)
    if tok.eos_id() < 0:
        where = " (eos_token in tokenizer_config.json or eos_token_id in config.json)" if path.endswith(".json") else ""
        raise ConfigError(f"tokenizer {path} names no end-of-text token{where}; documents could not be separated")
    return tok


def load_for_run(run_dir: str) -> Tokenizer:
    """The tokenizer of a run (or Hugging Face checkpoint) directory: tokenizer.json when there is one, else
    tokenizer.model."""
    for name in rundir.TOKENIZER_FILES:
        if os.path.isfile(os.path.join(run_dir, name)):
            return _open(os.path.join(run_dir, name))
    raise ConfigError(f"{run_dir} has no tokenizer ({' or '.join(rundir.TOKENIZER_FILES)}); copy the model's "
                      f"tokenizer files into it")


def copy_into(path: str, directory: str) -> str:
    """Copies the tokenizer file `path` into `directory` (a run or prepared data) under the name jaxlm reads
    there, atomically, so that the directory alone is enough to tokenize. Returns the copy's path."""
    dst = os.path.join(directory, rundir.tokenizer_name(path))
    atomic.copy_file(path, dst)
    return dst


def corpus_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def train(docs, vocab_size: int, model_type: str, path: str, max_sentences: int = 0, extra_ids: int = 0) -> None:
    """Trains a sentencepiece model and writes it atomically to `path`.

    Settings that suit CJK as well as English: byte fallback (no unknown tokens, any script), 99.95%
    character coverage (rare Han characters fall back to bytes instead of bloating the vocabulary),
    digits split one per token, no normalisation (data preparation already did it). `max_sentences`
    > 0 trains on a random sample of that many documents. `extra_ids` > 0 makes the last that many of the
    `vocab_size` pieces T5's sentinels, `<extra_id_0>` the very last (`with_extra_ids`).
    """
    if not 0 <= extra_ids < vocab_size // 2:
        raise ConfigError(f"extra ids {extra_ids} must be at least 0 and under half the vocabulary ({vocab_size})")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), input_sentence_size=max_sentences, shuffle_input_sentence=True,
        model_writer=model, vocab_size=vocab_size - extra_ids, model_type=model_type,
        byte_fallback=True, character_coverage=0.9995, split_digits=True, normalization_rule_name="identity",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(with_extra_ids(model.getvalue(), extra_ids))


def with_extra_ids(model: bytes, count: int) -> bytes:
    """A serialised sentencepiece model with `count` pieces `<extra_id_{count-1}>` .. `<extra_id_0>` appended
    (user-defined: each encodes as one piece wherever it appears in text), so that `<extra_id_0>` is the last
    id, as in T5's vocabulary."""
    if not count:
        return model
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    for i in reversed(range(count)):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"<extra_id_{i}>", 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


def get(docs: list[str], vocab_size: int, model_type: str, given: str, cache_dir: str,
        extra_ids: int = 0) -> tuple[Tokenizer, str]:
    """Returns (tokenizer, its path): the given one, or a sentencepiece model trained on `docs` (with
    `extra_ids` T5 sentinels at the end) and cached by content."""
    if given:
        return load(given), given
    key = f"{corpus_hash(docs)}-{model_type}-{vocab_size}" + (f"-x{extra_ids}" if extra_ids else "")
    path = os.path.join(os.path.expanduser(cache_dir), "tokenizers", f"{key}.model")
    if not os.path.isfile(path):
        log.info("training a %d-piece %s sentencepiece tokenizer on %d documents", vocab_size, model_type, len(docs))
        try:
            train(docs, vocab_size, model_type, path, extra_ids=extra_ids)
        except RuntimeError as e:
            raise ConfigError(f"sentencepiece could not train a {vocab_size}-piece tokenizer: {e}") from None
    return load(path), path
