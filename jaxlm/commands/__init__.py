"""The `jaxlm` subcommands, one module per command group. Each module's `add_parser(subparsers)` registers its
parser(s) with `set_defaults(func=handler)` beside the handler it serves; `jaxlm.cli` assembles them. The
handlers import JAX and the trainer inside themselves, so that `--help` and a bad config cost nothing."""
