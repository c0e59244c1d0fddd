"""Subcommands of `conduit` kept out of conduit/cli.py: everyday operations and submit."""
