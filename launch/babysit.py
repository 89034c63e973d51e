#!/usr/bin/env python3
"""Keep a training run alive on preemptible Cloud TPU capacity.

Loop: look at the TPU (or queued resource); if it is gone, preempted or failed, delete what is left,
create it again, wait until it is READY and set it up; then run the training command on every worker
with `checkpoint.dir` pointing at a gs:// directory, so that each new VM resumes from the last complete
checkpoint there (Orbax reads and writes gs:// itself). Stops when the command exits 0 on a healthy VM
(the run is complete), or after --max-restarts recreations.

--dry-run prints the commands of one full recovery cycle, in order, instead of running them.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu  # noqa: E402  (launch/tpu.py: the gcloud command builders)

HEALTHY = {"READY", "ACTIVE"}  # TPU VM state, queued-resource state
WAITING = {"CREATING", "STARTING", "PROVISIONING", "WAITING_FOR_RESOURCES", "ACCEPTED", "RESTARTING"}


def describe_cmd(args):
    if args.queued or tpu.slices(args) > 1:
        return tpu.queued("describe", args.name, args, "--format=value(state.state)")
    return tpu.tpu_vm("describe", args.name, args, "--format=value(state)")


def list_checkpoints_cmd(args):
    return ["gcloud", "storage", "ls", args.checkpoint_dir.rstrip("/") + "/", f"--project={args.project}"]


def latest_step(listing: str) -> int | None:
    """The newest complete step in `gcloud storage ls` output (Orbax's in-flight saves have other names)."""
    steps = [int(m.group(1)) for m in re.finditer(r"/(\d+)/\s*$", listing, re.MULTILINE)]
    return max(steps) if steps else None


def recreate_cmds(args):
    """Delete whatever is left, create again, and set up (runs after a preemption)."""
    return [*tpu.cmd_delete(args), *tpu.cmd_create(args), *tpu.cmd_setup(args)]


def train_cmd(args):
    args.command = [*args.train, f"checkpoint.dir={args.checkpoint_dir}"]
    return tpu.cmd_run(args)[0]


class Gcloud:
    def __init__(self, verbose=True):
        self.verbose = verbose

    def run(self, cmd, capture=False) -> subprocess.CompletedProcess:
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        return subprocess.run(cmd, cwd=tpu.REPO if cmd[0] == "git" else None, text=True,
                              capture_output=capture)


def state_of(g: Gcloud, args) -> str:
    proc = g.run(describe_cmd(args), capture=True)
    if proc.returncode:
        return "MISSING"  # NOT_FOUND once a preempted VM has been cleaned up
    return proc.stdout.strip().upper() or "UNKNOWN"


def babysit(args) -> int:
    g = Gcloud()
    restarts = 0
    while True:
        state = state_of(g, args)
        if state in WAITING:
            print(f"babysit: {args.name} is {state}; waiting", file=sys.stderr, flush=True)
            time.sleep(args.poll)
            continue
        if state not in HEALTHY:
            if restarts >= args.max_restarts:
                print(f"babysit: error: {args.name} is {state} after {restarts} recreations (--max-restarts)",
                      file=sys.stderr)
                return 1
            listing = g.run(list_checkpoints_cmd(args), capture=True).stdout or ""
            step = latest_step(listing)
            print(f"babysit: {args.name} is {state}: recreating (restart {restarts + 1}); the run will resume "
                  f"from {'step ' + str(step) if step is not None else 'scratch'} in {args.checkpoint_dir}",
                  file=sys.stderr, flush=True)
            for cmd in recreate_cmds(args):
                code = g.run(cmd).returncode
                if code and "delete" not in cmd[3:5]:  # a failed delete means there was nothing left
                    print(f"babysit: error: command failed with exit code {code}", file=sys.stderr)
                    return code
                if "create" in cmd[3:5]:
                    while state_of(g, args) not in HEALTHY:
                        time.sleep(args.poll)
            restarts += 1
            continue
        code = g.run(train_cmd(args)).returncode
        if code == 0 and state_of(g, args) in HEALTHY:
            print("babysit: the training command finished on a healthy VM: done", file=sys.stderr)
            return 0
        print(f"babysit: the training command exited with {code}; checking the VM", file=sys.stderr, flush=True)
        time.sleep(args.poll)


def build_parser():
    p = argparse.ArgumentParser(prog="launch/babysit.py", description=__doc__.split("\n")[0],
                                usage="%(prog)s [-h] [--dry-run] NAME --zone ZONE --project PROJECT --type TYPE "
                                      "--checkpoint-dir gs://... [options] -- jaxlm train CONFIG...")
    p.add_argument("name", help="TPU VM (or queued resource) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--type", required=True, help=f"accelerator type: {tpu.TYPE_PATTERNS}")
    p.add_argument("--slices", type=int, default=1, help="multislice over DCN (a queued resource)")
    p.add_argument("--version", help="TPU runtime image (default: per generation)")
    p.add_argument("--spot", action="store_true", help="Spot capacity (cheap, preemptible)")
    p.add_argument("--queued", action="store_true", help="create through a queued resource")
    p.add_argument("--commit", help="commit to install (default: HEAD)")
    p.add_argument("--checkpoint-dir", required=True, help="gs://bucket/path: where the run checkpoints and resumes")
    p.add_argument("--poll", type=float, default=60.0, help="seconds between state checks (default 60)")
    p.add_argument("--max-restarts", type=int, default=20, help="give up after this many recreations")
    p.add_argument("--dry-run", action="store_true", help="print one recovery cycle's commands instead")
    return p


def main(argv=None):
    argv, train = tpu.split_command(argv)
    args = build_parser().parse_args(argv)
    args.train = train
    try:
        if not train:
            raise tpu.LaunchError("give the training command after --, e.g. -- jaxlm train CONFIG")
        if not args.checkpoint_dir.startswith("gs://"):
            raise tpu.LaunchError(f"--checkpoint-dir {args.checkpoint_dir!r} must be a gs:// directory: a "
                                  f"recreated VM starts with an empty disk")
        if any(a.startswith("checkpoint.dir=") for a in train):
            raise tpu.LaunchError("leave checkpoint.dir out of the training command; --checkpoint-dir sets it")
        tpu.parse_type(args.type)
        if not args.dry_run and not tpu.on_path("gcloud"):
            raise tpu.LaunchError("gcloud CLI not found; install the Google Cloud SDK or use --dry-run")
        if args.dry_run:
            cycle = [("# state (anything but READY/ACTIVE means preempted or gone)", describe_cmd(args)),
                     ("# the checkpoint the run will resume from", list_checkpoints_cmd(args))]
            cycle += [("# recreate", c) for c in recreate_cmds(args)]
            cycle += [("# train (resumes from the latest step in --checkpoint-dir); repeat the cycle until it "
                       "exits 0 on a READY VM", train_cmd(args))]
            last = None
            for comment, cmd in cycle:
                if comment != last:
                    print(comment)
                    last = comment
                print(shlex.join(cmd))
            return 0
        return babysit(args)
    except tpu.LaunchError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
