"""Presets: each module defines `config() -> jaxlm.config.Config`. Use by name: `jaxlm train tiny`."""
