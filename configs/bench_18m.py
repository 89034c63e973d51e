"""The 18M-parameter reference shape used to compare trainers on one CPU host (see bench/)."""

from jaxlm.core.config import Config, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="bench_18m",
        model=ModelConfig(
            vocab_size=32000, d_model=256, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=64,
            mlp_dim=512, max_seq_len=256, dtype="float32",
        ),
        optim=OptimConfig(lr=3e-4, warmup_steps=10),
        train=TrainConfig(steps=50, batch_size=4, seq_len=256),
    )
