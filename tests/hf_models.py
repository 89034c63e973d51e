"""Small random Hugging Face models, built with transformers + torch on CPU and saved offline, for the
import/export tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, rms_norm_eps=1e-6)

FAMILIES = {
    # GQA and LLaMA-3 RoPE scaling (small original length so that the scaling changes the frequencies).
    "llama": ("LlamaConfig", dict(COMMON, num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, rope_theta=500000.0)),
    "mistral": ("MistralConfig", dict(COMMON, num_key_value_heads=1, sliding_window=5, head_dim=8)),
    "qwen2": ("Qwen2Config", dict(COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(COMMON, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}

# Mixture-of-experts families: 5 experts (4 for Mixtral), top 2, experts 24 wide.
MOE = dict(COMMON, num_key_value_heads=2, num_experts_per_tok=2, router_aux_loss_coef=0.02)
MOE_FAMILIES = {
    # Every layer MoE, sliding_window null, top-k weights renormalised.
    "mixtral": ("MixtralConfig", dict(MOE, intermediate_size=24, num_local_experts=4)),
    # A sigmoid-gated shared expert, q/k/v biases, tied embeddings, top-k weights not renormalised.
    "qwen2_moe": ("Qwen2MoeConfig", dict(MOE, moe_intermediate_size=24, shared_expert_intermediate_size=20,
                                         num_experts=5, norm_topk_prob=False, tie_word_embeddings=True)),
    # Dense layer 0 (an MLP 48 wide), then two MoE layers; qk_norm; renormalised.
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, num_hidden_layers=3, head_dim=16, moe_intermediate_size=24,
                                         num_experts=5, norm_topk_prob=True, mlp_only_layers=[0])),
}


def make_model(family: str, seed: int = 0, **config):
    """A random float32 model of `family` with non-trivial norms and biases; `config` overrides its config."""
    import torch
    import transformers

    config_cls, kwargs = {**FAMILIES, **MOE_FAMILIES}[family]
    config = getattr(transformers, config_cls)(**{**kwargs, **config})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random norms and biases too (their defaults are ones and zeros)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            # Routers with well-separated logits (no near-ties between the k-th and next expert) and experts
            # whose output outweighs the residual, so that routing and expert maths show in the logits.
            if name.endswith("mlp.gate.weight") or ".experts." in name:
                p.normal_(0.0, 0.2)
    return model


def save_model(family: str, directory: str, seed: int = 0, config: dict | None = None, **save_kwargs) -> str:
    make_model(family, seed, **(config or {})).save_pretrained(directory, **save_kwargs)
    return directory


def hf_logits(directory: str, tokens: np.ndarray) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def hf_tensors(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of a saved checkpoint as float32 numpy (bfloat16 included)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update({k: v.to(torch.float32).numpy() for k, v in load_file(os.path.join(directory, name)).items()})
    return out


WORDS = ("in the beginning god created heaven and earth light was good day night evening morning first second "
         "water land sea sky let there be said saw divided called it from").split()


def save_tokenizer(directory: str, vocab_size: int = 96, fill: bool = False) -> None:
    """A word-level tokenizer.json with Qwen-style special tokens and a chat template; with `fill`, every id
    up to `vocab_size` is a word of its own (w0, w1, ...), so any generated token decodes to distinct text."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    words = specials + list(WORDS)
    words += [f"w{i}" for i in range(vocab_size - len(words))] if fill else []
    vocab = {t: i for i, t in enumerate(words)}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(specials[:3])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "bos_token": None, "unk_token": "<unk>", "chat_template": template}, f)
