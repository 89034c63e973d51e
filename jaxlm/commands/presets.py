"""`jaxlm presets`: the built-in presets' names (the modules of jaxlm.configs)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("presets", help="list the built-in presets")
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxlm.core import overrides

    print("\n".join(overrides.list_presets()))
    return 0
