"""CPU quickstart for an encoder: a BERT-style model pretrained with masked LM (15%, 80/10/10) on the King
James Bible, a few minutes on 2 CPU cores. Its tokenizer is trained by the run, with one extra piece as the
mask token."""

from jaxlm.core.config import CheckpointConfig, Config, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="bert_tiny",
        model=ModelConfig(
            architecture="bert", vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4,
            mlp_dim=1024, max_seq_len=128, type_vocab_size=2, norm_eps=1e-12, tie_embeddings=True,
            dtype="float32",  # CPUs have no fast bf16
        ),
        objective=ObjectiveConfig(kind="mlm"),
        optim=OptimConfig(lr=1e-3, warmup_steps=40, weight_decay=0.01),
        train=TrainConfig(steps=400, batch_size=16, seq_len=128, log_every=10, eval_every=100),
        checkpoint=CheckpointConfig(every=100),
    )
