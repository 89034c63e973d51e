"""CPU quickstart: a 6M-parameter LLaMA-style model on the King James Bible, a few minutes on a laptop."""

from jaxlm.config import CheckpointConfig, Config, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="tiny",
        model=ModelConfig(
            vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=768,
            max_seq_len=256, tie_embeddings=True, dtype="float32",  # CPUs have no fast bf16
        ),
        optim=OptimConfig(lr=2e-3, warmup_steps=50, weight_decay=0.1),
        train=TrainConfig(steps=600, batch_size=16, seq_len=256, log_every=10, eval_every=200),
        checkpoint=CheckpointConfig(every=200),
    )
