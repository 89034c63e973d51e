"""The training loop end to end through the CLI: resume, preemption, crashes mid-save, non-finite steps."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import quick_jit, small_config

from jaxlm.core import sharded_init
from jaxlm.model.transformer import Transformer
from jaxlm.training import optim
from jaxlm.training.objectives import next_token
from jaxlm.training.step import make_step

SMALL = ["tiny", "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.mlp_dim=128", "model.vocab_size=512", "model.max_seq_len=64", "train.seq_len=64",
         "train.batch_size=8", "train.log_every=1", "train.eval_every=4", "train.eval_batches=1",
         "optim.warmup_steps=2", "train.progress=False"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def jaxlm_train(args, run_dir, cache_dir, devices=8, wait=True, **kwargs):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", *args, f"train.run_dir={run_dir}",
           f"data.cache_dir={cache_dir}"]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def saved_state(run_dir, step):
    return ocp.PyTreeCheckpointer().restore(os.path.join(run_dir, "checkpoints", str(step), "state"))


@pytest.mark.slow  # three `jaxlm train` processes (~70 s); restore bit for bit is checked by default in test_checkpoint_damage.py
def test_resume_is_bit_identical_to_uninterrupted(tmp_path, cache_dir):
    """2N steps in one go == N steps, process exit, then N more: same losses, same parameters, bit for bit."""
    args = SMALL + ["train.steps=8", "checkpoint.every=100"]
    whole = jaxlm_train(args, tmp_path / "whole", cache_dir)
    assert whole.returncode == 0, whole.stderr
    first = jaxlm_train(args + ["train.stop_at=4"], tmp_path / "split", cache_dir)
    assert first.returncode == 0, first.stderr
    assert "stopped by train.stop_at=4 at step 4" in first.stdout
    second = jaxlm_train(args, tmp_path / "split", cache_dir)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "at step 4" in second.stderr

    assert losses(tmp_path / "whole") == losses(tmp_path / "split")
    assert sorted(losses(tmp_path / "whole")) == list(range(1, 9))
    a, b = saved_state(tmp_path / "whole", 8), saved_state(tmp_path / "split", 8)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    for name in ("config.json", "metrics.jsonl", "loss.png"):
        assert os.path.isfile(tmp_path / "whole" / name)
    assert os.listdir(tmp_path / "whole" / "tensorboard")


@pytest.mark.slow  # a signalled `jaxlm train` process and its resumption (~45 s)
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = jaxlm_train(SMALL + ["train.steps=100000", "checkpoint.every=100000", "train.profile_start=1",
                                "train.profile_steps=1"], run, cache_dir, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and len(losses(run) if (run / "metrics.jsonl").exists() else {}) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    steps = [int(d) for d in os.listdir(run / "checkpoints") if d.isdigit()]
    assert len(steps) == 1 and steps[0] >= 2
    # The checkpoint is complete: it restores, and a rerun resumes from it.
    assert int(saved_state(run, steps[0])["step"]) == steps[0]
    # The profiler hook wrote a trace of step 2.
    assert any(f.endswith(".xplane.pb") for _, _, files in os.walk(run / "profile") for f in files)
    # Running the same command again resumes from that checkpoint.
    again = jaxlm_train(SMALL + [f"train.steps={steps[0] + 1}", "checkpoint.every=100000"], run, cache_dir)
    assert again.returncode == 0 and f"at step {steps[0]}" in again.stderr, again.stderr


KILL_MID_SAVE = """
import os, signal, sys
import jax, jax.numpy as jnp
from jaxlm.core.config import CheckpointConfig
from jaxlm.training.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], CheckpointConfig(async_save=True))
small = {"w": jnp.full((4,), 1.0)}
ckpt.save(1, small, {"next_index": 1}, {}, force=True)
ckpt.wait()
big = {"w": jnp.full((4,), 2.0), "pad": jnp.ones((256, 1024, 1024), jnp.float32)}  # 1 GiB: slow to write
ckpt.save(2, big, {"next_index": 2}, {}, force=True)
os.kill(os.getpid(), signal.SIGKILL)  # while the async write of step 2 is in flight
"""


def test_sigkill_during_async_save_restarts_from_last_complete(tmp_path):
    directory = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(directory)], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [d for d in os.listdir(directory) if not d.isdigit()]
    assert any("tmp" in d for d in leftovers), os.listdir(directory)  # the half-written step 2 is there...
    from jaxlm.core.config import CheckpointConfig
    from jaxlm.training.checkpoint import Checkpointer

    ckpt = Checkpointer(str(directory), CheckpointConfig())
    assert ckpt.latest_step() == 1  # ...and ignored
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    state, data_state = ckpt.restore(1, target)
    np.testing.assert_array_equal(state["w"], np.ones(4))
    assert data_state == {"next_index": 1}


def _state_and_step(config, trainable=None):
    model = Transformer(config.model)
    params = sharded_init.abstract_params(model)
    tx = optim.build_optimizer(config.optim, 10, params, trainable)
    state = sharded_init.strip_boxes(quick_jit(sharded_init.make_init_fn(model, tx, 0))())
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 128, (4, 17)), jnp.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": jnp.broadcast_to(jnp.arange(16), (4, 16)),
             "segment_ids": jnp.ones((4, 16), jnp.int32), "loss_mask": jnp.ones((4, 16), jnp.int32)}
    step = quick_jit(make_step(next_token(model.apply), tx), state, batch)  # for this state and batch shape
    return state, step, batch


@pytest.mark.slow  # a compiled step on a poisoned batch (~15 s)
def test_nonfinite_step_is_not_applied():
    state, step, batch = _state_and_step(small_config())
    state = state.replace(params={**state.params, "final_norm": {"scale": state.params["final_norm"]["scale"].at[0].set(jnp.nan)}})
    new, metrics = step(state, batch)
    assert not bool(metrics["finite"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.opt_state, state.opt_state)
    assert int(new.step) == int(state.step) + 1


@pytest.mark.slow  # a `jaxlm train` process that diverges (~17 s)
def test_nonfinite_loss_stops_the_run_naming_the_step(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = [a for a in SMALL if not a.startswith("optim.warmup_steps")]
    proc = jaxlm_train(args + ["train.steps=20", "optim.lr=1e30", "optim.warmup_steps=0", "optim.clip_norm=0.0",
                                "checkpoint.every=1"], run, cache_dir, devices=1)
    assert proc.returncode == 3, proc.stderr
    line = [l for l in proc.stderr.splitlines() if l.startswith("jaxlm: error: non-finite")]
    assert len(line) == 1 and "at step" in line[0]
    bad_step = int(line[0].split("at step ")[1].split()[0])
    for d in os.listdir(run / "checkpoints"):
        if d.isdigit():
            assert int(d) < bad_step
            assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved_state(run, int(d))["params"]))


def test_frozen_parameters_get_no_state_and_no_update():
    config = small_config()
    trainable = lambda params: optim.path_mask(params, [r"^layers/attn/"])
    state, step, batch = _state_and_step(config, trainable)
    # Adam state exists only for the 4 trainable attention weights; frozen leaves hold empty MaskedNodes.
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert sorted(optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(mu)) == [
        "layers/attn/k", "layers/attn/o", "layers/attn/q", "layers/attn/v"]
    new, _ = step(state, batch)
    for path, before in jax.tree_util.tree_leaves_with_path(state.params):
        after = new.params
        for k in path:
            after = after[k.key]
        changed = not np.array_equal(before, after)
        assert changed == optim.path_str(path).startswith("layers/attn/"), optim.path_str(path)


def test_weight_decay_mask_and_schedule():
    config = small_config()
    params = sharded_init.abstract_params(Transformer(config.model))
    no_decay = optim.path_mask(params, config.optim.no_decay)
    assert no_decay["final_norm"]["scale"] and no_decay["embed"]["embedding"]
    assert not no_decay["layers"]["mlp"]["up"]
    sched = optim.schedule(config.optim.__class__(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 9, 10, 110)], [0.1, 1.0, 1.0, 0.1], rtol=1e-6)


@pytest.mark.slow  # about 90 s on 2 cores; CI runs it in the slow pass
def test_tiny_preset_learns_the_bible(tmp_path):
    """120 steps of the tiny model on the real corpus. An untrained model scores ln(8192) = 9.01 nats and
    the best context-free (unigram) model 6.00; the bound needs context to be met."""
    proc = jaxlm_train(["tiny", "train.steps=120", "train.seq_len=128", "train.batch_size=16",
                        "train.eval_every=120", "train.progress=False"], tmp_path / "run",
                       str(tmp_path / "cache"), devices=1)
    assert proc.returncode == 0, proc.stderr
    eval_loss = float(proc.stdout.split("eval loss ")[1].split()[0])
    assert eval_loss < 5.5, proc.stdout
    # Throughput windows exclude evaluation, so MFU stays a fraction of the peak throughout.
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        mfus = [json.loads(line)["perf/mfu"] for line in f if "perf/mfu" in line]
    assert mfus and all(0 < m < 1 for m in mfus), mfus


def test_checkpoint_keeps_last_n_and_every_k(tmp_path):
    from jaxlm.core.config import CheckpointConfig
    from jaxlm.training.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(keep_last=2, keep_every=3, async_save=True))
    for step in range(1, 8):
        ckpt.save(step, {"w": jnp.full((2,), float(step))}, {"start": 0}, {"step": step}, force=True)
    ckpt.close()
    assert sorted(int(d) for d in os.listdir(tmp_path / "ckpt") if d.isdigit()) == [3, 6, 7]
    assert Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig()).saved_config(6) == {"step": 6}


@pytest.mark.slow  # a `jaxlm train` process, then four `jaxlm generate` ones (~50 s)
def test_generate_from_a_trained_run(tmp_path, cache_dir):
    run = tmp_path / "run"
    assert jaxlm_train(SMALL + ["train.steps=2"], run, cache_dir, devices=1).returncode == 0
    assert (run / "tokenizer.model").is_file()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "jaxlm.cli", "generate", str(run), "--max-new-tokens", "5"]
    one = subprocess.run(cmd + ["--prompt", "In the beginning"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and one.stdout.strip(), one.stderr
    (tmp_path / "prompts.txt").write_text("And God said\nJesus wept\n")
    batch = subprocess.run(cmd + ["--prompt-file", str(tmp_path / "prompts.txt")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert batch.returncode == 0 and "And God said" in batch.stdout and "Jesus wept" in batch.stdout, batch.stderr
    bad = subprocess.run(cmd[:4] + [str(tmp_path), "--prompt", "x"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a jaxlm run directory" in bad.stderr
    long = subprocess.run(cmd + ["--prompt", "word " * 80], env=env, capture_output=True, text=True, timeout=300)
    assert long.returncode == 2 and "exceeds the model's context" in long.stderr, long.stderr
    chat = subprocess.run(cmd + ["--prompt", "Who made the earth?", "--chat", "--quantize", "int4"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr


@pytest.mark.slow  # a `jaxlm train` process, then eval and quantize (~50 s)
def test_eval_and_quantize_commands_on_a_trained_run(tmp_path, cache_dir):
    run = tmp_path / "run"
    hook = ["train.steps=2", "train.eval_tasks=('perplexity',)", "train.eval_limit=2"]  # evaluation as a train hook
    trained = jaxlm_train(SMALL + hook, run, cache_dir, devices=1)
    assert trained.returncode == 0, trained.stderr
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("eval/perplexity/bits_per_byte", 0) > 0 and m.get("eval/perplexity/documents") == 2
               for m in logged), logged
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    task = tmp_path / "mc.jsonl"
    task.write_text(json.dumps({"context": "In the beginning God", "choices": [" created", " wept"], "answer": 0}) + "\n")
    cli = [sys.executable, "-m", "jaxlm.cli"]
    out = tmp_path / "results.json"
    ev = subprocess.run(cli + ["eval", str(run), "--task", "perplexity", "--task", f"mc:{task}", "--limit", "2",
                               "--quantize", "int8", "--output", str(out)], env=env, capture_output=True, text=True,
                        timeout=300)
    assert ev.returncode == 0, ev.stderr
    results = json.loads(out.read_text())["results"]
    assert results["perplexity"]["documents"] == 2 and results["perplexity"]["bits_per_byte"] > 0
    assert results[f"mc:{task}"]["questions"] == 1
    q = subprocess.run(cli + ["quantize", str(run), "--format", "int8", "--format", "nf4", "--limit", "2"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert q.returncode == 0 and "int8" in q.stdout and "nf4" in q.stdout, q.stderr
    bad = subprocess.run(cli + ["eval", str(run), "--task", "mmlu"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown eval task 'mmlu'" in bad.stderr
