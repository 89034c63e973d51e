#!/usr/bin/env python3
"""Submit a multi-node GPU jaxlm run to SLURM from the launch/slurm.sbatch template.

The rendered script runs one process per GPU through `srun`; JAX reads SLURM_* to form the process
group, the run checkpoints into --checkpoint-dir, and a preempted, failed or timed-out job is requeued
and resumes from there. --dry-run prints the script and the sbatch command instead of submitting.
"""

import argparse
import os
import re
import shlex
import string
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu  # noqa: E402  (launch/tpu.py: split_command)

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "slurm.sbatch")


class LaunchError(Exception):
    pass


def render(args) -> str:
    if not args.train:
        raise LaunchError("give the training command after --, e.g. -- jaxlm train CONFIG")
    if any(a.startswith("checkpoint.dir=") for a in args.train):
        raise LaunchError("leave checkpoint.dir out of the training command; --checkpoint-dir sets it")
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise LaunchError("--nodes and --gpus-per-node must be at least 1")
    if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", args.time):
        raise LaunchError(f"--time {args.time!r}: use HH:MM:SS or D-HH:MM:SS")
    train = shlex.join([*args.train, f"checkpoint.dir={args.checkpoint_dir}"])
    with open(TEMPLATE) as f:
        template = string.Template(f.read())
    return template.substitute(
        name=args.name, nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
        time=args.time, log_dir=args.log_dir, grace_s=args.grace,
        partition_line=f"#SBATCH --partition={args.partition}\n" if args.partition else "",
        setup=args.setup or "# (no --setup: jaxlm must already be on PATH on every node)", train=train)


def main(argv=None):
    argv, train = tpu.split_command(argv)
    p = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__.split("\n")[0],
                                usage="%(prog)s [-h] [--dry-run] --nodes N --checkpoint-dir DIR [options] "
                                      "-- jaxlm train CONFIG...")
    p.add_argument("--name", default="jaxlm", help="job name (default jaxlm)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-task", type=int, default=12)
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", default="24:00:00", help="time limit per allocation (default 24:00:00)")
    p.add_argument("--grace", type=int, default=300, help="seconds before the limit to checkpoint (default 300)")
    p.add_argument("--checkpoint-dir", required=True, help="shared filesystem or gs:// path, resumed from on requeue")
    p.add_argument("--log-dir", default="logs", help="where SLURM writes %%x-%%j.out (default logs)")
    p.add_argument("--setup", help="shell line run before training, e.g. 'source ~/jaxlm/.venv/bin/activate'")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command")
    args = p.parse_args(argv)
    args.train = train
    try:
        script = render(args)
        if args.dry_run:
            print(script, end="")
            print(f"# submit with:\nsbatch {args.name}.sbatch")
            return 0
        if not any(os.access(os.path.join(d, "sbatch"), os.X_OK) for d in os.get_exec_path()):
            raise LaunchError("sbatch not found; run this on a SLURM login node, or use --dry-run")
    except LaunchError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.log_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", dir=".", delete=False) as f:
        f.write(script)
    os.replace(f.name, f"{args.name}.sbatch")
    print(f"+ sbatch {args.name}.sbatch", file=sys.stderr)
    return subprocess.run(["sbatch", f"{args.name}.sbatch"]).returncode


if __name__ == "__main__":
    sys.exit(main())
