"""Qwen2 0.5B shape (494M parameters, QKV bias, tied embeddings, 2 KV heads)."""

from jaxlm.core.config import Config, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="qwen2_0_5b",
        model=ModelConfig(
            vocab_size=151936, d_model=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
            mlp_dim=4864, max_seq_len=32768, norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True,
            tie_embeddings=True, remat="dots_no_batch",
        ),
        optim=OptimConfig(lr=3e-4, warmup_steps=1000),
        train=TrainConfig(steps=100_000, batch_size=256, seq_len=4096),
    )
