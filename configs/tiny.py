"""CPU quickstart: a 6M-parameter LLaMA-style model on the King James Bible, about 5 minutes on 2 CPU cores."""

from jaxlm.core.config import CheckpointConfig, Config, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="tiny",
        model=ModelConfig(
            vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=768,
            max_seq_len=256, tie_embeddings=True, dtype="float32",  # CPUs have no fast bf16
        ),
        optim=OptimConfig(lr=2e-3, warmup_steps=40, weight_decay=0.1),
        train=TrainConfig(steps=400, batch_size=8, seq_len=256, log_every=10, eval_every=100),
        checkpoint=CheckpointConfig(every=100),
    )
