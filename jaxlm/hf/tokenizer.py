"""Hugging Face tokenizer files in checkpoint and run directories: which files travel with a model, and the
chat template a model brings. Reading a tokenizer is `jaxlm.data.tokenizer`'s (load, load_for_run)."""

from __future__ import annotations

import os

from jaxlm.core import atomic, rundir
from jaxlm.data import tokenizer as tokenizer_lib

# Everything a Hugging Face tokenizer (and generation) may need, copied as-is in both directions.
FILES = (rundir.TOKENIZER_JSON, rundir.SENTENCEPIECE, rundir.TOKENIZER_CONFIG, rundir.CHAT_TEMPLATE,
         "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json")


def copy_files(src: str, dst: str) -> str | None:
    """Copies the tokenizer files of `src` into `dst` (each atomically). Returns the file jaxlm reads
    (tokenizer.json, else tokenizer.model), or None when `src` has neither."""
    for name in FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            atomic.copy_file(path, os.path.join(dst, name))
    return next((name for name in rundir.TOKENIZER_FILES if os.path.isfile(os.path.join(dst, name))), None)


def chat_template(directory: str) -> str | None:
    """The model's chat template (jinja source): chat_template.jinja, else tokenizer_config.json's entry."""
    path = os.path.join(directory, rundir.CHAT_TEMPLATE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = tokenizer_lib.tokenizer_config(directory).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template
