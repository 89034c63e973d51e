"""The run directory's layout: every file name a run holds is spelled here and nowhere else.

<run>/config.json              the resolved config of the latest segment (configs/ keeps every segment's)
<run>/tokenizer.model|.json    the tokenizer, so that the run alone is enough to generate or evaluate
<run>/tokenizer_config.json    runs of Hugging Face models: their special tokens (and chat template), beside tokenizer.json
<run>/chat_template.jinja      finetuned runs: the template the data was rendered with
<run>/hf_config.json           runs started from a Hugging Face checkpoint: its config.json, for export
<run>/checkpoints/<step>/      Orbax checkpoints (the model that generate, eval and export read)
<run>/train_state/<step>/      LoRA runs: adapters, their optimizer state, step and RNG
<run>/adapters/                LoRA runs: the finished adapters (safetensors)
<run>/metrics.jsonl, events    training metrics (jaxlm.metrics)
"""

from __future__ import annotations

import os

CONFIG = "config.json"
SEGMENTS = "configs"  # one resolved config per segment of the run: configs/<first step>.json
SENTENCEPIECE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_JSON, SENTENCEPIECE)  # in order of preference, when a directory has both
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
HF_CONFIG = "hf_config.json"  # a Hugging Face checkpoint's config.json, kept in runs started from one
CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state"
ADAPTERS = "adapters"


def tokenizer_name(path: str) -> str:
    """The run's file name for a tokenizer file: tokenizer.json for Hugging Face ones, else tokenizer.model."""
    return TOKENIZER_JSON if path.endswith(".json") else SENTENCEPIECE


def path(run_dir: str, *names: str) -> str:
    return os.path.join(run_dir, *names)


def checkpoint_dir(run_dir: str, override: str = "") -> str:
    """Where a run's model checkpoints live: `checkpoint.dir` when set, else <run>/checkpoints."""
    return override or os.path.join(run_dir, CHECKPOINTS)
