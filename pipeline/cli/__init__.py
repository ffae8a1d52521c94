"""cli"""
from pipeline.cli.app import main
from pipeline.cli import commands  # noqa: F401,E402  (registers the subcommands on `main`)

__all__ = ["main"]
