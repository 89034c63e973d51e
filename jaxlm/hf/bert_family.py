"""BERT and RoBERTa masked-LM checkpoints (`BertForMaskedLM`, `RobertaForMaskedLM`) <-> jaxlm's encoder
(`model.architecture=bert`, jaxlm/model/bert.py): config.json mapping and tensor maps.

The two differ in their tensor prefixes and head names, and in positions: RoBERTa numbers them from its pad
id + 1, which jaxlm keeps as `model.position_offset` (0 for BERT), so the family of a jaxlm encoder is
RoBERTa exactly when it has an offset.
"""

from __future__ import annotations

import dataclasses

from jaxlm.core.config import ConfigError, ModelConfig
from jaxlm.hf.tensor_map import DENSE, TensorMap, require

FAMILIES = ("bert", "roberta")
# config.json hidden_act -> model.mlp_activation. RoBERTa's head applies exact GELU whatever hidden_act says,
# so it takes only "gelu".
BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def model_config(hf: dict, base: ModelConfig, family: str) -> ModelConfig:
    acts = BERT_ACTIVATIONS if family == "bert" else {"gelu": "gelu"}
    require(hf, "hidden_act", list(acts), f"{family} activation")
    require(hf, "position_embedding_type", ["absolute"], "relative position embeddings")
    require(hf, "is_decoder", [False], "a causal decoder")
    require(hf, "add_cross_attention", [False], "cross-attention")
    require(hf, "tie_word_embeddings", [True], "an MLM decoder apart from the word embeddings")
    offset = 0
    if family == "roberta":  # positions padding_idx+1, padding_idx+2, ...
        pad = hf.get("pad_token_id", 1)
        if not isinstance(pad, int) or pad < 0:
            raise ConfigError(f"config.json pad_token_id={pad!r} is not supported (RoBERTa's positions start after it)")
        offset = pad + 1
    positions = hf["max_position_embeddings"]
    if positions <= offset:
        raise ConfigError(f"config.json max_position_embeddings={positions} leaves no position after the offset "
                          f"pad_token_id+1={offset}")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    return dataclasses.replace(
        base, architecture="bert", vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"],
        num_heads=n, num_kv_heads=n, head_dim=d // n, mlp_dim=hf["intermediate_size"],
        max_seq_len=positions - offset, position_offset=offset, type_vocab_size=hf.get("type_vocab_size", 2),
        norm_eps=hf.get("layer_norm_eps", 1e-12), mlp_activation=acts[hf.get("hidden_act", "gelu")],
        qkv_bias=True, qk_norm=False, tie_embeddings=True, sliding_window=0, rope_scaling_factor=0.0, **DENSE,
    )


def family_for(c: ModelConfig) -> str:
    """"roberta" for an encoder with a position offset, else "bert"; a ConfigError for what neither holds."""
    family = "roberta" if c.position_offset else "bert"
    no = f"model.architecture=bert with %s has no Hugging Face {family} layout; it cannot be exported"
    act = c.resolved_mlp_activation
    if act not in (BERT_ACTIVATIONS.values() if family == "bert" else ("gelu",)):
        raise ConfigError(no % f"model.mlp_activation={act}")
    if c.resolved_head_dim * c.num_heads != c.d_model:
        raise ConfigError(no % f"model.head_dim={c.resolved_head_dim} (not d_model / num_heads)")
    if not c.type_vocab_size:  # transformers always looks up a token type, 0 by default
        raise ConfigError(no % "model.type_vocab_size=0 (set it to 1 or more)")
    return family


def hf_config_fields(out: dict, c: ModelConfig, family: str) -> None:
    """Sets the encoder's fields of a config.json being written (`families.hf_config`)."""
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[c.resolved_mlp_activation]
    out.pop("position_embedding_type", None)  # transformers 5 knows absolute positions only
    out.update(hidden_size=c.d_model, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
               intermediate_size=c.mlp_dim, hidden_act=act, max_position_embeddings=c.max_seq_len + c.position_offset,
               type_vocab_size=c.type_vocab_size, layer_norm_eps=c.norm_eps, is_decoder=False,
               add_cross_attention=False, tie_word_embeddings=True)
    if family == "roberta":
        out["pad_token_id"] = c.position_offset - 1
    else:
        out.setdefault("pad_token_id", 0)


def tensor_maps(c: ModelConfig) -> tuple[list[TensorMap], list[TensorMap]]:
    """(top-level maps, per-layer maps). nn.Linear stores (out, in); jaxlm (in, ..., out), q/k/v split by head."""
    family = "roberta" if c.position_offset else "bert"
    d, n, h, f, v = c.d_model, c.num_heads, c.resolved_head_dim, c.mlp_dim, c.vocab_size
    e = f"{family}.embeddings."
    top = [
        TensorMap(e + "word_embeddings.weight", ("embed", "embedding"), (v, d), (v, d), (0, 1)),
        TensorMap(e + "position_embeddings.weight", ("pos_embed",), *(((c.max_seq_len + c.position_offset, d),) * 2),
                  (0, 1)),
    ]
    if c.type_vocab_size:
        top.append(TensorMap(e + "token_type_embeddings.weight", ("type_embed",), *(((c.type_vocab_size, d),) * 2),
                             (0, 1)))
    head, head_norm = ("lm_head.", "lm_head.layer_norm.") if family == "roberta" else (
        "cls.predictions.transform.", "cls.predictions.transform.LayerNorm.")
    top += _norm(e + "LayerNorm.", ("embed_norm",), d) + _norm(head_norm, ("mlm", "norm"), d) + [
        TensorMap(head + "dense.weight", ("mlm", "dense"), (d, d), (d, d), (1, 0)),
        TensorMap(head + "dense.bias", ("mlm", "dense_bias"), (d,), (d,), (0,)),
        TensorMap("lm_head.bias" if family == "roberta" else "cls.predictions.bias", ("mlm", "bias"), (v,), (v,), (0,)),
    ]
    p = f"{family}.encoder.layer.{{i}}."
    layer = []
    for name, hf_name in (("q", "query"), ("k", "key"), ("v", "value")):
        layer += [
            TensorMap(p + f"attention.self.{hf_name}.weight", ("attn", name), (n * h, d), (n, h, d), (2, 0, 1)),
            TensorMap(p + f"attention.self.{hf_name}.bias", ("attn", f"{name}_bias"), (n * h,), (n, h), (0, 1)),
        ]
    layer += [
        TensorMap(p + "attention.output.dense.weight", ("attn", "o"), (d, n * h), (d, n, h), (1, 2, 0)),
        TensorMap(p + "attention.output.dense.bias", ("attn", "o_bias"), (d,), (d,), (0,)),
        TensorMap(p + "intermediate.dense.weight", ("mlp", "up"), (f, d), (f, d), (1, 0)),
        TensorMap(p + "intermediate.dense.bias", ("mlp", "up_bias"), (f,), (f,), (0,)),
        TensorMap(p + "output.dense.weight", ("mlp", "down"), (d, f), (d, f), (1, 0)),
        TensorMap(p + "output.dense.bias", ("mlp", "down_bias"), (d,), (d,), (0,)),
    ]
    layer += _norm(p + "attention.output.LayerNorm.", ("attn_norm",), d)
    layer += _norm(p + "output.LayerNorm.", ("mlp_norm",), d)
    return top, layer


def _norm(prefix: str, path: tuple[str, ...], d: int) -> list[TensorMap]:
    return [TensorMap(prefix + "weight", (*path, "scale"), (d,), (d,), (0,)),
            TensorMap(prefix + "bias", (*path, "bias"), (d,), (d,), (0,))]


def legacy_name(name: str) -> str:
    """Older BERT uploads name LayerNorm's weight and bias gamma and beta (transformers renames them too)."""
    for old, new in ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias")):
        if name.endswith(old):
            return name[: -len(old)] + new
    return name
