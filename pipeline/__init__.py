"""Unmix-CLIP pipeline: frozen CLIP tokens extracted once, projectors trained on the cache, evaluated.

Packages by layer, each importing only those below it (an import-linter contract in pyproject.toml
keeps it so; docs/ARCHITECTURE.md draws it):

    cli > api > results > training > evaluation > extraction > store > model > data > config
    > errors, files

`stages/` (one module per DVC stage) sits above the library, which never imports it.
"""
