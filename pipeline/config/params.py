"""Parameters: recipe < params file < profile < `--set`, validated against one schema.

`configs/params.yaml` is the single source DVC and the CLI both read. Two axes compose into it:
- the **recipe** (`recipe: authors | paper`, docs/RECIPES.md): every key whose value in the file
  is the word `recipe` takes the recipe's value (`pipeline/config/recipes/<name>.yaml`), so
  `dvc exp run -S recipe=paper` switches every recipe-controlled key at once, and a number written
  in the file (or set with `-S`) wins over the recipe;
- the **profile** (`--profile smoke | coco | voc`, `pipeline/config/profiles/`): the dataset and its
  scale.  DVC never sees CLI profiles, so `pipeline configure --profile coco` writes one into the file.
DVC's Hydra composition was considered and not used: it rewrites params.yaml only on `dvc exp run`,
so the CLI and `dvc repro` would read a file that no longer says which recipe it came from.
Validation (`pipeline.config.schema`) happens here, at the boundary; the core code assumes valid
inputs.
"""
from __future__ import annotations

import copy
import difflib
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.config.backbones import check_backbone
from pipeline.config.schema import RECIPES, Params
from pipeline.config.yaml12 import read_yaml, yaml11_number, yaml_load
from pipeline.errors import ParamError
from pipeline.files import atomic_write_text

DEFAULT_PARAMS = Path("configs/params.yaml")
PACKAGE_DIR = Path(__file__).resolve().parent
PROFILES_DIR = PACKAGE_DIR / "profiles"
RECIPES_DIR = PACKAGE_DIR / "recipes"
PACKAGED_PARAMS = PACKAGE_DIR / "params.yaml"  # a link to the repository's params.yaml (a copy in a wheel)
FROM_RECIPE = "recipe"  # a value in the params file meaning "as the recipe says"


# -- key names ------------------------------------------------------------------------------------
def _schema_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every dotted key the schema declares (sections included)."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        keys.append(key)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += _schema_keys(sub, key + ".")
    return keys


SCHEMA_KEYS = _schema_keys()


def unknown_key(dotted: str) -> ParamError:
    """'unknown parameter' with the nearest known keys suggested."""
    near = difflib.get_close_matches(dotted, SCHEMA_KEYS, n=2, cutoff=0.75)
    hint = f" (did you mean {' or '.join(repr(k) for k in near)}?)" if near else ""
    return ParamError(f"unknown parameter '{dotted}'{hint}")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def get(params: Mapping[str, Any], dotted: str) -> Any:
    cursor: Any = params
    for part in dotted.split("."):
        if not isinstance(cursor, Mapping) or part not in cursor:
            raise ParamError(f"missing parameter '{dotted}'")
        cursor = cursor[part]
    return cursor


def _set(params: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cursor = params
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value


# -- layers ---------------------------------------------------------------------------------------
def _deep_merge(base: dict, overlay: Mapping, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if key not in out:
            raise unknown_key(dotted)
        if isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = _deep_merge(out[key], value, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> dict:
    """'train.mfi.lambda=0.5' -> {'train': {'mfi': {'lambda': 0.5}}} (value parsed as YAML 1.2)."""
    if "=" not in item:
        raise ParamError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    value = yaml_load(raw, f"override '{item}': the value of '{key}'") if raw != "" else None
    nested: dict = {}
    _set(nested, key, value)
    return nested


def _named_yaml(directory: Path, name: str, what: str) -> dict:
    path = directory / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in directory.glob("*.yaml"))
        raise ParamError(f"unknown {what} '{name}' (known: {', '.join(known)})")
    return read_yaml(path)


def load_profile(name: str) -> dict:
    return _named_yaml(PROFILES_DIR, name, "profile")


def load_recipe(name: str) -> dict[str, Any]:
    """{dotted key: value} of a recipe."""
    return flatten(_named_yaml(RECIPES_DIR, name, "recipe"))


def recipe_keys() -> list[str]:
    """Keys the recipes control (the same in every recipe; tests check it)."""
    return sorted(load_recipe(RECIPES[0]))


def resolve_recipe(raw: dict) -> dict:
    """Fill every `recipe` value from the recipe the params name."""
    name = raw.get("recipe")
    if name not in RECIPES:
        raise ParamError(f"parameter 'recipe' must be one of {', '.join(RECIPES)}, got {name!r}")
    recipe = load_recipe(name)
    out = copy.deepcopy(raw)
    for key, value in flatten(raw).items():
        if value == FROM_RECIPE:
            if key not in recipe:
                raise ParamError(f"parameter '{key}' is '{FROM_RECIPE}', but no recipe sets it "
                                 f"(recipe keys: {', '.join(sorted(recipe))})")
            _set(out, key, recipe[key])
    return out


def load_params(
    path: str | Path = DEFAULT_PARAMS,
    overrides: Iterable[str] = (),
    profile: str | None = None,
) -> Params:
    """Read params, overlay a profile and `key=value` overrides, resolve the recipe, validate."""
    path = Path(path)
    if not path.exists():
        raise ParamError(f"parameter file not found: {path} (run from the project root or pass --params)")
    raw = read_yaml(path)
    if profile:
        raw = _deep_merge(raw, load_profile(profile))
    for item in overrides:
        raw = _deep_merge(raw, parse_override(item))
    return validate(resolve_recipe(raw))


# -- validation -----------------------------------------------------------------------------------
def _first_error(err: ValidationError) -> ParamError:
    errors = err.errors()
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # a typo explains a "missing"
    dotted = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return unknown_key(dotted)
    if e["type"] == "missing":
        return ParamError(f"missing parameter '{dotted}' (see configs/params.yaml for every key)")
    msg = e["msg"].removeprefix("Value error, ")
    if not dotted or msg.startswith("parameter '"):  # a check across keys names them itself
        return ParamError(msg)
    value = e.get("input")
    old = yaml11_number(value)
    hint = (f" (YAML 1.2 reads {value} as text, where YAML 1.1 read the number {old}: write the number "
            "in decimal)") if old is not None else ""
    return ParamError(f"parameter '{dotted}': {msg}, got {value!r}{hint}")


def validate(params: Mapping[str, Any]) -> Params:
    """The params after schema validation, typed; ParamError names the first bad key."""
    try:
        checked = Params.model_validate(params)
    except ValidationError as err:
        raise _first_error(err) from None
    return check_backbone(checked)


def as_dict(section: BaseModel) -> dict[str, Any]:
    """A section (or the params) as files record it and digests hash it: params.yaml's keys (`lambda`)."""
    return section.model_dump(by_alias=True, mode="json")


def updated(params: Params, values: Mapping[str, Any]) -> Params:
    """A copy with dotted keys set (`{"train.mfi.lambda": 0.5}`), validated as `--set` values are."""
    raw = as_dict(params)
    for key, value in values.items():
        nested: dict = {}
        _set(nested, key, value)
        raw = _deep_merge(raw, nested)
    return validate(raw)


# -- what a result says about itself ---------------------------------------------------------------
def recipe_summary(params: Params) -> dict[str, Any]:
    """The recipe, every recipe-controlled value that differs from the other recipe, and every
    recipe-controlled key that this run sets to something else than its own recipe."""
    name = params.recipe
    own = load_recipe(name)
    values = {key: get(as_dict(params), key) for key in sorted(own)}
    summary: dict[str, Any] = {"recipe": name}
    for other in RECIPES:
        if other != name:
            theirs = load_recipe(other)
            summary[f"differs_from_{other}"] = {k: {name: v, other: theirs[k]}
                                                for k, v in values.items() if v != theirs[k]}
    summary["overridden"] = {k: {"value": v, "recipe": own[k]} for k, v in values.items() if v != own[k]}
    return summary


def configure(path: str | Path, profile: str | None = None, recipe: str | None = None,
              overrides: Iterable[str] = ()) -> list[str]:
    """Write a profile's values (and a recipe name, and overrides) into a params file, keeping its
    comments, so `dvc repro` runs what `--profile` would. Returns the changed dotted keys.

    The file is read as every command reads it (yaml12: YAML 1.2, duplicate keys refused), the
    values are validated before anything is written, and the edited text (ruamel.yaml's round trip,
    YAML 1.2 as well) must read back as exactly the validated values, or nothing is written."""
    from ruamel.yaml import YAML

    path = Path(path).resolve()  # configs/params.yaml is a symlink to params.yaml: write the target
    changes: dict[str, Any] = {}
    if profile:
        changes.update(flatten(load_profile(profile)))
    if recipe:
        changes["recipe"] = recipe
    for item in overrides:
        changes.update(flatten(parse_override(item)))
    before = read_yaml(path)
    candidate = copy.deepcopy(before)
    for key, value in changes.items():
        try:
            get(candidate, key)
        except ParamError:
            raise unknown_key(key) from None
        _set(candidate, key, value)
    validate(resolve_recipe(candidate))  # refuse before writing anything
    rt = YAML()  # round trip, YAML 1.2 (ruamel.yaml's default for a file without a %YAML line)
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a line
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text())
    changed = []
    for key, value in changes.items():
        parent = doc
        for part in key.split(".")[:-1]:
            parent = parent[part]
        if not _same(get(before, key), value):
            parent[key.split(".")[-1]] = value
            changed.append(key)
    out = io.StringIO()
    rt.dump(doc, out)
    differ = [k for k, v in flatten(yaml_load(out.getvalue(), str(path))).items()
              if not _same(v, get(candidate, k))]
    if differ:  # a value ruamel.yaml would write in a form that reads back as something else
        raise ParamError(f"{path}: '{differ[0]}' would not read back as the value set; nothing written "
                         "(edit the file by hand)")
    atomic_write_text(path, out.getvalue())
    return changed


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types (1 is not 1.0 nor true): as JSON."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
