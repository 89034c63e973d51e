"""LLaMA 3.2 1B shape (1.24B parameters, tied embeddings, LLaMA-3 RoPE scaling)."""

from jaxlm.core.config import Config, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="llama3_1b",
        model=ModelConfig(
            vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
            mlp_dim=8192, max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
            rope_original_max_len=8192, tie_embeddings=True, remat="dots_no_batch",
        ),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000),
        train=TrainConfig(steps=100_000, batch_size=256, seq_len=4096),
    )
