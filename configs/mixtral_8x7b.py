"""Mixtral-8x7B-v0.1 shape: 46.70B parameters, 12.88B active per token (8 SwiGLU experts per layer, top 2).

Exact counts (the architecture of mistralai/Mixtral-8x7B-v0.1, checked through `jax.eval_shape` in
tests/test_moe_presets.py): 46,702,792,704 total and 12,879,925,248 active (embedding, attention, norms,
router and 2 of the 8 experts), as published.

The mesh defaults to all-FSDP, which runs on any device count. Expert parallelism splits the experts over
devices instead of gathering all 8 experts' weights in every layer, e.g. `mesh.expert=8` (8 divides 8
experts; tokens then travel to their experts by all-to-all). Each device then receives up to 8x its own
assignments, so a smaller micro-batch suits it: `jaxlm plan mixtral_8x7b --target v5p-128 mesh.expert=8
optim.grad_accum=8` fits, and shows the experts' memory and the all-to-all traffic.
"""

from jaxlm.core.config import Config, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="mixtral_8x7b",
        model=ModelConfig(
            vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
            mlp_dim=14336, max_seq_len=32768, norm_eps=1e-5, rope_theta=1_000_000.0, tie_embeddings=False,
            remat="full", num_experts=8, experts_per_token=2, expert_mlp_dim=14336, router="softmax_topk",
            norm_topk_prob=True,  # Mixtral: softmax over all 8, top 2, renormalised (= softmax of the top 2)
            router_aux_loss=0.02,  # Mixtral's router_aux_loss_coef
        ),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000),
        train=TrainConfig(steps=100_000, batch_size=512, seq_len=4096),
    )
