"""Config loading: presets, stacked files, typed overrides, and one-line errors from the CLI."""

import json
import pathlib
import subprocess
import sys

import pytest

from jaxlm.core import overrides
from jaxlm.core.config import ConfigError


def test_preset_and_overrides_are_typed():
    c = overrides.load(["tiny", "model.num_layers=2", "optim.lr=1e-3", "optim.decay=linear",
                        "optim.no_decay=('norm',)", "model.qk_norm=True", "train.steps=7"])
    assert c.model.num_layers == 2 and c.optim.lr == 1e-3 and c.optim.decay == "linear"
    assert c.optim.no_decay == ("norm",) and c.model.qk_norm is True and c.train.steps == 7
    assert isinstance(c.optim.lr, float)
    assert overrides.load(["tiny", "optim.lr=1"]).optim.lr == 1.0  # an int literal is a fine float


@pytest.mark.parametrize("arg, fragment", [
    ("model.num_layer=3", "did you mean 'model.num_layers'"),
    ("optim.learning_rate=3", "did you mean 'optim.lr'"),
    ("model.num_layers=2.5", "model.num_layers=2.5 has the wrong type: expected int"),
    ("model.num_layers='4'", "expected int"),
    ("model.qk_norm=1", "expected bool"),
    ("optim.decay=exponential", "expected one of 'cosine', 'linear', 'constant'"),
    ("model.num_heads=5", "must be a multiple of model.num_kv_heads"),
    ("train.steps=0", "train.steps=0 is out of range: must be >= 1"),
    ("model.num_layers", "must look like section.field=value"),
])
def test_bad_overrides_are_rejected(arg, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        overrides.load(["tiny", arg])
    assert fragment in str(e.value)


def test_key_given_twice_is_rejected():
    with pytest.raises(ConfigError, match="given twice"):
        overrides.load(["tiny", "model.num_layers=2", "model.num_layers=3"])


def test_unknown_preset_names_nearest():
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        overrides.load(["tinny"])


def test_presets_are_the_repository_configs_folder_as_jaxlm_configs():
    """The presets install as jaxlm.configs, never as a top-level `configs` package that could collide with
    another project's; every module of configs/ is one, whether jaxlm runs from a checkout or an install."""
    folder = pathlib.Path(__file__).resolve().parents[1] / "configs"
    assert overrides.list_presets() == sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    assert overrides.load(["dpo_tiny"]).task == "dpo"  # a preset that imports another: jaxlm.configs.sft_tiny


def test_preset_importing_the_old_configs_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "configs", None)  # as in an install: no top-level `configs` anywhere
    (tmp_path / "old.py").write_text("from configs import tiny\ndef config():\n    return tiny.config()\n")
    with pytest.raises(ConfigError, match=r"imports 'configs': .* `from jaxlm.configs import tiny`"):
        overrides.load([str(tmp_path / "old.py")])


def test_stacked_files_apply_in_order(tmp_path):
    (tmp_path / "a.toml").write_text("[model]\nnum_layers = 3\nd_model = 128\n[optim]\nlr = 0.5\n")
    (tmp_path / "b.json").write_text(json.dumps({"model": {"num_layers": 5}}))
    c = overrides.load(["tiny", str(tmp_path / "a.toml"), str(tmp_path / "b.json"), "optim.lr=0.25"])
    assert (c.model.num_layers, c.model.d_model, c.optim.lr) == (5, 128, 0.25)
    (tmp_path / "bad.toml").write_text("[model]\nnum_layrs = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'model.num_layers'"):
        overrides.load(["tiny", str(tmp_path / "bad.toml")])


def test_saved_config_reproduces_the_run(tmp_path):
    c = overrides.load(["llama3_1b", "model.num_layers=3", "optim.no_decay=('a','b')"])
    (tmp_path / "config.json").write_text(json.dumps(overrides.to_dict(c)))
    assert overrides.load([str(tmp_path / "config.json")]) == c


def test_python_preset_file(tmp_path):
    (tmp_path / "mine.py").write_text(
        "import dataclasses\nfrom jaxlm.configs import qwen2_0_5b\n"
        "def config():\n    c = qwen2_0_5b.config()\n    return dataclasses.replace(c, name='mine')\n")
    c = overrides.load([str(tmp_path / "mine.py"), "model.num_layers=2"])
    assert c.name == "mine" and c.model.qkv_bias and c.model.num_layers == 2


@pytest.mark.parametrize("args, fragment", [
    (["tiny", "model.num_layer=3"], "did you mean 'model.num_layers'"),
    (["tiny", "model.d_model=abc"], "model.d_model"),
    (["tiny", "mesh.fsdp=3"], "mesh (ICI) sizes"),
])
def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path, args, fragment):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "train", *args, f"train.run_dir={tmp_path}/run",
         f"data.cache_dir={tmp_path}/cache"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("jaxlm: error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
