"""YAML as the project reads and writes it: the YAML 1.2 core schema, duplicate keys refused.

PyYAML implements YAML 1.1, where `1:30` is the base-60 integer 90, `0b11` is 3, `1_000` is 1000,
`yes`/`on` are booleans and `2024-01-01` is a date, while `1e-3` is a string. Under the 1.2 core
schema (which ruamel.yaml, `pipeline configure`'s round trip, and DVC follow) only these are not
strings: null (`null`, `~`, empty), booleans (`true`/`false`), integers (`12`, `0o17`, `0x1f`) and
floats (`1.5`, `1e-3`, `.inf`, `.nan`). Every parameter source goes through `yaml_load`: the params
file, profiles, recipes and `--set` values. A key that appears twice in one mapping is refused with
its line (PyYAML would keep the last one silently).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node

from pipeline.errors import ParamError

# (tag, pattern, first characters) of the YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution)
_CORE = [
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    ("tag:yaml.org,2002:float", (r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                 r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789.")),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", ["<"]),  # anchors and merges, as ruamel.yaml keeps them
]


def _construct_int(loader: yaml.SafeLoader, node: Node) -> int:
    text = str(loader.construct_scalar(node))
    try:
        return int(text, 0 if text.startswith(("0o", "0x")) else 10)  # 010 is ten, as in YAML 1.2
    except ValueError:
        raise ConstructorError(None, None, f"{text!r} is not a YAML 1.2 integer", node.start_mark) from None


class DuplicateKey(ConstructorError, ParamError):
    """A key written twice in one mapping (yaml_load re-raises it as a ParamError naming the file)."""

    def __init__(self, key: Any, first: int, line: int) -> None:
        self.key, self.first, self.line = key, first, line
        super().__init__(None, None, f"key {key!r} appears twice in one mapping (lines {first} and {line})")


class Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema's implicit types, refusing duplicate keys."""

    yaml_implicit_resolvers: ClassVar[dict] = {}  # none of YAML 1.1's: only _CORE's, added below

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error names it
        return super().construct_mapping(node, deep=deep)


class Yaml12Dumper(yaml.SafeDumper):
    """SafeDumper that quotes exactly the strings Yaml12Loader would read as something else."""

    yaml_implicit_resolvers: ClassVar[dict] = {}


for _tag, _pattern, _first in _CORE:
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(_pattern), _first)
    Yaml12Dumper.add_implicit_resolver(_tag, re.compile(_pattern), _first)
Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _where(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f", line {mark.line + 1}" if mark is not None else ""


def yaml_load(text: str, source: str = "YAML") -> Any:
    """Parse `text` under the YAML 1.2 core schema (`1e-3` a float, `1:30` / `0b11` / `1_000` strings),
    safe tags only. A duplicate key or invalid YAML is one ParamError line naming `source` and the line."""
    loader = Yaml12Loader(text)
    try:
        return loader.get_single_data()
    except DuplicateKey as err:
        raise ParamError(f"{source}, line {err.line}: key {err.key!r} appears twice in one mapping "
                         f"(first on line {err.first}): keep one") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamError(f"{source}{_where(err)}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()


def yaml_dump(data: Any) -> str:
    """YAML text that yaml_load reads back as `data` (block style, keys in their order)."""
    return yaml.dump(data, Dumper=Yaml12Dumper, sort_keys=False)


def yaml11_number(value: Any) -> int | float | None:
    """The number YAML 1.1 (PyYAML's safe_load) makes of a plain scalar that YAML 1.2 reads as a
    string (`1:30` -> 90, `0b11` -> 3, `1_000` -> 1000); None for anything else. For messages."""
    if not isinstance(value, str):
        return None
    try:
        if not isinstance(yaml_load(value), str):
            return None
        old = yaml.safe_load(value)
    except (ParamError, yaml.YAMLError):
        return None
    return old if isinstance(old, (int, float)) and not isinstance(old, bool) else None


def read_yaml(path: Path) -> dict:
    """A parameter file's mapping ({} for an empty file), read with yaml_load."""
    data = yaml_load(path.read_text(), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamError(f"{path}: must hold a mapping of parameters, got {type(data).__name__}")
    return data
