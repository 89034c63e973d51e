"""Encoder-decoder training throughput: jaxlm's T5 train step against transformers' `T5ForConditionalGeneration`
trained with torch eager AdamW, on the same shapes, in one run.

    python bench/t5_train.py                                  # t5_small, batch 4 x (512 inputs, 114 targets)
    python bench/t5_train.py t5_small train.batch_size=8 --steps 5

Each side runs in its own process (its own peak memory; torch and XLA do not share the 2 cores). The jaxlm
step is the one `jaxlm train` compiles (same assembly, objective, optimizer, donation), fed a synthetic
span-corruption-shaped batch: the encoder row is `train.seq_len` tokens, the decoder row the targets T5
derives for it (`objective_rows.target_length`). tokens/s counts input plus target tokens. MFU uses
`flops.flops_per_token` against a matmul peak measured in the same run. Needs `torch==2.13.0`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _batch(config):
    import numpy as np

    from jaxlm.data.objective_rows import target_length

    t, m = config.train, config.model
    rng = np.random.default_rng(0)
    enc, dec = t.seq_len, target_length(config)
    ones = lambda n: np.ones((t.batch_size, n), np.int32)
    arange = lambda n: np.broadcast_to(np.arange(n, dtype=np.int32), (t.batch_size, n)).copy()
    targets = rng.integers(1, m.vocab_size, size=(t.batch_size, dec)).astype(np.int32)
    return {"inputs": rng.integers(1, m.vocab_size, size=(t.batch_size, enc)).astype(np.int32),
            "positions": arange(enc), "segment_ids": ones(enc),
            "decoder_inputs": np.concatenate([np.zeros((t.batch_size, 1), np.int32), targets[:, :-1]], axis=1),
            "decoder_positions": arange(dec), "decoder_segment_ids": ones(dec), "targets": targets,
            "loss_mask": ones(dec)}


def _timed(step, steps: int, windows: int, sync) -> float:
    for _ in range(3):  # warm up
        sync(step())
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = step()
        sync(out)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def run_jaxlm(words: list[str], steps: int, windows: int) -> dict:
    import jax

    from jaxlm.core import flops, mesh as mesh_lib, overrides
    from jaxlm.core.sharding import global_batch
    from jaxlm.training import assembly
    from train_throughput import measure_matmul_peak

    config = overrides.load(words)
    mesh = mesh_lib.make_mesh(config.mesh)
    spec = assembly.build(config)
    batch_np = _batch(config)
    with jax.set_mesh(mesh):
        state = [assembly.initial_state(spec, assembly.abstract_state(spec, mesh), mesh)]
        batch = global_batch(batch_np, mesh)
        t0 = time.perf_counter()
        compiled = assembly.compile_step(spec, assembly.objective(config, spec), state[0], batch)
        compile_s = time.perf_counter() - t0

        def step():
            state[0], metrics = compiled(state[0], batch)
            return metrics

        step_s = _timed(step, steps, windows, jax.block_until_ready)
    tokens = batch_np["inputs"].size + batch_np["targets"].size
    model_flops = flops.flops_per_token(config.model, config.train.seq_len, batch_np["targets"].shape[1]) * tokens / step_s
    peak = measure_matmul_peak()
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "compile_s": compile_s,
            "params": sum(x.size for x in jax.tree.leaves(state[0].params)),
            "mfu_vs_measured": model_flops / (peak * jax.device_count()), "matmul_peak_gflops": peak / 1e9,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_torch(words: list[str], steps: int, windows: int) -> dict:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from jaxlm.core import overrides

    config = overrides.load(words)
    m = config.model
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.resolved_head_dim, d_ff=m.mlp_dim,
        num_layers=m.num_layers, num_decoder_layers=m.resolved_decoder_layers, num_heads=m.num_heads,
        relative_attention_num_buckets=m.relative_buckets, relative_attention_max_distance=m.relative_max_distance,
        layer_norm_epsilon=m.norm_eps, dropout_rate=0.0, tie_word_embeddings=m.tie_embeddings,
        feed_forward_proj="relu" if m.resolved_mlp_activation == "relu" else "gated-gelu",
        decoder_start_token_id=m.decoder_start_id, pad_token_id=0))
    model.train()
    o = config.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    b = {k: torch.from_numpy(v).long() for k, v in _batch(config).items()}

    def step():
        out = model(input_ids=b["inputs"], attention_mask=b["segment_ids"], decoder_input_ids=b["decoder_inputs"],
                    labels=b["targets"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    with torch.autocast("cpu", enabled=False):
        step_s = _timed(step, steps, windows, lambda loss: loss.item())
    tokens = b["inputs"].numel() + b["targets"].numel()
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "torch_threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="*", default=["t5_small", "train.batch_size=4", "train.seq_len=512",
                                                      "model.dtype=float32"],
                        help="a T5 preset + overrides (default: t5_small, batch 4, 512 input tokens, float32)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timing window")
    parser.add_argument("--windows", type=int, default=3, help="timing windows; the median is reported")
    parser.add_argument("--_side", choices=["jaxlm", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._side:
        run = run_jaxlm if args._side == "jaxlm" else run_torch
        print(json.dumps(run(args.config, args.steps, args.windows)))
        return
    results = {}
    for side in ("jaxlm", "torch"):
        out = subprocess.run([sys.executable, __file__, "--_side", side, "--steps", str(args.steps),
                              "--windows", str(args.windows), *args.config], capture_output=True, text=True,
                             env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
                                  "TF_CPP_MIN_LOG_LEVEL": "3"})
        if out.returncode:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[side]
        print(f"{side:<6} params {r['params']:>12,}  step {r['step_s'] * 1e3:>8.1f} ms  {r['tokens_per_s']:>9,.0f} tokens/s"
              f"  peak RSS {r['peak_rss_mib']:>6,.0f} MiB" +
              (f"  MFU {r['mfu_vs_measured']:.1%} of a measured {r['matmul_peak_gflops']:.0f} GFLOP/s" if side == "jaxlm" else ""))
    print(f"jaxlm / torch eager tokens/s: {results['jaxlm']['tokens_per_s'] / results['torch']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
