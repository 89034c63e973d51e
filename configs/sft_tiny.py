"""LoRA SFT (rank 8 on every attention and MLP projection) on the English chatterbot-corpus chats. With
model.init_from=runs/tiny it finetunes the pretrained `tiny` model: 400 steps of 8 x 128 tokens (about 3
epochs of the 1,842 conversations that fit), about 2 minutes on the shared 2-core CPU (3 when it is busy),
held-out assistant-token loss 8.88 -> 2.21. The greedy answers are short English ("I am not.") but not yet
the corpus' own: a 5M-parameter base pretrained for 400 steps on the KJV learns the chats slowly through
rank-8 adapters. Full finetuning (lora.targets='()', optim.lr=1e-3, train.steps=300) fits them far better
in about the same time (held-out loss 0.61), yet its answers are still generic. On its own the preset
starts from random weights (a smoke run). dpo_tiny, reward_tiny and grpo_tiny build on it."""

import dataclasses

from jaxlm.configs import tiny
from jaxlm.core.config import FinetuneConfig, LoraConfig, OptimConfig, TrainConfig


def config():
    base = tiny.config()
    return dataclasses.replace(
        base, name="sft_tiny", task="sft",
        # alpha / rank = 4 with lr 3e-3: the fastest adapter learning found (lr 1e-2 ends worse, in garbage).
        lora=LoraConfig(targets=(r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$"), rank=8, alpha=32.0),
        finetune=FinetuneConfig(data="chatterbot:english"),
        optim=OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.0),
        train=TrainConfig(steps=400, batch_size=8, seq_len=128, log_every=10),
    )
