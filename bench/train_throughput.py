"""Training throughput: tokens/s, step time, MFU and peak host memory of jaxlm's real train step.

    python bench/train_throughput.py                      # tiny and the 18M reference shape
    python bench/train_throughput.py bench_18m model.remat=full --steps 30

Each configuration runs in its own process, so that its peak host memory is its own. The step is the one
`jaxlm train` compiles (the same assembly: state, objective, optimizer, donation and sharding), fed synthetic tokens so that only
the trainer is measured. MFU is given against both the nominal CPU peak (185 GFLOP/s, shared/PLATFORM.md)
and a matmul peak measured in the same run.
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


def measure_matmul_peak(n: int = 2048, reps: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def run_one(words: list[str], steps: int, windows: int) -> dict:
    import jax
    import numpy as np

    from jaxlm.core import flops, mesh as mesh_lib, overrides
    from jaxlm.core.sharding import global_batch
    from jaxlm.training import assembly

    config = overrides.load(words)
    t, m = config.train, config.model
    mesh = mesh_lib.make_mesh(config.mesh)
    spec = assembly.build(config)  # what `jaxlm train` builds
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, m.vocab_size, size=(t.batch_size, t.seq_len + 1)).astype(np.int32)
    batch_np = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "positions": np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), (t.batch_size, t.seq_len)).copy(),
                "segment_ids": np.ones((t.batch_size, t.seq_len), np.int32),
                "loss_mask": np.ones((t.batch_size, t.seq_len), np.int32)}
    with jax.set_mesh(mesh):
        state = assembly.initial_state(spec, assembly.abstract_state(spec, mesh), mesh)
        batch = global_batch(batch_np, mesh)
        t0 = time.perf_counter()
        step = assembly.compile_step(spec, assembly.objective(config, spec), state, batch)
        compile_s = time.perf_counter() - t0
        for _ in range(3):  # warm up
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
        step_times = []
        for _ in range(windows):
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            step_times.append((time.perf_counter() - t0) / steps)
    step_s = statistics.median(step_times)
    tokens_per_s = t.batch_size * t.seq_len / step_s
    model_flops = flops.flops_per_token(m, t.seq_len) * tokens_per_s
    peak = measure_matmul_peak()
    return {
        "config": " ".join(words), "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "tokens_per_step": t.batch_size * t.seq_len, "step_s": step_s, "tokens_per_s": tokens_per_s,
        "model_gflops_per_s": model_flops / 1e9, "mfu_vs_185": model_flops / (185e9 * jax.device_count()),
        "matmul_peak_gflops": peak / 1e9, "mfu_vs_measured": model_flops / (peak * jax.device_count()),
        "compile_s": compile_s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": float(metrics["loss"]), "backend": jax.default_backend(), "devices": jax.device_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="*", help="one config (preset + overrides); default: tiny and bench_18m")
    parser.add_argument("--steps", type=int, default=10, help="steps per timing window")
    parser.add_argument("--windows", type=int, default=5, help="timing windows; the median is reported")
    parser.add_argument("--torch", action="store_true",
                        help="also run the PyTorch eager reference (HF Llama + AdamW) on each shape, same run")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_one(args.config, args.steps, args.windows)))
        return
    configs = [args.config] if args.config else [["tiny"], ["bench_18m"]]
    print(f"{'config':<28} {'params':>10} {'tok/step':>8} {'step ms':>8} {'tokens/s':>9} {'MFU@185':>8} "
          f"{'MFU@meas':>8} {'matmul GF/s':>11} {'peak RSS MiB':>12}")
    for words in configs:
        out = subprocess.run([sys.executable, __file__, "--_child", "--steps", str(args.steps),
                              "--windows", str(args.windows), *words], capture_output=True, text=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if out.returncode:
            print(f"{' '.join(words)}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['config']:<28} {r['params']:>10,} {r['tokens_per_step']:>8} {r['step_s'] * 1e3:>8.1f} "
              f"{r['tokens_per_s']:>9,.0f} {r['mfu_vs_185']:>8.1%} {r['mfu_vs_measured']:>8.1%} "
              f"{r['matmul_peak_gflops']:>11.1f} {r['peak_rss_mib']:>12,.0f}")
        if args.torch:
            ref = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "torch_reference.py"),
                                  "--steps", str(args.steps), "--windows", str(args.windows), *words],
                                 capture_output=True, text=True)
            if ref.returncode:
                print(f"  torch reference failed: {ref.stderr.strip().splitlines()[-1:]}")
                continue
            t = json.loads(ref.stdout.strip().splitlines()[-1])
            print(f"  torch eager (HF Llama + AdamW): {t['tokens_per_s']:,.0f} tokens/s, step "
                  f"{t['step_s'] * 1e3:.1f} ms, peak RSS {t['peak_rss_mib']:,.0f} MiB -> jaxlm is "
                  f"{r['tokens_per_s'] / t['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
