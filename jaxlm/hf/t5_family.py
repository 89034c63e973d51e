"""T5-family checkpoints (`T5ForConditionalGeneration`, `MT5ForConditionalGeneration`,
`UMT5ForConditionalGeneration`) <-> jaxlm's encoder-decoder (`model.architecture=t5`, jaxlm/model/t5.py):
config.json mapping and tensor maps.

The three share one tensor layout. UMT5 gives every layer its own relative bias table
(`model.relative_bias_per_layer`); T5 and mT5 keep one per stack in block 0. mT5 is T5 v1.1 with an untied head
and no other difference, so a jaxlm model exports as mT5 only when it was imported from one.

Tied heads: jaxlm's tied T5 head is T5 v1.0's, the shared embedding applied to the hidden states scaled by
d_model**-0.5. transformers 5 writes `tie_word_embeddings: true` for every T5 and keeps that meaning in
`scale_decoder_outputs` (T5, UMT5); its mT5 never rescales, so an mT5 always has its own `lm_head.weight`.
"""

from __future__ import annotations

import dataclasses

from jaxlm.core.config import ConfigError, ModelConfig
from jaxlm.hf.tensor_map import DENSE, TensorMap

FAMILIES = ("t5", "mt5", "umt5")
# config.json feed_forward_proj -> model.mlp_activation, and the dense_act_fn / is_gated_act transformers
# writes beside it (and reads back in preference to it).
ACTIVATIONS = {"relu": "relu", "gated-gelu": "gated_gelu_tanh"}
DENSE_ACT = {"relu": ("relu", False), "gated-gelu": ("gelu_new", True)}
# Copies of shared.weight that some writers keep, and a cross-attention bias table that old T5 checkpoints
# carry and T5 never reads.
IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def model_config(hf: dict, base: ModelConfig, family: str) -> ModelConfig:
    proj = hf.get("feed_forward_proj", "relu" if family == "t5" else "gated-gelu")
    if proj not in ACTIVATIONS:
        raise ConfigError(f"config.json feed_forward_proj={proj!r} is not supported; jaxlm's T5 takes 'relu' "
                          f"(T5 v1.0) or 'gated-gelu' (T5 v1.1, mT5, UMT5)")
    act, gated = DENSE_ACT[proj]
    for key, expected in (("dense_act_fn", act), ("is_gated_act", gated)):
        if key in hf and hf[key] != expected:
            raise ConfigError(f"config.json {key}={hf[key]!r} is not supported with feed_forward_proj={proj!r} "
                              f"(expected {expected!r})")
    if hf.get("is_encoder_decoder", True) is not True or hf.get("is_decoder", False):
        raise ConfigError(f"config.json is_encoder_decoder={hf.get('is_encoder_decoder')!r} / is_decoder="
                          f"{hf.get('is_decoder')!r} is not supported (jaxlm imports the whole encoder-decoder)")
    n = hf["num_heads"]
    start = hf.get("decoder_start_token_id")
    if start is None:  # T5 starts the decoder from its pad token
        start = hf.get("pad_token_id") or 0
    return dataclasses.replace(
        base, architecture="t5", vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], num_heads=n, num_kv_heads=n,
        head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        relative_bias_per_layer=family == "umt5", mlp_activation=ACTIVATIONS[proj], tie_embeddings=_tied(hf, family),
        decoder_start_id=start, qkv_bias=False, qk_norm=False,
        sliding_window=0, rope_scaling_factor=0.0, **DENSE,
    )


def _tied(hf: dict, family: str) -> bool:
    """Whether the head is the shared embedding with T5 v1.0's rescaling (module docstring)."""
    if family == "mt5":
        return False
    if "scale_decoder_outputs" in hf:  # transformers 5
        return bool(hf["scale_decoder_outputs"])
    return bool(hf.get("tie_word_embeddings", True))


def family_for(c: ModelConfig) -> str:
    """"umt5" for per-layer relative bias tables, else "t5" (`families.hf_config` keeps an imported "mt5"); a
    ConfigError for what neither can hold."""
    no = "model.architecture=t5 with %s has no Hugging Face T5 layout; it cannot be exported"
    act = c.resolved_mlp_activation
    if act not in ACTIVATIONS.values():
        raise ConfigError(no % f"model.mlp_activation={act} (T5 has relu or gated_gelu_tanh)")
    if c.num_kv_heads != c.num_heads:
        raise ConfigError(no % f"model.num_kv_heads={c.num_kv_heads} (T5 has one KV head per query head)")
    if c.qkv_bias or c.qk_norm:
        raise ConfigError(no % "model.qkv_bias or model.qk_norm")
    return "umt5" if c.relative_bias_per_layer else "t5"


def hf_config_fields(out: dict, c: ModelConfig, family: str) -> None:
    """Sets the T5 fields of a config.json being written (`families.hf_config`)."""
    proj = {v: k for k, v in ACTIVATIONS.items()}[c.resolved_mlp_activation]
    act, gated = DENSE_ACT[proj]
    out.pop("scale_decoder_outputs", None)
    out.update(d_model=c.d_model, d_kv=c.resolved_head_dim, d_ff=c.mlp_dim, num_layers=c.num_layers,
               num_decoder_layers=c.resolved_decoder_layers, num_heads=c.num_heads,
               relative_attention_num_buckets=c.relative_buckets,
               relative_attention_max_distance=c.relative_max_distance, layer_norm_epsilon=c.norm_eps,
               feed_forward_proj=proj, dense_act_fn=act, is_gated_act=gated, is_encoder_decoder=True,
               is_decoder=False, decoder_start_token_id=c.decoder_start_id)
    if family != "mt5":  # transformers 5 reads the head's rescaling here
        out["scale_decoder_outputs"] = c.tie_embeddings
    if out.get("pad_token_id") is None:  # transformers shifts labels right with it; T5 starts from pad
        out["pad_token_id"] = c.decoder_start_id


def tensor_maps(c: ModelConfig) -> tuple[list[TensorMap], list[TensorMap]]:
    """(top-level maps, per-layer maps of both stacks). nn.Linear stores (out, in); jaxlm (in, ..., out), split
    by head. The relative bias tables are (buckets, heads) on both sides."""
    d, v, rn = c.d_model, c.vocab_size, (c.relative_buckets, c.num_heads)
    top = [TensorMap("shared.weight", ("embed", "embedding"), (v, d), (v, d), (0, 1))]
    layer = []
    for stack in ("encoder", "decoder"):
        top.append(TensorMap(f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale"), (d,), (d,), (0,)))
        bias = f"{stack}.block.{{i}}.layer.0.SelfAttention.relative_attention_bias.weight"
        if c.relative_bias_per_layer:
            layer.append(TensorMap(bias, ("attn", "relative_bias"), rn, rn, (0, 1), stack=stack))
        else:
            top.append(TensorMap(bias.format(i=0), (stack, "relative_bias"), rn, rn, (0, 1)))
        p = f"{stack}.block.{{i}}.layer."
        parts = [("0.SelfAttention.", "attn", "attn_norm")]
        if stack == "decoder":
            parts.append(("1.EncDecAttention.", "cross", "cross_norm"))
        for prefix, name, norm in parts:
            layer += _attention(c, p + prefix, name, stack)
            layer.append(TensorMap(p + prefix[:2] + "layer_norm.weight", (norm, "scale"), (d,), (d,), (0,), stack=stack))
        ff = p + f"{len(parts)}."
        layer += _mlp(c, ff + "DenseReluDense.", stack)
        layer.append(TensorMap(ff + "layer_norm.weight", ("mlp_norm", "scale"), (d,), (d,), (0,), stack=stack))
    if not c.tie_embeddings:
        top.append(TensorMap("lm_head.weight", ("lm_head",), (v, d), (v, d), (0, 1)))
    return top, layer


def _attention(c: ModelConfig, prefix: str, name: str, stack: str) -> list[TensorMap]:
    d, n, h = c.d_model, c.num_heads, c.resolved_head_dim
    maps = [TensorMap(prefix + f"{w}.weight", (name, w), (n * h, d), (n, h, d), (2, 0, 1), stack=stack)
            for w in ("q", "k", "v")]
    return maps + [TensorMap(prefix + "o.weight", (name, "o"), (d, n * h), (d, n, h), (1, 2, 0), stack=stack)]


def _mlp(c: ModelConfig, prefix: str, stack: str) -> list[TensorMap]:
    d, f = c.d_model, c.mlp_dim
    ins = ("wi_0", "wi_1") if c.resolved_mlp_activation.startswith("gated_") else ("wi",)
    maps = [TensorMap(prefix + f"{w}.weight", ("mlp", w), (f, d), (f, d), (1, 0), stack=stack) for w in ins]
    return maps + [TensorMap(prefix + "wo.weight", ("mlp", "wo"), (d, f), (d, f), (1, 0), stack=stack)]
