"""T5 v1.0 small shape (google-t5/t5-small, 60,506,624 parameters): ReLU MLP, head tied to the shared
embedding, 6 + 6 layers; span-corruption pretraining."""

from jaxlm.core.config import Config, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="t5_small",
        model=ModelConfig(
            architecture="t5", vocab_size=32128, d_model=512, num_layers=6, num_decoder_layers=6, num_heads=8,
            num_kv_heads=8, head_dim=64, mlp_dim=2048, mlp_activation="relu", tie_embeddings=True, norm_eps=1e-6,
            relative_buckets=32, relative_max_distance=128, max_seq_len=512,
        ),
        objective=ObjectiveConfig(kind="span_corruption"),
        optim=OptimConfig(lr=1e-3, warmup_steps=1000, weight_decay=0.0),
        train=TrainConfig(steps=100_000, batch_size=128, seq_len=512),
    )
