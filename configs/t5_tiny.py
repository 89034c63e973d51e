"""CPU quickstart for encoder-decoders: a T5 v1.1-style model (gated-GELU, untied head, 2 + 2 layers, d_model
128) pretrained with span corruption on the King James Bible: 128 input tokens per row, the targets T5
derives from them."""

from jaxlm.core.config import CheckpointConfig, Config, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="t5_tiny",
        model=ModelConfig(
            architecture="t5", vocab_size=8192, d_model=128, num_layers=2, num_decoder_layers=2, num_heads=4,
            num_kv_heads=4, head_dim=32, mlp_dim=256, mlp_activation="gated_gelu_tanh", tie_embeddings=False,
            norm_eps=1e-6, relative_buckets=32, relative_max_distance=128, max_seq_len=128,
            dtype="float32",  # CPUs have no fast bf16
        ),
        objective=ObjectiveConfig(kind="span_corruption"),
        optim=OptimConfig(lr=2e-3, warmup_steps=30, weight_decay=0.01),
        train=TrainConfig(steps=300, batch_size=16, seq_len=128, log_every=10, eval_every=100),
        checkpoint=CheckpointConfig(every=100),
    )
