"""Multi-process training on one host: JAX's multi-controller runtime over a loopback coordinator, with
gloo CPU collectives, each process owning 4 of 8 fake CPU devices.

References: 2 processes x 4 devices train to the losses of 1 process x 8 devices; a run killed and
restarted (on all hosts, or with a different process count) matches an uninterrupted one; SIGTERM on one
host stops every host at the same step with a complete checkpoint.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlm.core import distributed
from jaxlm.core.config import ConfigError, DistributedConfig

SMALL = ["tiny", "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.mlp_dim=128", "model.vocab_size=512", "model.max_seq_len=64", "train.seq_len=64",
         "train.batch_size=8", "train.log_every=1", "train.eval_every=4", "train.eval_batches=1",
         "optim.warmup_steps=2", "train.progress=False"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, run_dir, cache_dir, processes=1, devices=8, command=("train", *SMALL)):
    """Starts `jaxlm <command>` (default: `jaxlm train` at the SMALL shapes) as `processes` processes with
    `devices` CPU devices each; returns the Popens."""
    port = free_port()
    procs = []
    for pid in range(processes):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        if processes > 1:
            env.update(JAXLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES=str(processes),
                       JAXLM_PROCESS_ID=str(pid))
        cmd = [sys.executable, "-m", "jaxlm.cli", *command, *args, f"train.run_dir={run_dir}",
               f"data.cache_dir={cache_dir}", "distributed.init_timeout_s=120"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=600):
    """Waits for every process; returns [(returncode, stdout, stderr)]."""
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


def check_ok(results):
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{err[-3000:]}"


def metrics(run_dir, key="train/loss"):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}  # a resumed run rewrites steps: the last one wins


def complete_steps(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def saved_state(run_dir, step):
    """The saved state as numpy arrays (it may have been written by processes that no longer exist)."""
    path = os.path.join(run_dir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=as_numpy)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A tokenizer and token cache made once, by one process, before processes race for it."""
    path = str(tmp_path_factory.mktemp("cache"))
    ((code, _, err),) = finish(start(["train.steps=1", "checkpoint.every=100"], path + "/warm", path, devices=1))
    assert code == 0, err
    return path


# --- default tests ---------------------------------------------------------------------------------

@pytest.mark.slow  # three jaxlm processes: about a minute on 2 cores
def test_two_processes_match_one_process(tmp_path, cache_dir):
    args = ["train.steps=6", "checkpoint.every=3"]
    # All three processes run at once: the two-process group and the single-process reference.
    one = start(args, tmp_path / "one", cache_dir)
    two = start(args, tmp_path / "two", cache_dir, processes=2, devices=4)
    check_ok(finish(one))
    results = finish(two)
    check_ok(results)
    ref, got = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=1e-5)
    ref_eval, got_eval = metrics(tmp_path / "one", "eval/loss"), metrics(tmp_path / "two", "eval/loss")
    assert sorted(got_eval) == [4, 6]
    np.testing.assert_allclose([got_eval[s] for s in (4, 6)], [ref_eval[s] for s in (4, 6)], rtol=1e-5)
    # Only process 0 logs; both took part in the checkpoint (each wrote its own data-iterator state).
    assert "jaxlm.train" in results[0][2] and "jaxlm.train" not in results[1][2]
    assert complete_steps(tmp_path / "two") == [3, 6]
    data_files = os.listdir(tmp_path / "two" / "checkpoints" / "6" / "data")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_files), data_files


@pytest.mark.slow  # GRPO, 2 steps, by one process then by two: about 2 minutes on 2 cores
def test_two_process_grpo_matches_one_process(tmp_path, monkeypatch):
    """The same rollouts (tokens sampled over the same global mesh, log-probs, advantages), losses and final
    adapters from 1 process x 8 devices and 2 processes x 4; only process 0 logs and writes rollouts."""
    from test_grpo import QUESTIONS, SMALL as GRPO_SMALL

    tests = os.path.dirname(__file__)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    command = ("rl", "grpo_tiny", f"rl.prompts={prompts}", f"finetune.data={prompts}",
               "rl.reward=('rewards_for_tests:length',)", *GRPO_SMALL)
    args = ["train.steps=2", "rl.iterations=1", "train.log_every=1"]
    cache = tmp_path / "cache"
    # One after the other: the first run trains the tokenizer on the prompts into the cache the second reads.
    check_ok(finish(start(args, tmp_path / "one", cache, command=command)))
    results = finish(start(args, tmp_path / "two", cache, processes=2, devices=4, command=command))
    check_ok(results)
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(os.listdir(two / "rollouts")) == ["000000.npz", "000001.npz"]  # no stray temporary files
    for name in ("000000.npz", "000001.npz"):
        with np.load(one / "rollouts" / name) as ref, np.load(two / "rollouts" / name) as got:
            assert sorted(got.files) == sorted(ref.files)
            for k in ("inputs", "targets", "loss_mask"):
                np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{name} {k}")
            for k in ("old_logp", "ref_logp", "advantages"):
                np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-5, err_msg=f"{name} {k}")
            assert got["loss_mask"].sum() > 0
    # The loss is a mean over advantages that sum to zero per group, at a ratio of 1 on a rollout's first step:
    # float noise around 0 (~1e-8), hence the absolute tolerance; the gradient's norm and the KL are not.
    for key, atol in (("train/loss", 1e-7), ("train/grad_norm", 0), ("train/kl", 1e-9)):
        ref, got = metrics(one, key), metrics(two, key)
        assert sorted(got) == sorted(ref) == [1, 2], key
        np.testing.assert_allclose([got[s] for s in (1, 2)], [ref[s] for s in (1, 2)], rtol=1e-5, atol=atol, err_msg=key)
    ref_reward, got_reward = metrics(one, "rl/reward_mean"), metrics(two, "rl/reward_mean")
    assert len(got_reward) == 2 and got_reward == ref_reward
    from safetensors.numpy import load_file

    a, b = (load_file(str(d / "adapters" / "adapters.safetensors")) for d in (one, two))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # Only process 0 logs (process 1 reports warnings and errors only).
    assert "jaxlm.rl" in results[0][2] and "jaxlm.train" in results[0][2], results[0][2][-2000:]
    assert "jaxlm.rl" not in results[1][2] and "jaxlm.train" not in results[1][2], results[1][2][-2000:]


def test_unreachable_coordinator_fails_with_one_line(tmp_path):
    port = free_port()  # nothing listens on it
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "train", "tiny", f"distributed.coordinator_address=127.0.0.1:{port}",
         "distributed.num_processes=2", "distributed.process_id=1", "distributed.init_timeout_s=2",
         f"train.run_dir={tmp_path}/run"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("jaxlm: error:")]
    assert len(errors) == 1 and f"cannot reach the coordinator 127.0.0.1:{port}" in errors[0]
    assert "init_timeout_s=2" in errors[0]
    assert time.monotonic() - began < 60


def test_detect_launch_method():
    none = DistributedConfig()
    assert distributed.detect(none, {}).method == "single"
    env = {"JAXLM_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAXLM_NUM_PROCESSES": "4", "JAXLM_PROCESS_ID": "3"}
    assert distributed.detect(none, env) == distributed.Launch("explicit", "10.0.0.2:8476", 4, 3)
    # The config wins over the environment.
    cfg = DistributedConfig(coordinator_address="h0:1234", num_processes=2, process_id=1)
    assert distributed.detect(cfg, env) == distributed.Launch("explicit", "h0:1234", 2, 1)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "3"}
    assert distributed.detect(none, slurm).method == "slurm"
    assert distributed.detect(none, {**slurm, "SLURM_NTASKS": "1"}).method == "single"
    with pytest.raises(ConfigError, match="JAXLM_PROCESS_ID must be an integer"):
        distributed.detect(none, {**env, "JAXLM_PROCESS_ID": ""})
    with pytest.raises(ConfigError, match="process id 4 with 4 processes"):
        distributed.detect(none, {**env, "JAXLM_PROCESS_ID": "4"})
    with pytest.raises(ConfigError, match="needs a port"):
        distributed.detect(DistributedConfig(coordinator_address="h0", num_processes=2, process_id=0), {})
    with pytest.raises(ConfigError, match="need distributed.coordinator_address"):
        distributed.detect(DistributedConfig(num_processes=2, process_id=0), {})


# --- slow tests: interruptions ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """8 steps by 2 processes in one go, checkpointing every 2 steps: the reference for resumed runs."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    check_ok(finish(start(["train.steps=8", "checkpoint.every=2"], run, cache_dir, processes=2, devices=4)))
    return run


def wait_for_step(run_dir, step, procs, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and max(metrics(run_dir), default=0) < step:
        assert all(p.poll() is None for p in procs), "a process exited early"
        time.sleep(0.1)
    assert max(metrics(run_dir), default=0) >= step


@pytest.mark.slow
def test_kill_one_process_then_restart_both_resumes(tmp_path, cache_dir, uninterrupted):
    run = tmp_path / "run"
    args = ["train.steps=8", "checkpoint.every=2"]
    procs = start(args, run, cache_dir, processes=2, devices=4)
    wait_for_step(run, 5, procs)
    procs[1].send_signal(signal.SIGKILL)  # one host dies mid-run (the other fails in its next collective)...
    time.sleep(2)
    procs[0].send_signal(signal.SIGKILL)  # ...and the job is torn down, as a scheduler would
    finish(procs)
    done = complete_steps(run)
    assert done and max(done) < 8, done
    # Restart both: the run resumes from the last complete checkpoint and ends where the reference did.
    results = finish(start(args, run, cache_dir, processes=2, devices=4))
    check_ok(results)
    assert f"at step {max(done)}" in results[0][2]
    assert metrics(run) == metrics(uninterrupted)  # bit for bit, including the steps run twice
    jax.tree.map(np.testing.assert_array_equal, saved_state(run, 8), saved_state(uninterrupted, 8))


@pytest.mark.slow
def test_restore_with_a_different_process_count(tmp_path, cache_dir, uninterrupted):
    """2 processes x 4 devices save at step 4; 1 process x 4 devices (a different mesh) goes on to 8."""
    run = tmp_path / "run"
    check_ok(finish(start(["train.steps=8", "checkpoint.every=2", "train.stop_at=4"], run, cache_dir,
                          processes=2, devices=4)))
    ((code, _, err),) = finish(start(["train.steps=8", "checkpoint.every=2"], run, cache_dir, devices=4))
    assert code == 0, err
    assert "at step 4" in err and "different process count" in err
    got, ref = metrics(run), metrics(uninterrupted)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_on_one_host_stops_every_host_at_the_same_step(tmp_path, cache_dir):
    run = tmp_path / "run"
    procs = start(["train.steps=100000", "checkpoint.every=100000"], run, cache_dir, processes=2, devices=4)
    wait_for_step(run, 3, procs)
    procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host only
    results = finish(procs, timeout=300)
    check_ok(results)
    assert "stopped by SIGTERM at step" in results[1][1]
    assert "stopped by a stop request on process 1 at step" in results[0][1]
    step = int(results[0][1].split(" at step ")[1].split(";")[0])
    assert step == int(results[1][1].split(" at step ")[1].split(";")[0])
    assert complete_steps(run) == [step]
    assert int(saved_state(run, step)["step"]) == step


# --- preemption and hangs (single process, fast) -----------------------------------------------------

def test_watchdog_reports_a_hung_step_with_step_and_host():
    from jaxlm.training.watchdog import Watchdog

    reports = []
    dog = Watchdog(0.4, process_index=1, process_count=2, on_hang=reports.append, poll_s=0.02).start()
    try:
        dog.beat(7)
        time.sleep(0.1)
        assert reports == []  # within the timeout: quiet
        time.sleep(0.5)
        assert 1 <= len(reports) <= 2  # repeated once per timeout, not on every 20 ms poll
        assert "step 7 has not finished after" in reports[0]
        assert f"host {socket.gethostname()} (process 1 of 2)" in reports[0]
        dog.beat(8, "checkpoint save")  # progress again; a new hang names the new phase
        time.sleep(0.5)
        assert "checkpoint save 8 has not finished" in reports[-1]
    finally:
        dog.stop()


def test_step_boundary_stop_and_time_based_checkpoint():
    from jaxlm.training.preemption import StepBoundary, StopRequest

    stop = StopRequest()
    boundary = StepBoundary(stop, every_minutes=0.5 / 60, sync_every=1, agreement=None)  # 0.5 s
    first = boundary.check(1)
    assert first.stop is None and not first.temporary_checkpoint
    time.sleep(0.6)
    assert boundary.check(2).temporary_checkpoint
    boundary.saved()
    assert not boundary.check(3).temporary_checkpoint
    stop.signal = "SIGTERM"
    assert boundary.check(4).stop == "SIGTERM"


def test_temporary_checkpoint_is_kept_until_the_next_one_is_complete(tmp_path):
    import jax.numpy as jnp

    from jaxlm.core.config import CheckpointConfig
    from jaxlm.training.checkpoint import Checkpointer

    state = {"w": jnp.arange(4.0)}
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(keep_last=5))
    ckpt.save(2, state, {"start": 0}, {}, force=True)
    ckpt.save(3, state, {"start": 0}, {}, force=True, temporary=True)
    ckpt.wait()
    assert sorted(ckpt.manager.all_steps()) == [2, 3]  # the temporary one is the latest: it stays
    ckpt.close()
    # A new process (after a preemption) still knows step 3 is temporary, and drops it once step 4 is saved.
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(keep_last=5))
    assert ckpt.temporaries == {3}
    ckpt.save(4, state, {"start": 0}, {}, force=True)
    ckpt.save(5, state, {"start": 0}, {}, force=True, temporary=True)  # step 4 is complete before 3 goes
    ckpt.close()
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [2, 4, 5]
