"""Builds a Config from a preset, stacked config files and gin-like `section.field=value` overrides.

Values are parsed with `ast.literal_eval` (never `eval`) and checked against the dataclass field types,
then (`config.validate`, whatever the source: preset, file or override) against each numeric field's declared
range. An unknown key is an error that names the nearest valid key; a key given twice is an error.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import json
import pathlib
import pkgutil
import tomllib
import types
import typing
from typing import Any, Literal

from jaxlm.core.config import Config, ConfigError, validate

PRESET_PACKAGE = "jaxlm.configs"  # the repository's configs/ folder (see jaxlm/configs/__init__.py)


def all_keys(config: Config) -> dict[str, Any]:
    """Maps every dotted key ("model.num_layers") to its field type."""
    keys = {}
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            hints = typing.get_type_hints(type(value))
            for field in dataclasses.fields(value):
                keys[f"{section.name}.{field.name}"] = hints[field.name]
        else:
            keys[section.name] = typing.get_type_hints(Config)[section.name]
    return keys


# Names users bring from Hugging Face configs or other trainers.
ALIASES = {
    "learning_rate": "lr", "hidden_size": "d_model", "n_embd": "d_model", "num_hidden_layers": "num_layers",
    "n_layers": "num_layers", "n_layer": "num_layers", "intermediate_size": "mlp_dim",
    "num_attention_heads": "num_heads", "n_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
    "batch": "batch_size", "global_batch_size": "batch_size", "max_steps": "steps", "seed": "seed",
}


def _nearest(key: str, keys) -> str:
    section, _, field = key.rpartition(".")
    alias = f"{section}.{ALIASES.get(field, field)}" if section else ALIASES.get(field, field)
    if alias in keys:
        return f"; did you mean '{alias}'?"
    match = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, tp, value: Any) -> Any:
    """Returns `value` converted to field type `tp`, or raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        item_type = typing.get_args(tp)[0]
        if isinstance(value, str):
            value = (value,)
        if isinstance(value, (list, tuple)):
            return tuple(coerce(key, item_type, v) for v in value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int literal with hundreds of digits
                raise ConfigError(f"{key}={value!r} is out of range: too large for a float") from None
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")


def parse_literal(key: str, text: str, tp) -> Any:
    """Parses the text of an override. Bare words are strings (so `optim.decay=linear` works)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if tp is str or typing.get_origin(tp) in (Literal, tuple):
            return text
        raise ConfigError(f"{key}={text} cannot be parsed: expected a literal of type {_type_name(tp)}") from None


# Keys that were merged into another: each is refused with a line naming its successor.
RENAMED = {
    "finetune.base": ("model.init_from", "model.init_from=RUN or hf:DIR"),
    "lora.init_from": ("model.init_from", "model.init_from=RUN/adapters, a PEFT adapter directory, or BASE+ADAPTERS"),
}


def _renamed(key: str) -> None:
    if key in RENAMED:
        new, use = RENAMED[key]
        raise ConfigError(f"{key} is now {new} (the one setting for where a run's weights and adapters start); "
                          f"use {use}")


def apply(config: Config, values: dict[str, Any]) -> Config:
    """Applies already-parsed dotted values, type-checked, and returns the new config."""
    keys = all_keys(config)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in values.items():
        if key in RENAMED and not value:  # an empty old key in a saved config means nothing
            continue
        _renamed(key)
        if key not in keys:
            raise ConfigError(f"unknown config key '{key}'{_nearest(key, keys)}")
        value = coerce(key, keys[key], value)
        if "." in key:
            section, field = key.split(".", 1)
            sections.setdefault(section, {})[field] = value
        else:
            top[key] = value
    replaced = {name: dataclasses.replace(getattr(config, name), **f) for name, f in sections.items()}
    return dataclasses.replace(config, **replaced, **top)


def parse_overrides(config: Config, args: list[str]) -> dict[str, Any]:
    keys = all_keys(config)
    values: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override '{arg}' must look like section.field=value (e.g. model.num_layers=4)")
        key, text = arg.split("=", 1)
        key = key.strip()
        _renamed(key)
        if key not in keys:
            raise ConfigError(f"unknown config key '{key}'{_nearest(key, keys)}")
        if key in values:
            raise ConfigError(f"config key '{key}' is given twice on the command line")
        values[key] = parse_literal(key, text.strip(), keys[key])
    return values


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _old_preset_import(ref: str, e: ModuleNotFoundError) -> None:
    """Presets were a top-level `configs` package before they became jaxlm.configs: a preset of the user's
    own that still imports `from configs import tiny` gets a line that says what to write instead."""
    if (e.name or "").split(".")[0] == "configs":
        raise ConfigError(f"preset {ref} imports '{e.name}': the presets are the package jaxlm.configs, "
                          f"e.g. `from jaxlm.configs import tiny`") from None


def _load_preset(ref: str) -> Config:
    path = pathlib.Path(ref)
    if path.suffix == ".py":
        if not path.is_file():
            raise ConfigError(f"config file {ref} does not exist")
        spec = importlib.util.spec_from_file_location(f"_jaxlm_preset_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)  # a preset is the user's own code, like any training script
        except ModuleNotFoundError as e:
            _old_preset_import(ref, e)
            raise
    else:
        name = f"{PRESET_PACKAGE}.{ref}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            _old_preset_import(ref, e)
            missing = e.name or ""
            if not missing.startswith(PRESET_PACKAGE + ".") or not f"{name}.".startswith(f"{missing}."):
                raise  # the preset exists; something it imports does not
            raise ConfigError(f"unknown preset '{ref}'{_nearest(ref, list_presets())}") from None
    if not isinstance(getattr(module, "config", None), types.FunctionType):
        raise ConfigError(f"preset {ref} must define a function config() -> jaxlm.core.config.Config")
    config = module.config()
    if not isinstance(config, Config):
        raise ConfigError(f"preset {ref}: config() returned {type(config).__name__}, not Config")
    return config


def _load_data_file(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            return _flatten(tomllib.loads(path.read_text()))
        return _flatten(json.loads(path.read_text()))
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None


def list_presets() -> list[str]:
    package = importlib.import_module(PRESET_PACKAGE)
    # __path__, not __file__: from a checkout the package's init is a stand-in that points at configs/
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def load(args: list[str]) -> Config:
    """Builds the config from CLI words: [PRESET|FILE.py] [FILE.toml|FILE.json ...] [key=value ...].

    Later files override earlier ones, and command-line overrides come last. A `config.json` saved by a
    run is a valid stacked file, which is how a run is reproduced.
    """
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    config = Config()
    for i, ref in enumerate(files):
        path = pathlib.Path(ref)
        if path.suffix in (".toml", ".json"):
            config = apply(config, _load_data_file(path))
        elif i == 0:
            config = _load_preset(ref)
        elif ref.split(".")[0] in {f.name for f in dataclasses.fields(Config)}:
            raise ConfigError(f"override '{ref}' must look like section.field=value (e.g. model.num_layers=4)")
        else:
            raise ConfigError(f"{ref}: only the first config may be a preset; stack .toml or .json files after it")
    config = apply(config, parse_overrides(config, overrides))
    return validate(config)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
