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
    remote = ('export PATH="$HOME/.local/bin:$PATH"; set -o pipefail; '
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
        f"{TPU_VM} ssh tpu1 {' '.join(LOC)} --worker=all '--command=rm -rf ~/jaxlm && mkdir -p ~/jaxlm"
        " && tar -xzf ~/jaxlm-abc123.tar.gz -C ~/jaxlm && cd ~/jaxlm"
        " && pip install '\"'\"'jax[tpu]==0.10.2'\"'\"' && pip install -e .'",
    ]


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
