"""The `pipeline` command: one subcommand per DVC stage, each calling `stages.<name>.run`.

Every subcommand reads configs/params.yaml (or --params), an optional --profile overlay and
--set key=value overrides, so the CLI and `dvc repro` see the same parameters.
"""
from __future__ import annotations

import errno
import functools
import gc
import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import click

from pipeline.config.params import DEFAULT_PARAMS, load_params
from pipeline.errors import ParamError, UserError

# Exceptions of the project that are not a user's to act on (a test checks every other is a UserError).
_INTERNAL_ERRORS = [("pipeline.extraction.encode", "InjectedFailure")]
# OSErrors a user fixes on the machine (free space, permissions): one line naming the file.
_DISK_ERRNOS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
                errno.EROFS: "choose a writable folder in params 'paths'",
                errno.EACCES: "fix the permissions or choose another folder in params 'paths'"}


def params_options(func: Callable) -> Callable:
    """--params/--profile/--set on a subcommand; passes the loaded, validated Params as `params`."""

    @click.option("--params", "params_path", default=str(DEFAULT_PARAMS), show_default=True,
                  type=click.Path(dir_okay=False), help="Parameter file.")
    @click.option("--profile", default=None, help="Overlay a dataset profile: smoke, cpu-trial, coco or voc.")
    @click.option("--recipe", default=None, help="authors (default, the released code's choices) or paper: "
                  "shortcut for --set recipe=...")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a parameter, e.g. --set train.lr=0.01 (repeatable).")
    @functools.wraps(func)
    def wrapper(params_path: str, profile: str | None, recipe: str | None, overrides: tuple[str, ...],
                **kwargs: Any) -> Any:
        extra = kwargs.pop("_extra_overrides", ())
        chosen = [f"recipe={recipe}"] if recipe else []
        try:
            params = load_params(params_path, [*chosen, *overrides, *extra], profile)
        except ParamError as err:
            raise click.ClickException(str(err)) from err
        return func(params=params, **kwargs)

    return wrapper


def optional_params_options(func: Callable) -> Callable:
    """params_options for commands that also work without a params file (`segment`, `query` with
    --projectors or --run): `params` is None when --params is not given and configs/params.yaml
    is not there (and no --profile, --recipe or --set asks for one)."""

    @click.option("--params", "params_path", default=None, type=click.Path(dir_okay=False),
                  help=f"Parameter file [default: {DEFAULT_PARAMS} when it exists; not needed with "
                       "--projectors or --run].")
    @click.option("--profile", default=None, help="Overlay a dataset profile: smoke, coco or voc.")
    @click.option("--recipe", default=None, help="Shortcut for --set recipe=... (the params' recipe).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a parameter of the params file (repeatable).")
    @functools.wraps(func)
    def wrapper(params_path: str | None, profile: str | None, recipe: str | None, overrides: tuple[str, ...],
                **kwargs: Any) -> Any:
        wanted = [f"recipe={recipe}"] if recipe else []
        if params_path is None and not DEFAULT_PARAMS.exists() and not (profile or wanted or overrides):
            return func(params=None, **kwargs)
        try:
            params = load_params(params_path or DEFAULT_PARAMS, [*wanted, *overrides], profile)
        except ParamError as err:
            raise click.ClickException(str(err)) from err
        return func(params=params, **kwargs)

    return wrapper


def import_stage(module: str) -> ModuleType:
    """`stages.<module>`, imported with the cyclic garbage collector paused.

    Its imports (torch, open_clip, the model) create ~400k objects that live as long as the
    process, and the collector would walk all of them in each of the ~6 full collections they
    trigger while loading, finding nothing to free (bench/bench_startup.py measures the cost).
    After the first import they are frozen (`gc.freeze`: left out of later collections, which
    also spares the run's own collections); the collector is then as it was.
    """
    name = f"stages.{module}"
    if name in sys.modules:
        return importlib.import_module(name)
    enabled = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def run_stage(module: str, function: str = "run", **kwargs: Any) -> Any:
    """Import `stages.<module>` lazily (torch imports are slow) and map user errors to one line."""
    try:
        stage = import_stage(module)
        return getattr(stage, function)(**kwargs)
    except UserError as err:
        raise click.ClickException(str(err)) from err
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        where = err.filename or "a file"
        raise click.ClickException(f"{where}: {err.strerror}: {_DISK_ERRNOS[err.errno]} and run the "
                                   "command again (completed work is kept)") from err


def _with_overrides(mapping: dict[str, str]) -> Callable:
    """Turn convenience flags (e.g. --views 4) into `--set` overrides of their params key."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            extra = [f"{key}={kwargs.pop(flag)}" for flag, key in mapping.items()
                     if kwargs.get(flag) is not None]
            for flag in mapping:
                kwargs.pop(flag, None)
            return func(_extra_overrides=extra, **kwargs)

        return wrapper

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="unmix-pipeline")
def main() -> None:
    """Unmix-CLIP pipeline: extract CLIP tokens once, train projectors on the cache, evaluate."""

