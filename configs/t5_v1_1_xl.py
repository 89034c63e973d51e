"""T5 v1.1 XL shape (google/t5-v1_1-xl, 2,849,757,184 parameters): gated-GELU MLP, untied head, 24 + 24
layers, 32 heads of 64; span-corruption pretraining in bfloat16 with rematerialised layers."""

from jaxlm.core.config import Config, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="t5_v1_1_xl",
        model=ModelConfig(
            architecture="t5", vocab_size=32128, d_model=2048, num_layers=24, num_decoder_layers=24, num_heads=32,
            num_kv_heads=32, head_dim=64, mlp_dim=5120, mlp_activation="gated_gelu_tanh", tie_embeddings=False,
            norm_eps=1e-6, relative_buckets=32, relative_max_distance=128, max_seq_len=512,
            remat="dots_no_batch",
        ),
        objective=ObjectiveConfig(kind="span_corruption"),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000, weight_decay=0.0),
        train=TrainConfig(steps=100_000, batch_size=256, seq_len=512),
    )
