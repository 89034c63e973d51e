"""Presets, installed as the package jaxlm.configs: each module defines `config() -> jaxlm.core.config.Config`.
Use by name: `jaxlm train tiny`; in a preset of your own: `from jaxlm.configs import tiny`."""
