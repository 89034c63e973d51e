"""Hugging Face tokenizers in a run directory: which files travel with a model, and a `tokenizer.json`
reader with the sentencepiece-style methods the rest of jaxlm calls (encode, decode, bos_id, eos_id...)."""

from __future__ import annotations

import json
import os
import shutil

from jaxlm.config import ConfigError

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
# Everything a Hugging Face tokenizer (and generation) may need, copied as-is in both directions.
FILES = (TOKENIZER_JSON, SENTENCEPIECE, TOKENIZER_CONFIG, CHAT_TEMPLATE, "special_tokens_map.json",
         "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json")


def copy_files(src: str, dst: str) -> str | None:
    """Copies the tokenizer files of `src` into `dst` (each atomically). Returns the file jaxlm reads
    (tokenizer.json, else tokenizer.model), or None when `src` has neither."""
    for name in FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            tmp = os.path.join(dst, f"{name}.tmp.{os.getpid()}")
            shutil.copyfile(path, tmp)
            os.replace(tmp, os.path.join(dst, name))
    for name in (TOKENIZER_JSON, SENTENCEPIECE):
        if os.path.isfile(os.path.join(dst, name)):
            return name
    return None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None


def chat_template(directory: str) -> str | None:
    """The model's chat template (jinja source): chat_template.jinja, else tokenizer_config.json's entry."""
    path = os.path.join(directory, CHAT_TEMPLATE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = _read_json(os.path.join(directory, TOKENIZER_CONFIG)).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


USUAL_NAMES = {"bos": ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]"),
               "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "[SEP]")}


class HFTokenizer:
    """A `tokenizer.json` with the sentencepiece methods jaxlm uses. Special tokens come from
    tokenizer_config.json (else config.json's ids). Models without a BOS token (Qwen) start documents
    with their separator <|endoftext|> (else EOS), as they were pretrained."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
            raise ConfigError(f"{path} is not a Hugging Face tokenizer.json ({e})") from None
        directory = os.path.dirname(path)
        tc = _read_json(os.path.join(directory, TOKENIZER_CONFIG))
        mc = _read_json(os.path.join(directory, "config.json"))
        hc = _read_json(os.path.join(directory, "hf_config.json"))

        def token_id(key: str) -> int:
            name = _token(tc.get(f"{key}_token"))
            if name is not None and self.tok.token_to_id(name) is not None:
                return self.tok.token_to_id(name)
            for cfg in (hc, mc):
                value = cfg.get(f"{key}_token_id")
                value = value[0] if isinstance(value, list) and value else value
                if isinstance(value, int):
                    return value
            # A bare tokenizer.json (no config beside it): the usual names of the special tokens.
            return next((i for i in map(self.tok.token_to_id, USUAL_NAMES.get(key, ())) if i is not None), -1)

        self._eos, self._pad = token_id("eos"), token_id("pad")
        bos, separator = token_id("bos"), self.piece_to_id("<|endoftext|>")
        self._bos = bos if bos >= 0 else separator if separator >= 0 else self._eos

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def bos_id(self) -> int:
        return self._bos

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return self._pad

    def piece_to_id(self, piece: str) -> int:
        found = self.tok.token_to_id(piece)
        return -1 if found is None else found

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def encode(self, text):
        """Token ids of a string, or a list of them for a list of strings (no special tokens added)."""
        if isinstance(text, str):
            return self.tok.encode(text, add_special_tokens=False).ids
        return [e.ids for e in self.tok.encode_batch(list(text), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load(path: str):
    """A tokenizer.json (HFTokenizer) or a sentencepiece model, by file name."""
    if path.endswith(".json"):
        return HFTokenizer(path)
    from jaxlm.data import tokenizer as sentencepiece_lib

    return sentencepiece_lib.load(path)


def load_for_run(run_dir: str):
    """The tokenizer of a run directory: tokenizer.json when there is one, else tokenizer.model."""
    for name in (TOKENIZER_JSON, SENTENCEPIECE):
        if os.path.isfile(os.path.join(run_dir, name)):
            return load(os.path.join(run_dir, name))
    raise ConfigError(f"{run_dir} has no tokenizer ({TOKENIZER_JSON} or {SENTENCEPIECE}); copy the model's "
                      f"tokenizer files into it")
