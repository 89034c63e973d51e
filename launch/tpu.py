#!/usr/bin/env python3
"""Create, set up, run on, and tear down Cloud TPU VMs with the gcloud CLI.

Every subcommand builds a list of argv commands and either runs them in order
or, with --dry-run, prints them one per line (shell-quoted) so they can be
reviewed or pasted. See launch/README.md for a walkthrough.
"""

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_VERSION = "0.10.2"  # keep in sync with setup.py; the TPU wheel must match jaxlib
REMOTE_DIR = "~/jaxlm"
VENV = "~/jaxlm-venv"  # outside REMOTE_DIR, so that re-running setup keeps the installed jax[tpu]
PYTHON = "python3.11"  # jaxlm needs 3.11; TPU VM images ship 3.10
RUN_LOG = "jaxlm-run.log"  # relative remote paths are in the home dir for both ssh and scp

# Default TPU VM runtime image per generation.
RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
TYPE_PATTERNS = "v4-N, v5p-N, v5litepod-N, v5e-N, v6e-N"


class LaunchError(Exception):
    """A user error: reported as one line on stderr, exit code 2."""


def parse_type(accel: str) -> tuple[str, int]:
    gen, _, size = accel.partition("-")
    if gen not in RUNTIMES or not size.isdigit() or int(size) == 0:
        raise LaunchError(f"unknown accelerator type {accel!r}; expected one of {TYPE_PATTERNS}")
    return gen, int(size)


def gcloud_type(accel: str) -> str:
    """gcloud knows v5e slices only by their product name, v5litepod-N."""
    gen, n = parse_type(accel)
    return f"v5litepod-{n}" if gen == "v5e" else accel


def num_hosts(accel: str) -> int:
    """Number of TPU VM workers (hosts) in a slice of the given accelerator type.

    The number in the type name means different things per generation:
    - v4, v5p: it counts TensorCores, 2 per chip, and each host has 4 chips,
      so hosts = N / 8 (v4-8 and v5p-8 are one host, v4-32 is four).
    - v5litepod/v5e, v6e: it counts chips. Slices of up to 8 chips are a
      single host (v5litepod-8 and v6e-8 are one 8-chip VM); larger slices
      are built from 4-chip hosts, so hosts = N / 4 (v6e-256 is 64 hosts).
    """
    gen, n = parse_type(accel)
    if gen in ("v4", "v5p"):
        if n % 8:
            raise LaunchError(f"{accel}: {gen} sizes count TensorCores and must be a multiple of 8")
        return n // 8
    if n <= 8:
        return 1
    if n % 4:
        raise LaunchError(f"{accel}: multi-host {gen} sizes must be a multiple of 4")
    return n // 4


def tpu_vm(verb, name, args, *extra):
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, name,
            f"--zone={args.zone}", f"--project={args.project}", *extra]


def scp(src, dst, args, worker):
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", src, dst,
            f"--zone={args.zone}", f"--project={args.project}", f"--worker={worker}"]


def slices(args) -> int:
    return getattr(args, "slices", 1) or 1


def node_names(args) -> list[str]:
    """A multislice queued resource NAME names its slices NAME-0, NAME-1, ... (--node-prefix)."""
    n = slices(args)
    return [args.name] if n == 1 else [f"{args.name}-{i}" for i in range(n)]


def ssh_all(args, command):
    """The same command on every worker of every slice."""
    if slices(args) > 1:
        return queued("ssh", args.name, args, "--node=all", "--worker=all", f"--command={command}")
    return tpu_vm("ssh", args.name, args, "--worker=all", f"--command={command}")


def queued(verb, name, args, *extra):
    return ["gcloud", "compute", "tpus", "queued-resources", verb, name,
            f"--zone={args.zone}", f"--project={args.project}", *extra]


def cmd_create(args):
    gen, _ = parse_type(args.type)
    runtime = args.version or RUNTIMES[gen]
    spot = ["--spot"] if args.spot else []
    if slices(args) > 1:
        # Multislice exists only as a queued resource; its slices talk over DCN (MEGASCALE_* is set
        # on every worker, and JAX reads it).
        return [["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
                 f"--node-count={slices(args)}", f"--node-prefix={args.name}", f"--zone={args.zone}",
                 f"--project={args.project}", f"--accelerator-type={gcloud_type(args.type)}",
                 f"--runtime-version={runtime}", *spot]]
    if args.queued:
        # A queued resource waits for capacity instead of failing; the TPU VM it
        # eventually creates gets the same name, so the other subcommands work on it.
        return [["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
                 f"--node-id={args.name}", f"--zone={args.zone}", f"--project={args.project}",
                 f"--accelerator-type={gcloud_type(args.type)}", f"--runtime-version={runtime}", *spot]]
    return [tpu_vm("create", args.name, args, f"--accelerator-type={gcloud_type(args.type)}",
                   f"--version={runtime}", *spot)]


def cmd_setup(args):
    # Ship a `git archive` of one commit instead of cloning on the workers: they need
    # no git credentials or internet access to the repo, and every worker runs
    # exactly the same code (uncommitted local changes are deliberately left out).
    sha = args.commit
    if not sha:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        if head.returncode:
            raise LaunchError(f"setup: git rev-parse HEAD failed in {REPO}; pass --commit")
        sha = head.stdout.strip()
    tarball = f"jaxlm-{sha}.tar.gz"
    python = (f"command -v {PYTHON} >/dev/null || (sudo apt-get update -qq"
              f" && sudo apt-get install -y -qq software-properties-common"
              f" && sudo add-apt-repository -y ppa:deadsnakes/ppa"
              f" && sudo apt-get install -y -qq {PYTHON} {PYTHON}-venv)")
    install = " && ".join([
        python,
        f"(test -x {VENV}/bin/pip || {PYTHON} -m venv {VENV})",
        f"rm -rf {REMOTE_DIR}",  # a clean tree, so files deleted in the commit do not linger
        f"mkdir -p {REMOTE_DIR}",
        f"tar -xzf ~/{tarball} -C {REMOTE_DIR}",
        f"cd {REMOTE_DIR}",
        f"{VENV}/bin/pip install {shlex.quote(f'jax[tpu]=={JAX_VERSION}')}",
        f"{VENV}/bin/pip install -e .",
    ])
    copies = [scp(f"/tmp/{tarball}", f"{node}:{tarball}", args, "all") for node in node_names(args)]
    return [
        ["git", "archive", "--format=tar.gz", "-o", f"/tmp/{tarball}", sha],
        *copies,
        ssh_all(args, install),
    ]


def cmd_run(args):
    argv = args.command
    if not argv:
        raise LaunchError("run: give the command after --, e.g. -- jaxlm train CONFIG")
    # The venv made by setup comes first on PATH (non-interactive ssh shells read no profile).
    # pipefail: report the training exit code, not tee's.
    remote = (f'export PATH="$HOME/{VENV[2:]}/bin:$PATH"; set -o pipefail; '
              f"cd {REMOTE_DIR} && {shlex.join(argv)} 2>&1 | tee ~/{RUN_LOG}")
    return [ssh_all(args, remote)]


def cmd_logs(args):
    out_dir = os.path.join("logs", args.name)
    cmds = [["mkdir", "-p", out_dir]]
    for node in node_names(args):
        prefix = "" if slices(args) == 1 else f"{node}-"
        for i in range(num_hosts(args.type)):
            cmds.append(scp(f"{node}:{RUN_LOG}", os.path.join(out_dir, f"{prefix}worker-{i}.log"), args, i))
    return cmds


def cmd_ssh(args):
    return [tpu_vm("ssh", args.name, args, f"--worker={args.worker}")]


def cmd_status(args):
    return [(queued if args.queued or slices(args) > 1 else tpu_vm)("describe", args.name, args)]


def cmd_delete(args):
    if args.queued or slices(args) > 1:
        # --force also deletes the TPU VM the queued resource created.
        return [queued("delete", args.name, args, "--force")]
    return [tpu_vm("delete", args.name, args)]


def build_parser():
    parser = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    def add(name, func, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        # SUPPRESS: when --dry-run is not repeated after the subcommand, keep the global value.
        p.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                       help="print the commands instead of running them")
        p.add_argument("name", help="TPU VM (and queued resource) name")
        p.add_argument("--zone", required=True, help="e.g. us-east5-a")
        p.add_argument("--project", required=True, help="Google Cloud project id")
        p.add_argument("--slices", type=int, default=1,
                       help="multislice: this many slices over DCN, as one queued resource (default 1)")
        return p

    p = add("create", cmd_create, "create a TPU VM, or a queued resource that creates one when capacity frees up")
    p.add_argument("--type", required=True, help=f"accelerator type: {TYPE_PATTERNS}, e.g. v5p-128")
    p.add_argument("--version", help="TPU runtime image (default: per generation, "
                   + ", ".join(f"{g} -> {r}" for g, r in RUNTIMES.items()) + ")")
    p.add_argument("--spot", action="store_true", help="use Spot capacity (cheaper, can be preempted)")
    p.add_argument("--queued", action="store_true", help="create through a queued resource")

    p = add("setup", cmd_setup, f"install jaxlm at one commit (plus jax[tpu]=={JAX_VERSION}) on every worker")
    p.add_argument("--commit", help="commit to install (default: git rev-parse HEAD of this repo)")

    p = add("run", cmd_run, f"run the command given after -- in {REMOTE_DIR} on all workers, "
            f"each worker teeing its output to ~/{RUN_LOG}")
    p.usage = "%(prog)s [-h] [--dry-run] NAME --zone ZONE --project PROJECT -- COMMAND..."

    p = add("logs", cmd_logs, f"copy ~/{RUN_LOG} from each worker i to ./logs/NAME/worker-i.log")
    p.add_argument("--type", required=True, help="accelerator type, to know how many workers there are")

    p = add("ssh", cmd_ssh, "open a shell on one worker")
    p.add_argument("--worker", type=int, default=0, help="worker index (default 0)")

    p = add("status", cmd_status, "describe the TPU VM (or the queued resource)")
    p.add_argument("--queued", action="store_true", help="describe the queued resource instead")

    p = add("delete", cmd_delete, "delete the TPU VM (or the queued resource and its VM)")
    p.add_argument("--queued", action="store_true", help="delete the queued resource with --force")
    return parser


def on_path(program):
    return any(os.access(os.path.join(d, program), os.X_OK) for d in os.get_exec_path())


def split_command(argv) -> tuple[list[str], list[str]]:
    """(launcher arguments, the command after --). Split by hand: argparse positionals cannot reliably
    take "everything after --" when options come between NAME and the command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def main(argv=None):
    argv, remote = split_command(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if remote and args.subcommand != "run":
        parser.error(f"{args.subcommand} takes no command after --")
    args.command = remote
    try:
        # Check before building commands: setup would otherwise run git archive first.
        if not args.dry_run and not on_path("gcloud"):
            raise LaunchError("gcloud CLI not found; install the Google Cloud SDK or use --dry-run")
        cmds = args.func(args)
    except LaunchError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    for cmd in cmds:
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        code = subprocess.run(cmd, cwd=REPO if cmd[0] == "git" else None).returncode
        if code:
            print(f"launch: error: command failed with exit code {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
