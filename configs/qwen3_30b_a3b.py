"""Qwen3-30B-A3B shape: 30.53B parameters, 3.35B active per token (128 experts per layer, top 8).

Exact counts (the architecture of Qwen/Qwen3-30B-A3B, checked through `jax.eval_shape` in
tests/test_moe_presets.py): 30,532,122,624 total and 3,353,032,704 active (embedding and head, attention with
QK norms, layer norms, router and 8 of the 128 experts); published as 30.5B and 3.3B.

The mesh defaults to all-FSDP, which runs on any device count. With 128 small experts (768 wide) expert
parallelism is the natural split, e.g. `mesh.expert=16` or `mesh.expert=32` (a divisor of 128; the rest of
the devices stay FSDP), with micro-batches small enough for the all-to-all's worst-case buffers:
`jaxlm plan qwen3_30b_a3b --target v5p-128 mesh.expert=16 optim.grad_accum=4` fits, and shows the experts'
memory and all-to-all traffic.
"""

from jaxlm.core.config import Config, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="qwen3_30b_a3b",
        model=ModelConfig(
            vocab_size=151936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
            mlp_dim=6144,  # Hugging Face's intermediate_size: unused, every layer is MoE
            max_seq_len=40960, norm_eps=1e-6, rope_theta=1_000_000.0, qk_norm=True,
            tie_embeddings=False, remat="full", num_experts=128, experts_per_token=8, expert_mlp_dim=768,
            router="softmax_topk", norm_topk_prob=True,
            router_aux_loss=0.001,  # Qwen3-MoE's router_aux_loss_coef
        ),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000),
        train=TrainConfig(steps=100_000, batch_size=512, seq_len=4096),
    )
