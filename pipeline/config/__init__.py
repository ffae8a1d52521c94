"""Parameters: the pydantic schema (`schema`), loading and merging params.yaml with recipes, profiles
and `--set` (`params`), and where each output lives (`paths`); the recipe and profile YAML files.

Owns every parameter name and default. Imports only `pipeline.errors` and `pipeline.files`; every
other layer reads its parameters through this package.
"""
