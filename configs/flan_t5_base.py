"""Flan-T5 base shape (google/flan-t5-base, 247,577,856 parameters; T5 v1.1 layout): gated-GELU MLP, untied
head, 12 + 12 layers; span-corruption pretraining (or finetuning with model.init_from=hf:DIR)."""

from jaxlm.core.config import Config, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="flan_t5_base",
        model=ModelConfig(
            architecture="t5", vocab_size=32128, d_model=768, num_layers=12, num_decoder_layers=12, num_heads=12,
            num_kv_heads=12, head_dim=64, mlp_dim=2048, mlp_activation="gated_gelu_tanh", tie_embeddings=False,
            norm_eps=1e-6, relative_buckets=32, relative_max_distance=128, max_seq_len=512,
        ),
        objective=ObjectiveConfig(kind="span_corruption"),
        optim=OptimConfig(lr=5e-4, warmup_steps=1000, weight_decay=0.0),
        train=TrainConfig(steps=100_000, batch_size=128, seq_len=512),
    )
