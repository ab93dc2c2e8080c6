"""Subcommands of the ``crfr`` CLI: each module has ``register(subparsers)``."""
