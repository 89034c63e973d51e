"""`model.init_from`, the one start-from setting: what each form names, and the old keys' one-line errors."""

import json

import pytest

from jaxlm import cli
from jaxlm.core import atomic, overrides, rundir
from jaxlm.core.config import Config, ConfigError, ModelConfig
from jaxlm.training import base


def _run(path, init_from=""):
    """A run directory as far as `parse` reads it: config.json, and adapters/ from a LoRA run."""
    config = Config(model=ModelConfig(init_from=init_from))
    (path / rundir.ADAPTERS).mkdir(parents=True)
    atomic.write_json(str(path / rundir.CONFIG), overrides.to_dict(config))
    (path / rundir.ADAPTERS / "adapters.safetensors").write_bytes(b"")
    return path


def test_each_form_names_its_base_and_adapters(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    run = _run(tmp_path / "lora_run", init_from=f"hf:{hf}")
    adapters = str(run / rundir.ADAPTERS)
    assert base.parse("") == base.Start("")
    assert base.parse(f"hf:{hf}") == base.Start(f"hf:{hf}")
    assert base.parse(str(run)) == base.Start(str(run))  # a run directory: its merged model, fresh adapters
    assert base.parse(adapters) == base.Start(f"hf:{hf}", adapters)  # its adapters, on the base they trained on
    # A run continued from those adapters is itself continued on the same base.
    second = _run(tmp_path / "second", init_from=adapters)
    assert base.parse(str(second / rundir.ADAPTERS)).base == f"hf:{hf}"
    # BASE+ADAPTERS names the base; a LoRA run directory after the "+" means its adapters.
    assert base.parse(f"{run}+{second}") == base.Start(str(run), str(second / rundir.ADAPTERS))

    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(hf)}))
    assert base.parse(str(peft)) == base.Start(f"hf:{hf}", str(peft))
    (peft / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/model-on-the-hub"}))
    with pytest.raises(ConfigError, match=r"not a local Hugging Face directory; name it: model.init_from=hf:BASE_DIR\+"):
        base.parse(str(peft))
    assert base.parse(f"hf:{hf}+{peft}") == base.Start(f"hf:{hf}", str(peft))
    (peft / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .*adapter_config.json"):
        base.parse(str(peft))


def test_base_plus_a_directory_without_adapters_is_refused():
    run_config = Config(model=ModelConfig(init_from="hf:/x+/y"))
    with pytest.raises(ConfigError, match="holds neither"):
        base.resolve(run_config)


@pytest.mark.parametrize("old", ["lora.init_from", "finetune.base"])
def test_old_start_keys_name_the_new_one(old, tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"{old} is now model.init_from"):
        overrides.load(["tiny", f"{old}=/somewhere"])
    assert cli.main(["train", "tiny", f"{old}=/somewhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.init_from" in err[0]
    # A saved config that still carries the old key, empty, loads as before.
    section, field = old.split(".")
    saved = overrides.to_dict(Config())
    saved[section][field] = ""
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert overrides.load([str(tmp_path / "config.json")]) == Config()
