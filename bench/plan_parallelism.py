"""Compiled TPU memory of loss tiling, context parallelism and pipeline stages, against their absence.

Each line is `jaxlm plan --method compile`: the real train step compiled ahead of time for the target's
TPU devices by libtpu (pip install "jaxlm[tpu-plan]"), with the analytic estimate beside it. No TPU is
needed. Run: JAX_PLATFORMS=cpu python bench/plan_parallelism.py [--only NAME]
"""

from __future__ import annotations

import argparse
import time

from jaxlm.core import overrides
from jaxlm.planning import plan

GIB = 1 << 30
LONG = ["llama3_1b", "train.seq_len=32768"]
CASES = {  # name: (overrides, target, slices)
    "8b-tiled": (["llama3_8b"], "v5p-64", 1),
    "8b-untiled": (["llama3_8b", "train.loss_chunks=1"], "v5p-64", 1),
    "32k-none": (LONG + ["train.batch_size=8"], "v5p-16", 1),  # one 32k row per chip
    "32k-cp8": (LONG + ["train.batch_size=1", "mesh.sequence=8", "mesh.fsdp=1"], "v5p-16", 1),  # one row over 8
    "1b-fsdp-4slices": (["llama3_1b", "mesh.dcn_fsdp=4"], "v5p-16", 4),
    "1b-4stages-4slices": (["llama3_1b", "mesh.dcn_stage=4"], "v5p-16", 4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="run only these cases")
    args = parser.parse_args()
    print(f"{'case':20} {'target':14} {'analytic':>9} {'compiled':>9} {'temp':>8} {'fits':>5} {'chunks':>6} "
          f"{'bubble':>6} {'step PFLOP':>10} {'compile s':>9}")
    for name in args.only or CASES:
        words, target, slices = CASES[name]
        config = overrides.load(words)
        start = time.perf_counter()
        result = plan.make_plan(config, plan.parse_target(target, slices), method="compile")
        seconds = time.perf_counter() - start
        c = result.compiled
        compiled = "OOM" if c.oom else f"{c.total / GIB:.2f}"
        temp = "-" if c.oom else f"{c.temp / GIB:.2f}"
        where = target + (f"x{slices}" if slices > 1 else "")
        print(f"{name:20} {where:14} {result.memory.total / GIB:9.2f} {compiled:>9} {temp:>8} {str(result.fits):>5} "
              f"{result.loss_chunks:6d} {result.bubble:6.1%} {result.step_flops / 1e15:10.1f} {seconds:9.0f}",
              flush=True)


if __name__ == "__main__":
    main()
