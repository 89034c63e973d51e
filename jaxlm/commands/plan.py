"""`jaxlm plan`: will a config fit on a TPU/GPU target, and how fast, before renting it."""

from __future__ import annotations

import argparse

from jaxlm.commands.args import CONFIG_HELP, COUNT, bounded


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="will CONFIG fit on a TPU/GPU target, and how fast (before renting it)",
        description="Memory per device (parameters, optimizer, activations, temporaries), fit, "
                    "FLOPs and step time at a stated MFU, mesh placement, and a suggested change "
                    "when it does not fit. TPU targets are also compiled ahead of time with XLA "
                    "when libtpu is installed (pip install \"jaxlm[tpu-plan]\"). Exit status 0 "
                    "if it fits, 1 if not. " + CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="+", help="preset, config files and overrides, as for `jaxlm train`")
    p.add_argument("--target", required=True, help="e.g. v5p-256, v5e:8x8, v6e-256, h100x8")
    p.add_argument("--slices", type=COUNT, default=1, help="TPU slices joined over DCN (multislice; default 1)")
    p.add_argument("--mfu", type=bounded(float, gt=0, le=1), default=0.4,
                   help="model FLOPs utilisation for the step time, in (0, 1] (default 0.4)")
    p.add_argument("--method", choices=("auto", "analytic", "compile"), default="auto",
                   help="auto: compile when the target's compiler is installed, else analytic")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    # Planning compiles for the target, never for a local accelerator; these also quiet libtpu on a host
    # without TPUs.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip is ever opened
    from jaxlm.core import overrides
    from jaxlm.planning import plan

    config = overrides.load(args.config)
    target = plan.parse_target(args.target, args.slices)
    result = plan.make_plan(config, target, mfu=args.mfu, method=args.method)
    print(plan.format_plan(config, result))
    return 0 if result.fits else 1
