"""PyTorch eager reference for the throughput benchmark: HF `LlamaForCausalLM` + AdamW on CPU, float32.

Needs `torch==2.13.0` and `transformers` (not jaxlm dependencies). Prints one JSON line. Called by
`bench/train_throughput.py --torch`; runs the same shape as a jaxlm preset.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", nargs="*", default=["bench_18m"], help="jaxlm preset + overrides to mirror")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--windows", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxlm.core import overrides

    c = overrides.load(args.config)
    m, t = c.model, c.train
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        head_dim=m.resolved_head_dim, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, attn_implementation="sdpa",
    ))
    opt = torch.optim.AdamW(model.parameters(), lr=c.optim.lr, weight_decay=c.optim.weight_decay)
    tokens = torch.randint(0, m.vocab_size, (t.batch_size, t.seq_len))

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    times = []
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        times.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(times)
    print(json.dumps({"step_s": step_s, "tokens_per_s": t.batch_size * t.seq_len / step_s,
                      "torch_threads": torch.get_num_threads(),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
