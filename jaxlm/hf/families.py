"""Hugging Face model families: their config.json <-> `ModelConfig`, and their tensors <-> jaxlm parameters.

A `TensorMap` says how one Hugging Face tensor lays out one jaxlm parameter (per layer for layer tensors):
read the HF tensor row-major as the shape `view`, optionally pick one index of a fused axis (GPT-2 packs
q, k and v into one `c_attn`), then transpose the remaining view axes by `perm`. Import and export both use
the same maps, so a round trip is exact by construction.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax

from jaxlm.core.config import ConfigError, DistributedConfig, ModelConfig, is_default

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPT2LMHeadModel": "gpt2",
}
FAMILY_ARCHITECTURE = {family: arch for arch, family in ARCHITECTURES.items()}

# Tensors some checkpoints carry that hold no weights: attention-mask buffers and cached RoPE frequencies.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf: str  # Hugging Face tensor name; "{i}" stands for the layer index
    path: tuple[str, ...]  # jaxlm parameter path (inside a layer for layer tensors)
    hf_shape: tuple[int, ...]
    view: tuple[int, ...]  # hf_shape split row-major into these axes
    perm: tuple[int, ...]  # jaxlm axis j is view axis perm[j] (counted without the picked axis)
    pick: tuple[int, int] | None = None  # (view axis, index) of a fused tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """The jaxlm shape (one layer)."""
        kept = [n for a, n in enumerate(self.view) if not self.pick or a != self.pick[0]]
        return tuple(kept[p] for p in self.perm)


def family_of(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ConfigError(
        f"config.json architectures={archs} is not supported; jaxlm imports {', '.join(ARCHITECTURES)}"
    )


def _rope(hf: dict) -> dict:
    """RoPE settings from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if rope_type == "llama3":
        out.update(
            rope_scaling_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_len=int(params["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise ConfigError(f"config.json rope_type={rope_type!r} is not supported; jaxlm supports 'default' and 'llama3'")
    return out


def _require(hf: dict, key: str, allowed, what: str) -> None:
    value = hf.get(key, allowed[0])
    if value not in allowed:
        raise ConfigError(f"config.json {key}={value!r} is not supported ({what}); expected one of {allowed}")


def model_config(hf: dict, base: ModelConfig = ModelConfig(), platform: str | None = None) -> ModelConfig:
    """The jaxlm model for a Hugging Face config.json. Shape fields come from `hf`; runtime fields (dtypes,
    remat, scan, attention kernel) stay as in `base`, except a compute dtype nobody chose (`compute_dtype`)."""
    family = family_of(hf)
    try:
        model = _model_config(hf, base, family)
    except KeyError as e:
        raise ConfigError(f"config.json has no {e.args[0]!r} field, which a {family} config needs") from None
    return dataclasses.replace(model, dtype=compute_dtype(hf, base, platform))


# Checkpoint dtypes -> the compute dtype jaxlm uses for them on an accelerator. float16 has no jaxlm compute
# path; bfloat16 keeps its memory and covers its range.
CHECKPOINT_COMPUTE = {"float32": "float32", "float64": "float32", "bfloat16": "bfloat16", "float16": "bfloat16"}


def compute_dtype(hf: dict, base: ModelConfig, platform: str | None = None) -> str:
    """`base.dtype` if a preset, file or override set it; otherwise float32 on CPU (no fast bfloat16 there,
    and greedy output then matches transformers' float32) and the checkpoint's own dtype on accelerators.
    `platform` defaults to `safe_platform()`. Logs the choice it makes."""
    if not is_default(base.dtype):
        return str(base.dtype)
    platform = platform or safe_platform()
    stored = str(hf.get("dtype") or hf.get("torch_dtype") or "").removeprefix("torch.")
    if platform == "cpu":
        dtype = "float32"
        why = f"CPU; the checkpoint is {stored}" if stored else "CPU"
    elif stored in CHECKPOINT_COMPUTE:
        dtype = CHECKPOINT_COMPUTE[stored]
        why = f"the checkpoint is {stored}" + (f", which jaxlm computes in {dtype}" if dtype != stored else "")
    else:
        dtype = str(base.dtype)
        why = "the default; config.json names no dtype" if not stored else f"the default; the checkpoint is {stored}"
    log.info("compute dtype %s (%s); set model.dtype to choose another", dtype, why)
    return dtype


def safe_platform(distributed: DistributedConfig = DistributedConfig()) -> str:
    """JAX's default platform ("cpu", "gpu", "tpu"), found without starting a backend before a multi-process
    start, which must come first: there it is JAX_PLATFORMS's first entry, else taken to be an accelerator."""
    from jax._src import xla_bridge  # no public way to ask whether a backend has started

    from jaxlm.core.distributed import detect

    if xla_bridge.backends_are_initialized() or detect(distributed).method == "single":
        return jax.default_backend()
    return (jax.config.jax_platforms or "").split(",")[0] or "accelerator"


def _model_config(hf: dict, base: ModelConfig, family: str) -> ModelConfig:
    if family == "gpt2":
        _require(hf, "activation_function", ["gelu_new", "gelu_pytorch_tanh"], "GPT-2 MLP activation")
        _require(hf, "scale_attn_by_inverse_layer_idx", [False], "per-layer attention scaling")
        _require(hf, "scale_attn_weights", [True], "unscaled attention")
        d, n = hf["n_embd"], hf["n_head"]
        return dataclasses.replace(
            base, architecture="gpt2", vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"],
            num_heads=n, num_kv_heads=n, head_dim=d // n, mlp_dim=hf.get("n_inner") or 4 * d,
            max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5), qkv_bias=True,
            qk_norm=False, tie_embeddings=hf.get("tie_word_embeddings", True), sliding_window=0,
            rope_scaling_factor=0.0,
        )
    _require(hf, "hidden_act", ["silu"], "SwiGLU MLP activation")
    _require(hf, "mlp_bias", [False], "MLP biases")
    if family in ("qwen2", "qwen3"):
        _require(hf, "use_sliding_window", [False], "per-layer sliding windows")
    if family != "qwen2":  # Qwen2 always has q/k/v biases; elsewhere attention_bias also adds one to o_proj
        _require(hf, "attention_bias", [False], "a bias on o_proj")
    n = hf["num_attention_heads"]
    return dataclasses.replace(
        base, architecture="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=n, num_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n, mlp_dim=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=(hf.get("sliding_window") or 0) if family == "mistral" else 0,
        **{"rope_scaling_factor": 0.0, **_rope(hf)},
    )


def family_for(c: ModelConfig) -> str:
    """The Hugging Face family a jaxlm model exports as."""
    if c.architecture == "gpt2":
        return "gpt2"
    if c.qk_norm:
        if c.qkv_bias:
            raise ConfigError("a model with both qk_norm and qkv_bias has no Hugging Face family; it cannot be exported")
        return "qwen3"
    if c.qkv_bias:
        return "qwen2"
    return "mistral" if c.sliding_window else "llama"


def hf_config(c: ModelConfig, template: dict | None, dtype: str) -> dict:
    """A Hugging Face config.json for `c`. `template` (the imported checkpoint's config) keeps its other
    fields, such as token ids."""
    family = family_for(c)
    out = dict(template or {})
    if out:
        source = family_of(out)
        if source == "mistral" and family == "llama":
            family = "mistral"  # a Mistral without a sliding window looks like LLaMA but stays Mistral
        elif source != family:
            out = {k: out[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in out}
    out.update(architectures=[FAMILY_ARCHITECTURE[family]], model_type=family, vocab_size=c.vocab_size,
               tie_word_embeddings=c.tie_embeddings, dtype=dtype)
    out.pop("torch_dtype", None)
    if family == "gpt2":
        out.update(n_embd=c.d_model, n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.mlp_dim,
                   n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps, activation_function="gelu_new")
        return out
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling_factor:
        rope.update(rope_type="llama3", factor=c.rope_scaling_factor, low_freq_factor=c.rope_low_freq_factor,
                    high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_len)
    out.pop("rope_scaling", None)
    out.pop("rope_theta", None)
    out.update(hidden_size=c.d_model, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
               num_key_value_heads=c.num_kv_heads, head_dim=c.resolved_head_dim, intermediate_size=c.mlp_dim,
               max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, hidden_act="silu",
               rope_parameters=rope)
    if family == "mistral":
        out["sliding_window"] = c.sliding_window or None
    if family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers,
                   layer_types=["full_attention"] * c.num_layers)
    if family in ("llama", "mistral", "qwen3"):
        out.update(attention_bias=False)
    if family == "llama":
        out.update(mlp_bias=False)
    return out


def tensor_maps(c: ModelConfig) -> tuple[list[TensorMap], list[TensorMap]]:
    """(top-level maps, per-layer maps) for the model `c`."""
    return _gpt2_maps(c) if c.architecture == "gpt2" else _llama_maps(c)


def _llama_maps(c: ModelConfig):
    d, n, k, h, f, v = c.d_model, c.num_heads, c.num_kv_heads, c.resolved_head_dim, c.mlp_dim, c.vocab_size
    top = [
        TensorMap("model.embed_tokens.weight", ("embed", "embedding"), (v, d), (v, d), (0, 1)),
        TensorMap("model.norm.weight", ("final_norm", "scale"), (d,), (d,), (0,)),
    ]
    if not c.tie_embeddings:
        top.append(TensorMap("lm_head.weight", ("lm_head",), (v, d), (v, d), (0, 1)))
    p = "model.layers.{i}."
    layer = [
        TensorMap(p + "input_layernorm.weight", ("attn_norm", "scale"), (d,), (d,), (0,)),
        TensorMap(p + "post_attention_layernorm.weight", ("mlp_norm", "scale"), (d,), (d,), (0,)),
        # nn.Linear stores (out, in); jaxlm stores (in, ..., out) split by head.
        TensorMap(p + "self_attn.q_proj.weight", ("attn", "q"), (n * h, d), (n, h, d), (2, 0, 1)),
        TensorMap(p + "self_attn.k_proj.weight", ("attn", "k"), (k * h, d), (k, h, d), (2, 0, 1)),
        TensorMap(p + "self_attn.v_proj.weight", ("attn", "v"), (k * h, d), (k, h, d), (2, 0, 1)),
        TensorMap(p + "self_attn.o_proj.weight", ("attn", "o"), (d, n * h), (d, n, h), (1, 2, 0)),
        TensorMap(p + "mlp.gate_proj.weight", ("mlp", "gate"), (f, d), (f, d), (1, 0)),
        TensorMap(p + "mlp.up_proj.weight", ("mlp", "up"), (f, d), (f, d), (1, 0)),
        TensorMap(p + "mlp.down_proj.weight", ("mlp", "down"), (d, f), (d, f), (1, 0)),
    ]
    if c.qkv_bias:
        layer += [
            TensorMap(p + "self_attn.q_proj.bias", ("attn", "q_bias"), (n * h,), (n, h), (0, 1)),
            TensorMap(p + "self_attn.k_proj.bias", ("attn", "k_bias"), (k * h,), (k, h), (0, 1)),
            TensorMap(p + "self_attn.v_proj.bias", ("attn", "v_bias"), (k * h,), (k, h), (0, 1)),
        ]
    if c.qk_norm:
        layer += [
            TensorMap(p + "self_attn.q_norm.weight", ("attn", "q_norm", "scale"), (h,), (h,), (0,)),
            TensorMap(p + "self_attn.k_norm.weight", ("attn", "k_norm", "scale"), (h,), (h,), (0,)),
        ]
    return top, layer


def _gpt2_maps(c: ModelConfig):
    d, n, h, f, v = c.d_model, c.num_heads, c.resolved_head_dim, c.mlp_dim, c.vocab_size
    top = [
        TensorMap("transformer.wte.weight", ("embed", "embedding"), (v, d), (v, d), (0, 1)),
        TensorMap("transformer.wpe.weight", ("pos_embed",), (c.max_seq_len, d), (c.max_seq_len, d), (0, 1)),
        TensorMap("transformer.ln_f.weight", ("final_norm", "scale"), (d,), (d,), (0,)),
        TensorMap("transformer.ln_f.bias", ("final_norm", "bias"), (d,), (d,), (0,)),
    ]
    if not c.tie_embeddings:
        top.append(TensorMap("lm_head.weight", ("lm_head",), (v, d), (v, d), (0, 1)))
    p = "transformer.h.{i}."
    layer = []
    for norm, hf_norm in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        layer += [TensorMap(p + f"{hf_norm}.weight", (norm, "scale"), (d,), (d,), (0,)),
                  TensorMap(p + f"{hf_norm}.bias", (norm, "bias"), (d,), (d,), (0,))]
    # Conv1D stores (in, out); c_attn's out axis is [q | k | v], each split by head.
    for j, name in enumerate(("q", "k", "v")):
        layer += [
            TensorMap(p + "attn.c_attn.weight", ("attn", name), (d, 3 * n * h), (d, 3, n, h), (0, 1, 2), (1, j)),
            TensorMap(p + "attn.c_attn.bias", ("attn", f"{name}_bias"), (3 * n * h,), (3, n, h), (0, 1), (0, j)),
        ]
    layer += [
        TensorMap(p + "attn.c_proj.weight", ("attn", "o"), (n * h, d), (n, h, d), (0, 1, 2)),
        TensorMap(p + "attn.c_proj.bias", ("attn", "o_bias"), (d,), (d,), (0,)),
        TensorMap(p + "mlp.c_fc.weight", ("mlp", "up"), (d, f), (d, f), (0, 1)),
        TensorMap(p + "mlp.c_fc.bias", ("mlp", "up_bias"), (f,), (f,), (0,)),
        TensorMap(p + "mlp.c_proj.weight", ("mlp", "down"), (f, d), (f, d), (0, 1)),
        TensorMap(p + "mlp.c_proj.bias", ("mlp", "down_bias"), (d,), (d,), (0,)),
    ]
    return top, layer


def view_groups(m: TensorMap) -> list[list[int]]:
    """For each HF axis, the view axes it splits into."""
    groups, axis = [], 0
    for size in m.hf_shape:
        group, prod = [], 1
        while prod < size or not group:
            group.append(axis)
            prod *= m.view[axis]
            axis += 1
        if prod != size:
            raise AssertionError(f"view {m.view} does not split {m.hf_shape} ({m.hf})")
        groups.append(group)
    assert axis == len(m.view) and math.prod(m.view) == math.prod(m.hf_shape)
    return groups
