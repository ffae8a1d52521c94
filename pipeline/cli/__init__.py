"""The `pipeline` command: the click app (`app`: params options, one-line user errors) and one
subcommand per DVC stage (`commands`). Each subcommand calls `stages.<name>.run` by name, imported
lazily (torch is slow to import), so the library itself never imports `stages/`.

The top layer.
"""
from pipeline.cli import commands  # noqa: F401  (registers the subcommands on `main`)
from pipeline.cli.app import main

__all__ = ["main"]
