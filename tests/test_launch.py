"""launch/tpu.py: the exact gcloud commands printed by --dry-run, and its one-line errors.

The script runs in a subprocess, as a user would run it; no gcloud or network is needed.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu.py")
LOC = ["--zone=us-east5-a", "--project=proj"]
TPU_VM = "gcloud compute tpus tpu-vm"


def launch(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=30)


def dry_run(subcommand, name, *rest):
    proc = launch("--dry-run", subcommand, name, "--zone", "us-east5-a", "--project", "proj", *rest)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_create_v4_spot():
    assert dry_run("create", "tpu1", "--type", "v4-32", "--spot") == [
        f"{TPU_VM} create tpu1 {' '.join(LOC)} --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --spot"]


def test_create_v5p_queued():
    assert dry_run("create", "tpu1", "--type", "v5p-128", "--queued") == [
        f"gcloud compute tpus queued-resources create tpu1 --node-id=tpu1 {' '.join(LOC)} "
        "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5"]


def test_create_v6e():
    assert dry_run("create", "tpu1", "--type", "v6e-256") == [
        f"{TPU_VM} create tpu1 {' '.join(LOC)} --accelerator-type=v6e-256 --version=v2-alpha-tpuv6e"]


def test_dry_run_flag_after_subcommand():
    proc = launch("create", "tpu1", "--type", "v6e-256", "--zone", "us-east5-a", "--project", "proj",
                  "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == dry_run("create", "tpu1", "--type", "v6e-256")


def test_run_on_all_workers_quotes_command():
    out = dry_run("run", "tpu1", "--", "jaxlm", "train", "configs/a b.py", "--set", "train.steps=10")
    remote = ('export PATH="$HOME/jaxlm-venv/bin:$PATH"; set -o pipefail; '
              "cd ~/jaxlm && jaxlm train 'configs/a b.py' --set train.steps=10 2>&1 | tee ~/jaxlm-run.log")
    # shlex.join quotes the whole --command=... word once more for the local shell.
    quoted = "'--command=" + remote.replace("'", "'\"'\"'") + "'"
    assert out == [f"{TPU_VM} ssh tpu1 {' '.join(LOC)} --worker=all {quoted}"]


def test_logs_v4_32_copies_from_four_workers():
    out = dry_run("logs", "tpu1", "--type", "v4-32")
    assert out == ["mkdir -p logs/tpu1"] + [
        f"{TPU_VM} scp tpu1:jaxlm-run.log logs/tpu1/worker-{i}.log {' '.join(LOC)} --worker={i}"
        for i in range(4)]


def test_delete_queued():
    assert dry_run("delete", "tpu1", "--queued") == [
        f"gcloud compute tpus queued-resources delete tpu1 {' '.join(LOC)} --force"]


def test_setup_ships_a_git_archive_of_the_commit():
    out = dry_run("setup", "tpu1", "--commit", "abc123")
    assert out == [
        "git archive --format=tar.gz -o /tmp/jaxlm-abc123.tar.gz abc123",
        f"{TPU_VM} scp /tmp/jaxlm-abc123.tar.gz tpu1:jaxlm-abc123.tar.gz {' '.join(LOC)} --worker=all",
        f"{TPU_VM} ssh tpu1 {' '.join(LOC)} --worker=all '--command={INSTALL_PY311} && rm -rf ~/jaxlm"
        " && mkdir -p ~/jaxlm && tar -xzf ~/jaxlm-abc123.tar.gz -C ~/jaxlm && cd ~/jaxlm"
        " && ~/jaxlm-venv/bin/pip install '\"'\"'jax[tpu]==0.10.2'\"'\"' && ~/jaxlm-venv/bin/pip install -e .'",
    ]


# TPU VM images ship Python 3.10; setup installs 3.11 (once) and a venv that survives re-setup.
INSTALL_PY311 = ("command -v python3.11 >/dev/null || (sudo apt-get update -qq"
                 " && sudo apt-get install -y -qq software-properties-common"
                 " && sudo add-apt-repository -y ppa:deadsnakes/ppa"
                 " && sudo apt-get install -y -qq python3.11 python3.11-venv)"
                 " && (test -x ~/jaxlm-venv/bin/pip || python3.11 -m venv ~/jaxlm-venv)")


def test_missing_gcloud(tmp_path):
    proc = launch("status", "tpu1", "--zone", "z", "--project", "p", env={"PATH": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == ("launch: error: gcloud CLI not found; "
                           "install the Google Cloud SDK or use --dry-run\n")


@pytest.mark.parametrize("accel", ["v9-3", "v5p", "v4-0", "tpu-v4-8"])
def test_bad_accelerator_type(accel):
    proc = launch("--dry-run", "create", "tpu1", "--type", accel, "--zone", "z", "--project", "p")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (f"launch: error: unknown accelerator type {accel!r}; "
                           "expected one of v4-N, v5p-N, v5litepod-N, v5e-N, v6e-N\n")


@pytest.mark.parametrize("accel,hosts", [("v4-8", 1), ("v4-32", 4), ("v5p-128", 16), ("v5litepod-4", 1),
                                         ("v5litepod-8", 1), ("v5litepod-16", 4), ("v6e-8", 1),
                                         ("v6e-256", 64)])
def test_worker_count(accel, hosts):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    try:
        import tpu
    finally:
        sys.path.pop(0)
    assert tpu.num_hosts(accel) == hosts


# --- multislice, babysitter, SLURM ----------------------------------------------------------------

QR = "gcloud compute tpus queued-resources"


def test_v6e_256_multislice_over_dcn():
    """Two v6e-256 slices (128 workers) as one queued resource; setup and run reach every worker of both."""
    create = dry_run("create", "big", "--type", "v6e-256", "--slices", "2", "--spot")
    assert create == [f"{QR} create big --node-count=2 --node-prefix=big {' '.join(LOC)} "
                      "--accelerator-type=v6e-256 --runtime-version=v2-alpha-tpuv6e --spot"]
    setup = dry_run("setup", "big", "--slices", "2", "--commit", "abc")
    assert setup[1:3] == [f"{TPU_VM} scp /tmp/jaxlm-abc.tar.gz big-{i}:jaxlm-abc.tar.gz {' '.join(LOC)} --worker=all"
                          for i in range(2)]
    assert setup[3].startswith(f"{QR} ssh big {' '.join(LOC)} --node=all --worker=all '--command=")
    run = dry_run("run", "big", "--slices", "2", "--", "jaxlm", "train", "llama3_8b", "mesh.dcn_data=2")
    assert len(run) == 1 and run[0].startswith(f"{QR} ssh big {' '.join(LOC)} --node=all --worker=all ")
    assert "jaxlm train llama3_8b mesh.dcn_data=2 2>&1 | tee ~/jaxlm-run.log" in run[0]
    logs = dry_run("logs", "big", "--type", "v6e-256", "--slices", "2")
    assert len(logs) == 1 + 2 * 64
    assert logs[-1] == f"{TPU_VM} scp big-1:jaxlm-run.log logs/big/big-1-worker-63.log {' '.join(LOC)} --worker=63"
    assert dry_run("status", "big", "--slices", "2") == [f"{QR} describe big {' '.join(LOC)}"]
    assert dry_run("delete", "big", "--slices", "2") == [f"{QR} delete big {' '.join(LOC)} --force"]


BABYSIT = os.path.join(ROOT, "launch", "babysit.py")


def babysit(*args, env=None):
    return subprocess.run([sys.executable, BABYSIT, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=60)


@pytest.mark.parametrize("accel,queued", [("v4-32", False), ("v5p-128", True)])
def test_babysitter_dry_run_is_one_recovery_cycle(accel, queued):
    extra = ["--queued"] if queued else []
    proc = babysit("tpu1", "--zone", "us-east5-a", "--project", "proj", "--type", accel, "--spot", *extra,
                   "--commit", "abc", "--checkpoint-dir", "gs://bkt/run/ckpt", "--dry-run",
                   "--", "jaxlm", "train", "llama3_8b")
    assert proc.returncode == 0, proc.stderr
    cmds = [l for l in proc.stdout.splitlines() if not l.startswith("#")]
    kind = QR if queued else TPU_VM
    fmt = "'--format=value(state.state)'" if queued else "'--format=value(state)'"
    assert cmds[0] == f"{kind} describe tpu1 {' '.join(LOC)} {fmt}"
    assert cmds[1] == "gcloud storage ls gs://bkt/run/ckpt/ --project=proj"
    assert cmds[2].startswith(f"{kind} delete tpu1")
    assert cmds[3] == dry_run("create", "tpu1", "--type", accel, "--spot", *extra)[0]
    assert cmds[4:7] == dry_run("setup", "tpu1", "--commit", "abc")
    assert cmds[7] == dry_run("run", "tpu1", "--", "jaxlm", "train", "llama3_8b", "checkpoint.dir=gs://bkt/run/ckpt")[0]


FAKE_GCLOUD = """#!/bin/sh
# Records each call; `describe` answers from the state file, `create` makes the VM READY.
echo "$*" >> "$FAKE/calls"
case "$*" in
  *describe*) cat "$FAKE/state" ;;
  *" create "*) echo READY > "$FAKE/state" ;;
  *"storage ls"*) printf 'gs://b/c/100/\\ngs://b/c/200/\\ngs://b/c/200.orbax-checkpoint-tmp-1/\\n' ;;
  *" ssh "*--command=*jaxlm\\ train*) exit "$(cat "$FAKE/train_exit")" ;;
esac
exit 0
"""


def test_babysitter_recreates_a_preempted_vm_and_resumes(tmp_path):
    """A fake gcloud: the VM starts PREEMPTED; the babysitter recreates it, sets it up, trains, and stops
    when training exits 0 on a READY VM."""
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    (tmp_path / "state").write_text("PREEMPTED\n")
    (tmp_path / "train_exit").write_text("0")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE": str(tmp_path)}
    proc = babysit("tpu1", "--zone", "z", "--project", "p", "--type", "v4-32", "--commit", "HEAD", "--poll", "0",
                   "--checkpoint-dir", "gs://b/c", "--", "jaxlm", "train", "tiny", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "PREEMPTED: recreating (restart 1); the run will resume from step 200 in gs://b/c" in proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    verbs = [c.split()[3] if c.startswith("compute") else c.split()[0] for c in calls]
    assert verbs == ["describe", "storage", "delete", "create", "describe", "scp", "ssh", "describe", "ssh",
                     "describe"], calls
    assert "checkpoint.dir=gs://b/c" in calls[-2]


def test_babysitter_bad_input():
    base = ["tpu1", "--zone", "z", "--project", "p", "--type", "v4-32", "--dry-run"]
    proc = babysit(*base, "--checkpoint-dir", "/local/ckpt", "--", "jaxlm", "train", "tiny")
    assert proc.returncode == 2 and proc.stderr.startswith("launch: error: --checkpoint-dir '/local/ckpt' must be a gs://")
    proc = babysit(*base, "--checkpoint-dir", "gs://b/c")
    assert proc.returncode == 2 and "give the training command after --" in proc.stderr
    proc = babysit("tpu1", "--zone", "z", "--project", "p", "--type", "v4-32", "--checkpoint-dir", "gs://b/c",
                   "--", "jaxlm", "train", "tiny", env={"PATH": "/nonexistent"})
    assert proc.returncode == 2
    assert proc.stderr == "launch: error: gcloud CLI not found; install the Google Cloud SDK or use --dry-run\n"


SLURM = os.path.join(ROOT, "launch", "slurm.py")


def test_slurm_template_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, SLURM, "--dry-run", "--nodes", "4", "--partition", "gpu",
                           "--checkpoint-dir", "/shared/ckpt", "--", "jaxlm", "train", "llama3_8b", "mesh.fsdp=-1"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for expected in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                     "trap checkpoint_and_requeue USR1", "sbatch jaxlm.sbatch",
                     "srun --kill-on-bad-exit=1 jaxlm train llama3_8b mesh.fsdp=-1 checkpoint.dir=/shared/ckpt &"):
        assert expected in lines, expected
    script = tmp_path / "job.sbatch"
    script.write_text(proc.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # valid shell


def test_slurm_without_sbatch_is_one_line():
    proc = subprocess.run([sys.executable, SLURM, "--nodes", "2", "--checkpoint-dir", "/c", "--", "jaxlm", "train",
                           "tiny"], capture_output=True, text=True, timeout=30, env={"PATH": "/nonexistent"})
    assert proc.returncode == 2
    assert proc.stderr == "launch: error: sbatch not found; run this on a SLURM login node, or use --dry-run\n"
