"""Finetuning runs through the shared training loop: gradient accumulation, resume, preemption, reruns."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from conftest import quick_jit, small_config

from jaxlm import cli
from jaxlm.core.config import LoraConfig, MeshConfig
from jaxlm.core.mesh import make_mesh
from jaxlm.core.sharding import global_batch
from jaxlm.training import assembly
from jaxlm.training.step import make_step

PAIRS = [("What is your name?", "I am a bot."), ("How are you?", "Fine, thanks."), ("Hi", "Hello there."),
         ("Where do you live?", "In a computer, far away.")]
SMALL = ["model.vocab_size=384", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=1", "model.mlp_dim=64", "train.seq_len=96", "train.progress=False", "train.log_every=1",
         "optim.lr=1e-2", "optim.warmup_steps=1", "data.eval_fraction=0.25", "finetune.drop_repeats=False"]
# sft_tiny finetunes fully; the LoRA tests take the adapters its LoRA presets use.
LORA = "lora.targets=('attn/(q|k|v|o)$','mlp/(gate|up|down)$')"


def _rows(seed: int, n: int = 8, t: int = 16, vocab: int = 128) -> dict:
    """SFT rows whose loss masks differ in size, so that token weighting matters."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (n, t + 1)).astype(np.int32)
    mask = (np.arange(t)[None, :] >= rng.integers(1, t - 1, (n, 1))).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(t, dtype=np.int32), (n, 1)),
            "segment_ids": np.ones((n, t), np.int32), "loss_mask": mask}


def _dpo_rows(seed: int) -> dict:
    a, b = _rows(seed), _rows(seed + 1)
    out = {}
    for side, r in (("chosen", a), ("rejected", b)):
        out.update({f"{side}_{k}": r[k] for k in ("inputs", "targets", "positions", "segment_ids")})
        out[f"{side}_mask"] = r["loss_mask"]
        out[f"ref_{side}"] = np.random.default_rng(seed).normal(-40.0, 5.0, 8).astype(np.float32)
    return out


# Each a compiled accumulating step and a whole-batch one (~30 s on 2 cores): SFT by default, DPO with LoRA slow.
@pytest.mark.parametrize("task,lora", [("sft", False), pytest.param("dpo", True, marks=pytest.mark.slow)])
def test_grad_accumulation_equals_one_whole_batch(task, lora):
    config = small_config()
    if lora:
        config = dataclasses.replace(config, lora=LoraConfig(targets=("attn/(q|v)$", "mlp/up$"), rank=4))
    config = dataclasses.replace(config, task=task, finetune=dataclasses.replace(config.finetune, beta=0.5))
    spec = assembly.build(config)
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    batch_np = _dpo_rows(0) if task == "dpo" else _rows(0)
    with jax.set_mesh(mesh):
        results = []
        for accum in (1, 4):
            state = assembly.initial_state(spec, assembly.abstract_state(spec, mesh), mesh)
            if spec.lora is not None:  # nonzero B, so that the adapters shape the gradients
                state = state.replace(params={**state.params, "lora": jax.tree.map(
                    lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), state.params["lora"])})
            # Plain SGD, so the update is the gradient itself (Adam's first step is ~sign(g): it amplifies rounding).
            sgd = optax.sgd(1.0)
            state = state.replace(opt_state=sgd.init(state.params))
            step = make_step(assembly.objective(config, spec), sgd, spec.trainable, grad_accum=accum)
            batch = global_batch(batch_np, mesh)
            state, metrics = quick_jit(step, state, batch)(state, batch)
            results.append(jax.device_get((metrics, state.params)))
    (m1, p1), (m4, p4) = results
    assert set(m1) == set(m4)
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p4, p1)


def _data(tmp_path) -> str:
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS * 8))
    return str(data)


def _adapters(run):
    from safetensors.numpy import load_file

    return load_file(os.path.join(run, "adapters", "adapters.safetensors"))


def _losses(run, key="train/loss"):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


@pytest.mark.slow  # three LoRA finetuning runs (~110 s on 2 cores)
def test_resumed_lora_finetune_equals_uninterrupted_and_a_rerun_only_rewrites_outputs(tmp_path, capsys):
    """Adapter dropout (RNG), grad accumulation, the optimizer state and the data position all survive a restart."""
    args = ["finetune", "sft_tiny", f"finetune.data={_data(tmp_path)}", f"data.cache_dir={tmp_path}/cache",
            "train.steps=4", "optim.grad_accum=2", "lora.dropout=0.2", "mesh.fsdp=4", "mesh.tensor=2", LORA, *SMALL]
    assert cli.main(args + [f"train.run_dir={tmp_path}/whole"]) == 0
    split = tmp_path / "split"
    assert cli.main(args + [f"train.run_dir={split}", "train.stop_at=2"]) == 0
    out = capsys.readouterr().out
    assert "stopped by train.stop_at=2 at step 2" in out
    assert not (split / "adapters").exists()  # only a finished run writes its outputs
    assert sorted(os.listdir(split / "train_state")) == ["2"]
    assert cli.main(args + [f"train.run_dir={split}"]) == 0

    assert _losses(tmp_path / "whole") == _losses(split) and sorted(_losses(split)) == [1, 2, 3, 4]
    whole, resumed = _adapters(tmp_path / "whole"), _adapters(split)
    assert whole.keys() == resumed.keys()
    for k in whole:
        np.testing.assert_array_equal(resumed[k], whole[k], err_msg=k)
    # The LoRA train state holds adapters and their optimizer state, not the frozen base.
    with open(split / "train_state" / "4" / "state" / "_METADATA") as f:
        assert '"base"' not in f.read().split('"opt_state"')[0]

    # A finished run run again: nothing trains, the outputs are (re)written, and it exits cleanly.
    os.remove(split / "adapters" / "adapters.safetensors")
    capsys.readouterr()
    assert cli.main(args + [f"train.run_dir={split}"]) == 0
    assert (split / "adapters" / "adapters.safetensors").is_file()
    from jaxlm.inference.load import load_run

    assert load_run(str(split)).step == 4


@pytest.mark.slow  # three more finetuning runs; the LoRA variant above runs by default
def test_resumed_full_finetune_equals_uninterrupted(tmp_path, capsys):
    args = ["finetune", "sft_tiny", f"finetune.data={_data(tmp_path)}", f"data.cache_dir={tmp_path}/cache",
            "train.steps=4", "lora.targets=()", *SMALL]
    assert cli.main(args + [f"train.run_dir={tmp_path}/whole"]) == 0
    assert cli.main(args + [f"train.run_dir={tmp_path}/split", "train.stop_at=2"]) == 0
    assert cli.main(args + [f"train.run_dir={tmp_path}/split"]) == 0
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "split")
    from jaxlm.inference.load import load_run

    a, b = load_run(str(tmp_path / "whole")), load_run(str(tmp_path / "split"))
    assert a.step == b.step == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))


@pytest.mark.slow  # two finetuning runs; initial_adapters itself is tested by default in test_lora.py
def test_init_from_adapters_continues_from_a_finished_runs_adapters(tmp_path, capsys):
    """A second run started from the first's adapters (model.init_from=RUN/adapters: the first run's base, here
    random with the same seed) begins where it ended."""
    args = ["finetune", "sft_tiny", f"finetune.data={_data(tmp_path)}", f"data.cache_dir={tmp_path}/cache",
            "train.steps=3", LORA, *SMALL]
    assert cli.main(args + [f"train.run_dir={tmp_path}/first"]) == 0
    assert cli.main(args + [f"train.run_dir={tmp_path}/second", f"model.init_from={tmp_path}/first/adapters"]) == 0
    ended, began = _losses(tmp_path / "first", "eval/loss"), _losses(tmp_path / "second", "eval/loss")
    np.testing.assert_allclose(began[0], ended[3], rtol=1e-6)
    assert cli.main(args + [f"train.run_dir={tmp_path}/bad", f"model.init_from={tmp_path}/first/adapters",
                            "lora.rank=4"]) == 2
    assert "set lora.rank=8" in capsys.readouterr().err


@pytest.mark.slow  # a real process, signalled mid-run, and its resumption
def test_sigterm_mid_finetune_checkpoints_and_the_same_command_resumes(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxlm.cli", "finetune", "sft_tiny", f"finetune.data={_data(tmp_path)}",
           f"data.cache_dir={tmp_path}/cache", f"train.run_dir={run}", "checkpoint.every=100000", LORA, *SMALL]
    proc = subprocess.Popen(cmd + ["train.steps=100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_losses(run) if (run / "metrics.jsonl").exists() else {}) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out and "run the same command to resume" in out
    steps = [int(d) for d in os.listdir(run / "train_state") if d.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3
    again = subprocess.run(cmd + [f"train.steps={steps[0] + 2}"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {run}/train_state at step {steps[0]}" in again.stderr
    assert sorted(_losses(run)) == list(range(1, steps[0] + 3))
    assert (run / "adapters" / "adapters.safetensors").is_file()


@pytest.mark.slow  # three finetuning processes
def test_two_process_lora_dpo_matches_one_process(tmp_path):
    """DPO with LoRA on 2 processes x 4 devices (each feeding its own rows of every batch, the reference
    log-probs computed across both) trains to 1 x 8's losses, margins and adapters."""
    import socket

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": r, "rejected": PAIRS[(i + 1) % len(PAIRS)][1]}) + "\n"
                            for i, (p, r) in enumerate(PAIRS * 8)))
    words = ["finetune", "dpo_tiny", f"finetune.data={data}", f"data.cache_dir={tmp_path}/cache", "train.steps=3",
             *SMALL]

    def launch(run, processes):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for pid in range(processes):
            env = {**os.environ, "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
            if processes > 1:
                env.update(JAXLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES=str(processes),
                           JAXLM_PROCESS_ID=str(pid))
            cmd = [sys.executable, "-m", "jaxlm.cli", *words, f"train.run_dir={run}", "distributed.init_timeout_s=120"]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for i, p in enumerate(procs):
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"

    launch(tmp_path / "one", 1)  # also trains the tokenizer into the shared cache
    launch(tmp_path / "two", 2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
    margins = [_losses(run, "train/margin") for run in (tmp_path / "one", tmp_path / "two")]
    np.testing.assert_allclose(list(margins[1].values()), list(margins[0].values()), rtol=1e-4, atol=1e-6)
    # Each process reads its own rows of every global batch (grain, rows p::2), so the batch's rows are summed
    # in another order than on one process; after three Adam steps (~sign(g) where g is near 0) that rounding
    # shows in a few elements: compare each adapter to a thousandth of its largest entry, as test_dpo does.
    a, b = _adapters(tmp_path / "one"), _adapters(tmp_path / "two")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-3 * np.abs(a[k]).max(), err_msg=k)
