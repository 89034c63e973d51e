"""LoRA SFT on the English chatterbot-corpus chats. On its own it starts from random weights (a smoke run of
seconds); with model.init_from=runs/tiny it finetunes the pretrained `tiny` model."""

import dataclasses

from jaxlm.configs import tiny
from jaxlm.core.config import FinetuneConfig, LoraConfig, OptimConfig, TrainConfig


def config():
    base = tiny.config()
    return dataclasses.replace(
        base, name="sft_tiny", task="sft",
        lora=LoraConfig(targets=(r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$"), rank=8, alpha=16.0),
        finetune=FinetuneConfig(data="chatterbot:english"),
        optim=OptimConfig(lr=2e-3, warmup_steps=10, weight_decay=0.0),
        train=TrainConfig(steps=60, batch_size=8, seq_len=128, log_every=10),
    )
