"""Hugging Face model families: their config.json <-> `ModelConfig`, and their tensors <-> jaxlm parameters
(`jaxlm.hf.tensor_map.TensorMap`s). The decoder-only families are here; the encoders (BERT, RoBERTa) and the
encoder-decoders (T5, mT5, UMT5) have their own modules, which the functions here dispatch to.
"""

from __future__ import annotations

import dataclasses
import logging

import jax

from jaxlm.core.config import ConfigError, DistributedConfig, ModelConfig, is_default
from jaxlm.hf import bert_family, t5_family
from jaxlm.hf.tensor_map import DENSE, TensorMap, require

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPT2LMHeadModel": "gpt2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "BertForMaskedLM": "bert",  # encoders: jaxlm/hf/bert_family.py
    "RobertaForMaskedLM": "roberta",
    # Encoder-decoders: jaxlm/hf/t5_family.py
    "T5ForConditionalGeneration": "t5",
    "MT5ForConditionalGeneration": "mt5",
    "UMT5ForConditionalGeneration": "umt5",
}
FAMILY_ARCHITECTURE = {family: arch for arch, family in ARCHITECTURES.items()}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
# Sequence classifiers (reward models): the dense decoder of a family with a `score` head (num_labels, hidden)
# in place of lm_head, stored as `score.weight` beside the decoder's `model.*` tensors.
CLASSIFIERS = {
    "LlamaForSequenceClassification": "llama",
    "MistralForSequenceClassification": "mistral",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen3ForSequenceClassification": "qwen3",
}
FAMILY_CLASSIFIER = {family: arch for arch, family in CLASSIFIERS.items()}
CLASSIFIER_SUFFIX = "ForSequenceClassification"

# Tensors some checkpoints carry that hold no weights: attention-mask buffers and cached RoPE frequencies.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# BERT/RoBERTa: position/token-type id buffers, the MLM decoder's tied copies of the word embeddings and output
# bias, and the pooler and next-sentence head of pretraining checkpoints (unused by masked LM).
IGNORED_SUFFIXES += (".embeddings.position_ids", ".embeddings.token_type_ids", "predictions.decoder.weight",
                     "predictions.decoder.bias", "lm_head.decoder.weight", "lm_head.decoder.bias",
                     ".pooler.dense.weight", ".pooler.dense.bias", "cls.seq_relationship.weight",
                     "cls.seq_relationship.bias")


def family_of(hf_config: dict) -> str:
    return _architecture(hf_config)[0]


def num_labels(hf_config: dict) -> int:
    """The jaxlm model.num_labels of a Hugging Face config: 0 for a language model; a classifier's label count,
    which transformers writes as id2label (and leaves out at its default of 2; older writers say num_labels)."""
    if not _architecture(hf_config)[1]:
        return 0
    return len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 2))


def _architecture(hf_config: dict) -> tuple[str, bool]:
    """(family, whether a sequence classifier) of the config's architecture."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch], False
        if arch in CLASSIFIERS:
            return CLASSIFIERS[arch], True
    if any(str(a).endswith(CLASSIFIER_SUFFIX) for a in archs):
        raise ConfigError(f"config.json architectures={archs} is not supported; jaxlm imports the sequence "
                          f"classifiers {', '.join(CLASSIFIERS)}")
    raise ConfigError(
        f"config.json architectures={archs} is not supported; jaxlm imports {', '.join([*ARCHITECTURES, *CLASSIFIERS])}"
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


def model_config(hf: dict, base: ModelConfig = ModelConfig(), platform: str | None = None) -> ModelConfig:
    """The jaxlm model for a Hugging Face config.json. Shape fields come from `hf`; runtime fields (dtypes,
    remat, scan, attention kernel) stay as in `base`, except a compute dtype nobody chose (`compute_dtype`)."""
    family = family_of(hf)
    try:
        model = _model_config(hf, base, family)
    except KeyError as e:
        raise ConfigError(f"config.json has no {e.args[0]!r} field, which a {family} config needs") from None
    labels = num_labels(hf)
    if labels < 1 and _architecture(hf)[1]:
        raise ConfigError(f"config.json num_labels={labels} is not supported (a sequence classifier without labels)")
    return dataclasses.replace(model, num_labels=labels, dtype=compute_dtype(hf, base, platform))


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
    if family in ("bert", "roberta"):
        return bert_family.model_config(hf, base, family)
    if family in ("t5", "mt5", "umt5"):
        return t5_family.model_config(hf, base, family)
    if family == "gpt2":
        require(hf, "activation_function", ["gelu_new", "gelu_pytorch_tanh"], "GPT-2 MLP activation")
        require(hf, "scale_attn_by_inverse_layer_idx", [False], "per-layer attention scaling")
        require(hf, "scale_attn_weights", [True], "unscaled attention")
        d, n = hf["n_embd"], hf["n_head"]
        return dataclasses.replace(
            base, architecture="gpt2", vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"],
            num_heads=n, num_kv_heads=n, head_dim=d // n, mlp_dim=hf.get("n_inner") or 4 * d,
            max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5), qkv_bias=True,
            qk_norm=False, tie_embeddings=hf.get("tie_word_embeddings", True), sliding_window=0,
            rope_scaling_factor=0.0, **DENSE,
        )
    require(hf, "hidden_act", ["silu"], "SwiGLU MLP activation")
    require(hf, "mlp_bias", [False], "MLP biases")
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        require(hf, "use_sliding_window", [False], "per-layer sliding windows")
    if family not in ("qwen2", "qwen2_moe"):  # Qwen2 has q/k/v biases; elsewhere attention_bias also biases o_proj
        require(hf, "attention_bias", [False], "a bias on o_proj")
    n = hf["num_attention_heads"]
    model = dataclasses.replace(
        base, architecture="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=n, num_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n, mlp_dim=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=family == "qwen2" or (family == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        qk_norm=family in ("qwen3", "qwen3_moe"), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=(hf.get("sliding_window") or 0) if family in ("mistral", "mixtral") else 0,
        **{"rope_scaling_factor": 0.0, **_rope(hf)}, **_moe(hf, base, family),
    )
    if model.mixed_layers:  # dense and MoE layers have different params: no one scanned stack
        model = dataclasses.replace(model, scan_layers=False)
    return model


def _moe(hf: dict, base: ModelConfig, family: str) -> dict:
    """The ModelConfig mixture-of-experts fields of a Hugging Face config."""
    if family not in MOE_FAMILIES:
        return DENSE
    # Routers other than softmax-then-top-k (DeepSeek-style configs that name these fields).
    require(hf, "scoring_func", ["softmax", None], "router scoring")
    require(hf, "topk_method", ["greedy", None], "router top-k method")
    require(hf, "n_group", [None, 0, 1], "grouped expert routing")
    require(hf, "routed_scaling_factor", [None, 1, 1.0], "scaled expert outputs")
    coef = hf.get("router_aux_loss_coef")
    out = dict(DENSE, experts_per_token=hf["num_experts_per_tok"], router="softmax_topk",
               router_aux_loss=base.router_aux_loss if coef is None else float(coef))
    if family == "mixtral":
        if hf.get("router_jitter_noise"):
            log.warning("config.json router_jitter_noise=%s is ignored: jaxlm's router adds no training noise",
                        hf["router_jitter_noise"])
        # Mixtral's intermediate_size is each expert's width; every layer is MoE; top-k weights renormalised.
        return dict(out, num_experts=_experts(hf, "num_local_experts", "num_experts"),
                    expert_mlp_dim=hf["intermediate_size"], norm_topk_prob=True)
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts.
    out.update(num_experts=_experts(hf, "num_experts", "num_local_experts"),
               expert_mlp_dim=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
               **_moe_layout(hf, hf["num_hidden_layers"]))
    if family == "qwen2_moe":  # always a shared expert, scaled by a sigmoid gate
        shared = hf.get("shared_expert_intermediate_size", 0)
        if not shared:
            raise ConfigError(f"config.json shared_expert_intermediate_size={shared!r} is not supported "
                              f"(a Qwen2-MoE without a shared expert)")
        out.update(shared_expert_dim=shared, shared_expert_gate=True)
    return out


def _experts(hf: dict, key: str, alias: str) -> int:
    """The expert count, under its usual `key` or its `alias`; a KeyError names `key`."""
    experts = hf[key] if key in hf or alias not in hf else hf[alias]
    if not experts:
        raise ConfigError(f"config.json {key}={experts!r} is not supported (a mixture of experts without experts)")
    return experts


def _moe_layout(hf: dict, num_layers: int) -> dict:
    """moe_first_layer / moe_every for Qwen-MoE's layout: layer i is MoE unless it is in mlp_only_layers,
    and only when (i + 1) is a multiple of decoder_sparse_step."""
    step = int(hf.get("decoder_sparse_step") or 1)
    dense = sorted(hf.get("mlp_only_layers") or [])
    moe = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
    what = f"config.json mlp_only_layers={dense} with decoder_sparse_step={step}"
    if not moe:
        raise ConfigError(f"{what} leaves no MoE layer among num_hidden_layers={num_layers}")
    # MoE layers from moe[0] on, every `every`-th: the step, or the gap of the first two, or (one MoE layer)
    # an interval that reaches past the last layer.
    for every in (step, moe[1] - moe[0] if len(moe) > 1 else max(1, num_layers - moe[0])):
        first = moe[0] - every + 1
        if first >= 0 and [i for i in range(num_layers) if i >= first and (i - first + 1) % every == 0] == moe:
            return dict(moe_first_layer=first, moe_every=every)
    raise ConfigError(f"{what} is not supported: jaxlm's dense layers are the first ones (model.moe_first_layer), "
                      f"then one MoE layer every model.moe_every")


def family_for(c: ModelConfig) -> str:
    """The Hugging Face family a jaxlm model exports as."""
    if c.architecture == "bert":
        return bert_family.family_for(c)
    if c.architecture == "t5":
        return t5_family.family_for(c)
    if c.num_labels and (c.architecture == "gpt2" or c.num_experts):
        # Hugging Face has such classifiers, but jaxlm maps only the dense LLaMA-style ones (CLASSIFIERS).
        raise ConfigError(f"a {'GPT-2' if c.architecture == 'gpt2' else 'mixture-of-experts'} model with "
                          f"model.num_labels={c.num_labels} has no supported Hugging Face classifier; jaxlm "
                          f"exports the sequence classifiers {', '.join(CLASSIFIERS)}")
    if c.architecture == "gpt2":
        if c.num_experts:
            raise ConfigError("a GPT-2 model with experts has no Hugging Face family; it cannot be exported")
        return "gpt2"
    if c.qk_norm and c.qkv_bias:
        raise ConfigError("a model with both qk_norm and qkv_bias has no Hugging Face family; it cannot be exported")
    if c.num_experts:
        return _moe_family(c)
    if c.qk_norm:
        return "qwen3"
    if c.qkv_bias:
        return "qwen2"
    return "mistral" if c.sliding_window else "llama"


def _moe_family(c: ModelConfig) -> str:
    """Qwen3-MoE (qk_norm), Qwen2-MoE (a gated shared expert) or Mixtral (neither; every layer MoE, top-k
    weights renormalised). topk_softmax equals softmax_topk with norm_topk_prob: softmax is monotonic, and the
    softmax of the top k logits is the top k probabilities renormalised."""
    no = "has no Hugging Face family; it cannot be exported"
    if c.qk_norm:
        if c.shared_expert_dim:
            raise ConfigError(f"a mixture-of-experts model with qk_norm (Qwen3-MoE) and a shared expert {no}")
        family = "qwen3_moe"
    elif c.shared_expert_dim:
        if not c.shared_expert_gate:
            raise ConfigError(f"a shared expert without model.shared_expert_gate {no} (Qwen2-MoE gates it)")
        family = "qwen2_moe"
    elif c.qkv_bias:
        raise ConfigError(f"a mixture-of-experts model with qkv_bias and no shared expert {no} (Qwen2-MoE has one)")
    else:
        family = "mixtral"
    if c.sliding_window and family != "mixtral":
        raise ConfigError(f"a mixture-of-experts model with a sliding window and qk_norm or a shared expert {no}")
    if family == "mixtral":
        if c.mixed_layers:
            raise ConfigError(f"a mixture-of-experts model with dense layers and neither qk_norm nor a shared expert "
                              f"{no} (Mixtral's layers are all MoE)")
        if c.router == "softmax_topk" and not c.norm_topk_prob:
            raise ConfigError(f"model.norm_topk_prob=false without qk_norm or a shared expert {no} (Mixtral "
                              f"renormalises the top-k weights)")
    return family


TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_config(c: ModelConfig, template: dict | None, dtype: str, tokens: dict | None = None) -> dict:
    """A Hugging Face config.json for `c`. `template` (the imported checkpoint's config) keeps its other
    fields, such as token ids. `tokens` (TOKEN_IDS of the run's tokenizer, None where it has none) gives the
    token ids of a config without a template, and a classifier's pad id where the template names none."""
    family = family_for(c)
    out = dict(template or {})
    if out:
        source = family_of(out)
        if source == "mistral" and family == "llama":
            family = "mistral"  # a Mistral without a sliding window looks like LLaMA but stays Mistral
        elif source == "mt5" and family == "t5" and not c.tie_embeddings:
            family = "mt5"  # an mT5 is a T5 v1.1 (untied) and stays mT5
        elif source != family:
            out = {k: out[k] for k in TOKEN_IDS if k in out}
    else:
        out = {k: v for k, v in (tokens or {}).items() if k in TOKEN_IDS}
    arch = FAMILY_CLASSIFIER[family] if c.num_labels else FAMILY_ARCHITECTURE[family]
    out.update(architectures=[arch], model_type=family, vocab_size=c.vocab_size,
               tie_word_embeddings=c.tie_embeddings, dtype=dtype)
    if c.num_labels:
        _classifier_fields(out, c, tokens)
    out.pop("torch_dtype", None)
    if family in ("bert", "roberta"):
        bert_family.hf_config_fields(out, c, family)
        return out
    if family in ("t5", "mt5", "umt5"):
        t5_family.hf_config_fields(out, c, family)
        return out
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
    if family in ("mistral", "mixtral"):
        out["sliding_window"] = c.sliding_window or None
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        out.update(use_sliding_window=False, sliding_window=None)
    if family in ("qwen2", "qwen3", "qwen2_moe"):
        out.update(max_window_layers=c.num_layers, layer_types=["full_attention"] * c.num_layers)
    if family in ("llama", "mistral", "qwen3", "qwen3_moe"):
        out.update(attention_bias=False)
    if family == "llama":
        out.update(mlp_bias=False)
    if family in MOE_FAMILIES:
        out.update(num_experts_per_tok=c.experts_per_token, router_aux_loss_coef=c.router_aux_loss,
                   output_router_logits=bool(out.get("output_router_logits", False)))
        for key in ("scoring_func", "topk_method", "n_group", "topk_group", "routed_scaling_factor"):
            out.pop(key, None)
    if family == "mixtral":
        out.pop("num_experts", None)
        out.update(num_local_experts=c.num_experts, intermediate_size=c.resolved_expert_mlp_dim)
    elif family in ("qwen2_moe", "qwen3_moe"):
        # Layer i is MoE unless listed in mlp_only_layers, and only when (i + 1) % decoder_sparse_step == 0.
        step = c.moe_every
        out.pop("num_local_experts", None)  # transformers 5 writes Qwen3-MoE's num_experts under this name
        out.update(num_experts=c.num_experts, moe_intermediate_size=c.resolved_expert_mlp_dim,
                   norm_topk_prob=c.norm_topk_prob or c.router == "topk_softmax", decoder_sparse_step=step,
                   mlp_only_layers=[i for i in range(c.num_layers) if (i + 1) % step == 0 and not c.is_moe_layer(i)])
    if family == "qwen2_moe":
        out.update(shared_expert_intermediate_size=c.shared_expert_dim, qkv_bias=c.qkv_bias)
    return out


def _classifier_fields(out: dict, c: ModelConfig, tokens: dict | None) -> None:
    """A classifier's labels (transformers' id2label/label2id, the template's names where they fit) and pad
    id, which its pooling needs to find each row's last token in a batch: the template's, else the
    tokenizer's pad, else eos, else 0."""
    n = c.num_labels
    names = {int(k): str(v) for k, v in (out.get("id2label") or {}).items()}
    if sorted(names) != list(range(n)) or len(set(names.values())) != n:
        names = {i: f"LABEL_{i}" for i in range(n)}
    out.pop("num_labels", None)  # older writers' spelling; id2label says it
    out.update(id2label={str(i): names[i] for i in range(n)}, label2id={names[i]: i for i in range(n)})
    if out.get("pad_token_id") is None:
        eos = out.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos  # LLaMA-3 names several
        pad = next((t for t in ((tokens or {}).get("pad_token_id"), eos) if isinstance(t, int) and t >= 0), 0)
        out["pad_token_id"] = pad


def tensor_maps(c: ModelConfig, fused_experts: bool = False) -> tuple[list[TensorMap], list[TensorMap]]:
    """(top-level maps, per-layer maps) for the model `c`; `layer_maps` picks a layer's. The experts of an
    MoE model are the hub's one tensor per expert, or with `fused_experts` the stacked tensors transformers 5
    holds in memory (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), which some writers save."""
    if c.num_labels:
        family_for(c)  # a classifier Hugging Face has no layout for is an error, not a made-up one
    if c.architecture == "bert":
        return bert_family.tensor_maps(c)
    if c.architecture == "t5":
        return t5_family.tensor_maps(c)
    return _gpt2_maps(c) if c.architecture == "gpt2" else _llama_maps(c, fused_experts)


def _llama_maps(c: ModelConfig, fused_experts: bool = False):
    d, n, k, h, f, v = c.d_model, c.num_heads, c.num_kv_heads, c.resolved_head_dim, c.mlp_dim, c.vocab_size
    top = [
        TensorMap("model.embed_tokens.weight", ("embed", "embedding"), (v, d), (v, d), (0, 1)),
        TensorMap("model.norm.weight", ("final_norm", "scale"), (d,), (d,), (0,)),
    ]
    if c.num_labels:  # a classifier's head, nn.Linear(hidden, num_labels): label-major like jaxlm's
        top.append(TensorMap("score.weight", ("score",), (c.num_labels, d), (c.num_labels, d), (0, 1)))
    elif not c.tie_embeddings:
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
        TensorMap(p + "mlp.gate_proj.weight", ("mlp", "gate"), (f, d), (f, d), (1, 0), moe=False),
        TensorMap(p + "mlp.up_proj.weight", ("mlp", "up"), (f, d), (f, d), (1, 0), moe=False),
        TensorMap(p + "mlp.down_proj.weight", ("mlp", "down"), (d, f), (d, f), (1, 0), moe=False),
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
    if c.num_experts:
        layer += _moe_maps(c, fused_experts)
    return top, layer


def _moe_maps(c: ModelConfig, fused: bool) -> list[TensorMap]:
    """An MoE layer's maps. The router is x @ router (D, E) (HF: gate.weight (E, D)); the experts stack
    (E, D, F) gate and up and (E, F, D) down (HF per expert: (F, D) and (D, F); fused: gate_up (E, 2F, D) with
    gate first, down (E, D, F))."""
    d, e, fe, fs = c.d_model, c.num_experts, c.resolved_expert_mlp_dim, c.shared_expert_dim
    family = family_for(c)
    p = "model.layers.{i}."
    moe = p + ("block_sparse_moe." if family == "mixtral" and not fused else "mlp.")
    maps = [TensorMap(moe + "gate.weight", ("moe", "router"), (e, d), (e, d), (1, 0), moe=True)]
    if fused:
        maps += [
            TensorMap(moe + "experts.gate_up_proj", ("moe", "gate"), (e, 2 * fe, d), (e, 2, fe, d), (0, 2, 1), (1, 0),
                      moe=True),
            TensorMap(moe + "experts.gate_up_proj", ("moe", "up"), (e, 2 * fe, d), (e, 2, fe, d), (0, 2, 1), (1, 1),
                      moe=True),
            TensorMap(moe + "experts.down_proj", ("moe", "down"), (e, d, fe), (e, d, fe), (0, 2, 1), moe=True),
        ]
    else:
        gate, up, down = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        x = moe + "experts.{j}."
        maps += [
            TensorMap(x + f"{gate}.weight", ("moe", "gate"), (fe, d), (fe, d), (1, 0), experts=e, moe=True),
            TensorMap(x + f"{up}.weight", ("moe", "up"), (fe, d), (fe, d), (1, 0), experts=e, moe=True),
            TensorMap(x + f"{down}.weight", ("moe", "down"), (d, fe), (d, fe), (1, 0), experts=e, moe=True),
        ]
    if fs:
        s = p + "mlp.shared_expert."
        maps += [
            TensorMap(s + "gate_proj.weight", ("moe", "shared", "gate"), (fs, d), (fs, d), (1, 0), moe=True),
            TensorMap(s + "up_proj.weight", ("moe", "shared", "up"), (fs, d), (fs, d), (1, 0), moe=True),
            TensorMap(s + "down_proj.weight", ("moe", "shared", "down"), (d, fs), (d, fs), (1, 0), moe=True),
        ]
    if c.shared_expert_gate:
        maps.append(TensorMap(p + "mlp.shared_expert_gate.weight", ("moe", "shared_gate"), (1, d), (1, d), (1, 0),
                              moe=True))
    return maps


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
