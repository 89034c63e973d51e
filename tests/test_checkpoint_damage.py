"""Damaged checkpoints (files cut short, as an interrupted copy from a bucket leaves them): training falls back
to the newest intact step, bit for bit; every other command ends with one line naming the damaged step and
the intact ones. A checkpoint of another model is still a one-line config error."""

import dataclasses
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_config

from jaxlm.core import mesh as mesh_lib, sharded_init
from jaxlm.core.config import CheckpointConfig, ConfigError
from jaxlm.core.overrides import to_dict
from jaxlm.model.transformer import Transformer
from jaxlm.training.checkpoint import Checkpointer, DamagedCheckpoint

STEPS = (10, 20, 30)
CONFIG = small_config()


def abstract_state(config=CONFIG):
    init = sharded_init.make_init_fn(Transformer(config.model, "xla"), optax.adam(1e-3), 0)
    return init, sharded_init.abstract_state(init, mesh_lib.make_mesh(config.mesh))


def state_at(step: int, state):
    """A distinct state per step: every float leaf (params and Adam moments) shifted by the step."""
    shift = lambda x: x + step / 7 if jnp.issubdtype(x.dtype, jnp.floating) else x
    return state.replace(step=jnp.asarray(step, jnp.int32), params=jax.tree.map(shift, state.params),
                         opt_state=jax.tree.map(shift, state.opt_state))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Checkpoints at STEPS, saved once: (directory, {step: host copy of the saved state})."""
    directory = str(tmp_path_factory.mktemp("pristine") / "checkpoints")
    saved = {}
    with jax.set_mesh(mesh_lib.make_mesh(CONFIG.mesh)):
        init, abstract = abstract_state()
        state = sharded_init.materialize(init, abstract)
        with Checkpointer(directory, CheckpointConfig(async_save=False, keep_last=10)) as ckpt:
            for step in STEPS:
                s = state_at(step, state)
                ckpt.save(step, s, {"position": step}, to_dict(CONFIG), force=True)
                saved[step] = jax.device_get(s)
    return directory, saved


def damage(directory: str, step: int) -> list[str]:
    """Cuts every array data file of `step` to half its size; returns them."""
    files = [f for f in glob.glob(os.path.join(directory, str(step), "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    assert files
    for f in files:
        os.truncate(f, os.path.getsize(f) // 2)
    return files


@pytest.fixture
def checkpoints(pristine, tmp_path):
    directory = str(tmp_path / "run" / "checkpoints")
    shutil.copytree(pristine[0], directory)
    return directory


def test_restore_latest_falls_back_bit_for_bit_and_warns(pristine, checkpoints, caplog):
    damage(checkpoints, 30)
    with jax.set_mesh(mesh_lib.make_mesh(CONFIG.mesh)), caplog.at_level(logging.WARNING, "jaxlm.training.checkpoint"):
        _, abstract = abstract_state()
        with Checkpointer(checkpoints, CheckpointConfig(async_save=False)) as ckpt:
            step, state, data_state = ckpt.restore_latest(abstract)
            assert step == 20 and data_state == {"position": 20}
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), pristine[1][20])
            # The damaged step is set aside, so the resumed run can save step 30 again.
            assert ckpt.manager.all_steps() == [10, 20]
            assert ckpt.save(30, state, {"position": 30}, {}, force=True)
    assert "checkpoints/30 (step 30) is damaged" in caplog.text and "OUT_OF_RANGE" in caplog.text
    assert os.path.isdir(os.path.join(checkpoints, "30.damaged"))


def test_every_step_damaged_is_one_config_error(checkpoints):
    for step in STEPS:
        damage(checkpoints, step)
    with jax.set_mesh(mesh_lib.make_mesh(CONFIG.mesh)):
        _, abstract = abstract_state()
        with Checkpointer(checkpoints, CheckpointConfig()) as ckpt, pytest.raises(ConfigError) as e:
            ckpt.restore_latest(abstract)
    assert "every checkpoint" in str(e.value) and "steps 10, 20, 30" in str(e.value)
    assert sorted(os.listdir(checkpoints)) == ["10", "20", "30"]  # nothing moved: nothing to resume from


def test_another_model_is_a_config_error_not_damage(checkpoints):
    damage(checkpoints, 30)  # even with a damaged newest step, a mismatch is reported as such
    other = dataclasses.replace(CONFIG, model=dataclasses.replace(CONFIG.model, num_layers=3))
    with jax.set_mesh(mesh_lib.make_mesh(other.mesh)):
        _, abstract = abstract_state(other)
        with Checkpointer(checkpoints, CheckpointConfig()) as ckpt:
            with pytest.raises(ConfigError) as e:
                ckpt.restore_latest(abstract)
            assert not isinstance(e.value, DamagedCheckpoint)
            assert "does not match this model" in str(e.value) and "saved (2," in str(e.value)
            with pytest.raises(ConfigError, match="does not hold params for this model"):
                ckpt.restore_params(20, abstract.params)
    assert "\n" not in str(e.value)


def test_restore_params_names_the_damaged_and_the_intact_steps(checkpoints):
    damage(checkpoints, 30)
    with jax.set_mesh(mesh_lib.make_mesh(CONFIG.mesh)):
        _, abstract = abstract_state()
        with Checkpointer(checkpoints, CheckpointConfig()) as ckpt:
            with pytest.raises(DamagedCheckpoint) as e:
                ckpt.restore_params(30, abstract.params)
    message = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in message
    assert f"checkpoint {checkpoints}/30 is damaged (OUT_OF_RANGE" in message
    assert message.endswith("intact steps: 10, 20") and e.value.intact == [10, 20]


def make_run(checkpoints: str, **model) -> str:
    """A run directory around `checkpoints`: config.json and a tokenizer, as `jaxlm train` leaves them."""
    from hf_models import save_tokenizer

    run = os.path.dirname(checkpoints)
    config = dataclasses.replace(CONFIG, model=dataclasses.replace(CONFIG.model, **model))
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(to_dict(config), f)
    save_tokenizer(run, vocab_size=CONFIG.model.vocab_size)
    return run


def test_load_run_of_a_damaged_step_is_one_config_error(checkpoints):
    pytest.importorskip("tokenizers")
    from jaxlm.inference.load import load_run

    damage(checkpoints, 30)
    run = make_run(checkpoints)
    with pytest.raises(DamagedCheckpoint, match=r"checkpoints/30 is damaged .*; intact steps: 10, 20$"):
        load_run(run)
    assert load_run(run, step=20).step == 20


def cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_on_a_damaged_or_mismatched_run_prints_one_line(checkpoints):
    pytest.importorskip("tokenizers")
    damage(checkpoints, 30)
    run = make_run(checkpoints)
    proc = cli("generate", run, "--prompt", "in the beginning", "--max-new-tokens", "2")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "checkpoints/30 is damaged" in lines[0] and lines[0].endswith("intact steps: 10, 20; pass --step 20")

    make_run(checkpoints, num_layers=3)  # the run's config now names another model
    proc = cli("generate", run, "--prompt", "in the beginning", "--step", "20")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "does not hold params for this model" in proc.stderr and "Event loop" not in proc.stderr


SMALL = ["tiny", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2",
         "model.mlp_dim=128", "model.vocab_size=512", "model.max_seq_len=64", "train.seq_len=64",
         "train.batch_size=8", "train.log_every=1", "train.eval_batches=0", "optim.warmup_steps=2",
         "train.progress=False", "train.steps=4", "checkpoint.every=2"]


def not_logging(stderr: str) -> list[str]:
    """The stderr lines that are not INFO records of the CLI's log format ("12:34:56 INFO name: ...")."""
    return [line for line in stderr.strip().splitlines() if line[8:14] != " INFO "]


@pytest.mark.slow  # two short `jaxlm train` runs and a failing third: about a minute on 2 cores
def test_train_resumes_past_a_damaged_step_and_a_wrong_config_is_one_line(tmp_path):
    run, words = tmp_path / "run", [f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    first = cli("train", *SMALL, *words, "model.num_layers=2")
    assert first.returncode == 0, first.stderr
    damage(str(run / "checkpoints"), 4)

    again = cli("train", *SMALL, *words, "model.num_layers=2")  # the same command: it must redo steps 3 and 4 from step 2
    assert again.returncode == 0, again.stderr
    assert "checkpoints/4 (step 4) is damaged" in again.stderr and "at step 2" in again.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "4.damaged"]

    wrong = cli("train", *SMALL, *words, "model.num_layers=3")
    assert wrong.returncode == 2
    assert not_logging(wrong.stderr) == [wrong.stderr.strip().splitlines()[-1]], wrong.stderr
    # The run directory refuses another model before any checkpoint is read (tests/test_rundir.py); a
    # checkpoint that does not match its own config is test_another_model_is_a_config_error_not_damage.
    assert "holds a run with a different config (model.num_layers: 2 -> 3)" in wrong.stderr
    assert "Traceback" not in wrong.stderr and "Event loop is closed" not in wrong.stderr
