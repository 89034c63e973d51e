"""The run directory's layout: every file name a run holds is spelled here and nowhere else.

<run>/config.json              the resolved config of the latest segment (configs/ keeps every segment's)
<run>/tokenizer.model|.json    the tokenizer, so that the run alone is enough to generate or evaluate
<run>/tokenizer_config.json    runs of Hugging Face models: their special tokens (and chat template), beside tokenizer.json
<run>/chat_template.jinja      finetuned runs: the template the data was rendered with
<run>/hf_config.json           runs started from a Hugging Face checkpoint: its config.json, for export
<run>/checkpoints/<step>/      Orbax checkpoints (the model that generate, eval and export read)
<run>/train_state/<step>/      LoRA runs: adapters, their optimizer state, step and RNG
<run>/adapters/                LoRA runs: the finished adapters (safetensors)
<run>/metrics.jsonl, events    training metrics (jaxlm.training.metrics)
"""

from __future__ import annotations

import logging
import os

from jaxlm.core.config import ConfigError

log = logging.getLogger(__name__)

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


def checkpoint_dir(run_dir: str, override: str = "") -> str:
    """Where a run's model checkpoints live: `checkpoint.dir` when set, else <run>/checkpoints."""
    return override or os.path.join(run_dir, CHECKPOINTS)


# Settings a resumed run may change: how long it runs, how it is watched, checkpointed, laid out on
# devices and computed. Anything else (the model, data, optimizer, seed) would make the checkpoint's
# state or the data order mean something else.
RESUMABLE = ("name", "train.run_dir", "train.steps", "train.stop_at", "train.log_every", "train.eval_every", "train.eval_batches",
             "train.eval_tasks", "train.eval_limit", "train.on_nonfinite", "train.profile_start",
             "train.profile_steps", "train.peak_flops", "train.progress", "checkpoint.", "distributed.", "mesh.",
             "data.workers", "data.cache_dir", "model.attention", "model.remat")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _read_json(path: str):
    """The JSON in `path`; None when the file is missing or damaged."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def config_changes(saved: dict, new: dict) -> dict[str, tuple]:
    """{key: (saved value, new value)} for every setting that differs (compared as JSON stores them)."""
    import json

    a, b = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(new)))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


class RunDir:
    """A run directory. Nothing is written into it until `begin_segment`, which comes after everything
    has been validated, so that a command that fails leaves an existing run exactly as it was."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(os.path.expanduser(directory))

    def path(self, *names: str) -> str:
        return os.path.join(self.directory, *names)

    def saved_config(self) -> dict | None:
        """The config of the run's latest segment: config.json, or when that is damaged (a copy cut short)
        the newest intact configs/<start>.json; None for a directory no run has written yet."""
        segments = []
        if os.path.isdir(self.path(SEGMENTS)):
            starts = [n.removesuffix(".json") for n in os.listdir(self.path(SEGMENTS)) if n.endswith(".json")]
            segments = [self.path(SEGMENTS, f"{s}.json") for s in sorted((s for s in starts if s.isdigit()),
                                                                        key=int, reverse=True)]
        for path in (self.path(CONFIG), *segments):
            saved = _read_json(path)
            if isinstance(saved, dict):
                if path != self.path(CONFIG):
                    log.warning("%s is damaged; checking the config against %s instead", self.path(CONFIG), path)
                return saved
        return None

    def check_resume(self, config: dict, has_checkpoint: bool) -> dict[str, tuple]:
        """Raises ConfigError naming the keys when a run that has a checkpoint is given a config that
        differs in anything resuming cannot allow; returns the allowed changes."""
        saved = self.saved_config()
        if saved is None or not has_checkpoint:
            return {}
        changes = config_changes(saved, config)
        refused = {k: v for k, v in changes.items() if not k.startswith(RESUMABLE)}
        if refused:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:6])
            more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
            raise ConfigError(f"{self.directory} holds a run with a different config ({shown}{more}); "
                             f"use a new train.run_dir, or the run's own settings to resume it")
        return changes

    def begin_segment(self, config: dict, start: int) -> None:
        """Writes the config this segment of the run uses, as config.json and configs/<start>.json."""
        from jaxlm.core import atomic

        os.makedirs(self.path(SEGMENTS), exist_ok=True)
        atomic.write_json(self.path(SEGMENTS, f"{start}.json"), config)
        atomic.write_json(self.path(CONFIG), config)
