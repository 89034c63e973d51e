"""Full SFT on the English chatterbot-corpus chats. With model.init_from=runs/tiny it finetunes the pretrained
`tiny` model: 1,000 steps of 8 x 96 tokens (about 11 passes over the 721 distinct conversations that fit),
about 5 minutes on the shared 2-core CPU, train loss 0.97, held-out assistant-token loss 9.66 -> 3.39 at
its best (step 250; the corpus' chats barely generalise, so later steps memorise them). Its greedy answers to
the corpus' own prompts are the corpus' kind ("How are you doing?" -> "I am not a computer program, and i
shouldn't."; "In what country did carving jack o' lanterns originate?" -> "Ireland"): their best word F1
against the corpus' answers averages 0.14 on 60 of its prompts, 2.6x the earlier LoRA preset's 0.054 (which
answered "I am a great." to everything). On its own the preset starts from random weights (a smoke run).
dpo_tiny, reward_tiny, grpo_tiny and ppo_tiny build on it, with LoRA adapters (ADAPTERS)."""

import dataclasses

from jaxlm.configs import tiny
from jaxlm.core.config import FinetuneConfig, LoraConfig, OptimConfig, TrainConfig

# Rank 8 on every attention and MLP projection, alpha / rank = 4: the LoRA presets built on this one.
ADAPTERS = LoraConfig(targets=(r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$"), rank=8, alpha=32.0)


def config():
    base = tiny.config()
    return dataclasses.replace(
        base, name="sft_tiny", task="sft",
        # Full finetuning: rank-8 adapters on a 5M-parameter model learned the chats far more slowly (held-out
        # loss 5.9 after 400 steps, one answer for every prompt).
        lora=LoraConfig(),
        finetune=FinetuneConfig(data="chatterbot:english"),
        optim=OptimConfig(lr=2e-3, warmup_steps=20, weight_decay=0.0),
        train=TrainConfig(steps=1000, batch_size=8, seq_len=96, log_every=10, eval_every=250),
    )
