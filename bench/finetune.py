"""Finetuning cost: full finetune vs LoRA vs QLoRA (int8, NF4) on one model: tokens/s and memory.

    python bench/finetune.py                                  # a 31M LLaMA-shaped model, 4 modes
    python bench/finetune.py tiny --steps 20 --modes full lora

Each mode runs in its own process (so that its peak RSS is its own) and compiles the step `jaxlm finetune`
runs (same state layout, trainable mask, donation), fed synthetic tokens with every token trained. Printed
per mode: trainable parameters, bytes of the frozen/trained params and of the optimizer state as held in
the train state, the compiled step's temporaries (XLA's memory analysis), the median step time and
tokens/s over the timed steps, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = {"full": ((), "none"), "lora": (None, "none"), "qlora-int8": (None, "int8"), "qlora-nf4": (None, "nf4")}
TARGETS = (r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$")
DEFAULT = ["tiny", "model.d_model=512", "model.num_layers=8", "model.num_heads=8", "model.num_kv_heads=8",
           "model.mlp_dim=1536", "model.max_seq_len=256"]


def nbytes(tree) -> int:
    """Bytes of the arrays in a pytree (quantized arrays are their codes and scales; masked leaves hold none)."""
    import jax

    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def run_one(words: list[str], mode: str, steps: int, batch: int, seq: int, rank: int) -> dict:
    import dataclasses

    import jax
    import numpy as np

    from jaxlm.core import mesh as mesh_lib, overrides
    from jaxlm.core.config import MeshConfig
    from jaxlm.core.sharding import global_batch
    from jaxlm.training import assembly

    targets, quant = MODES[mode]
    config = overrides.load(words + [f"train.batch_size={batch}", f"train.seq_len={seq}", f"train.steps={steps + 2}"])
    lora = dataclasses.replace(config.lora, targets=TARGETS if targets is None else (), rank=rank, quantize=quant,
                               block_size=64)
    config = dataclasses.replace(config, lora=lora, mesh=MeshConfig(fsdp=1), task="sft")
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    spec = assembly.build(config)  # what `jaxlm finetune` builds
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, size=(batch, seq + 1)).astype(np.int32)
    batch_np = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                "segment_ids": np.ones((batch, seq), np.int32), "loss_mask": np.ones((batch, seq), np.int32)}
    with jax.set_mesh(mesh):
        state = assembly.initial_state(spec, assembly.abstract_state(spec, mesh), mesh)
        lo, params = spec.lora, state.params
        frozen = params["base"] if lo else {}
        trained = params["lora"] if lo else params
        b = global_batch(batch_np, mesh)
        t0 = time.perf_counter()
        compiled = assembly.compile_step(spec, assembly.objective(config, spec), state, b)
        compile_s = time.perf_counter() - t0
        memory = compiled.memory_analysis()
        out = {"mode": mode, "trainable_params": sum(int(x.size) for x in jax.tree.leaves(trained)),
               "frozen_mib": nbytes(frozen) / 2**20, "trained_mib": nbytes(trained) / 2**20,
               "opt_state_mib": nbytes(state.opt_state) / 2**20,
               "temp_mib": memory.temp_size_in_bytes / 2**20 if memory else float("nan"), "compile_s": compile_s}
        state, m = compiled(state, b)  # warm-up
        jax.block_until_ready(state)
        first_loss = float(m["loss"])
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = compiled(state, b)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        out.update(step_s=statistics.median(times), tokens_per_s=batch * seq / statistics.median(times),
                   loss_first=first_loss, loss_last=float(m["loss"]),
                   peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="*", help="preset and overrides (default: a 31M model built on tiny)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    words = args.config or DEFAULT
    if args.child:
        print(json.dumps(run_one(words, args.child, args.steps, args.batch, args.seq, args.rank)))
        return
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, *words, "--child", mode, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq), "--rank", str(args.rank)]
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{mode} failed")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"config: {' '.join(words)} | batch {args.batch} x seq {args.seq} | LoRA rank {args.rank} on {', '.join(TARGETS)}")
    head = (f"{'mode':11} {'trainable':>11} {'frozen MiB':>10} {'trained MiB':>11} {'opt MiB':>8} {'temp MiB':>9} "
            f"{'step s':>7} {'tokens/s':>9} {'peak RSS MiB':>12} {'loss first->last':>17}")
    print(head)
    for r in rows:
        print(f"{r['mode']:11} {r['trainable_params']:>11,} {r['frozen_mib']:10.1f} {r['trained_mib']:11.1f} "
              f"{r['opt_state_mib']:8.1f} {r['temp_mib']:9.1f} {r['step_s']:7.3f} {r['tokens_per_s']:9,.0f} "
              f"{r['peak_rss_mib']:12,.0f} {r['loss_first']:8.3f}->{r['loss_last']:.3f}")


if __name__ == "__main__":
    main()
