"""Parameter files, profiles, recipes and `--set` values are read under YAML 1.2's core schema
(`1:30`, `0b11`, `1_000` are strings, `1e-3` a number), and a key written twice in one mapping is
refused naming the file and the line; `pipeline configure` writes back what it validated."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pipeline.cli.app import main
from pipeline.config import params as params_module
from pipeline.config.params import ParamError, configure, load_params, parse_override

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "configs" / "params.yaml"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line(result: Result, *names: str) -> str:
    """Exit 1 through click, one error line and no traceback, each name in it."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    for name in names:
        assert name in errors[0], (name, result.output)
    return errors[0]


def params_copy(tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text() if text is None else text)
    return path


@pytest.mark.parametrize("value, yaml11", [("1:30", 90), ("0b11", 3), ("1_000", 1000)])
def test_yaml_1_1_integers_are_strings_refused_for_an_integer_key(tmp_path: Path, value: str,
                                                                  yaml11: int) -> None:
    """`--set train.epochs=1:30` was 90 (base 60); `pipeline configure` wrote 90 into the file."""
    path = params_copy(tmp_path)
    line = one_line(cli("configure", "--params", str(path), "--set", f"train.epochs={value}"),
                    "train.epochs", repr(value), str(yaml11))
    assert "valid integer" in line
    assert path.read_text() == PARAMS.read_text()  # nothing written
    one_line(cli("train", "--params", str(path), "--set", f"train.epochs={value}"), "train.epochs")
    with pytest.raises(ParamError, match=r"train\.epochs"):  # the same number in the file
        load_params(params_copy(tmp_path, PARAMS.read_text().replace("  epochs: 50", f"  epochs: {value}")))


def test_yaml_1_2_numbers_and_strings_in_set_values() -> None:
    assert parse_override("train.lr=1e-3") == {"train": {"lr": 1e-3}}
    assert parse_override("paths.data=1:30") == {"paths": {"data": "1:30"}}
    assert parse_override("paths.data=2024-01-01") == {"paths": {"data": "2024-01-01"}}  # not a date
    assert parse_override("paths.data=yes") == {"paths": {"data": "yes"}}  # not a boolean
    assert parse_override("train.seed=0o17") == {"train": {"seed": 15}}


def test_configure_writes_back_the_validated_value(tmp_path: Path) -> None:
    path = params_copy(tmp_path)
    result = cli("configure", "--params", str(path), "--set", "paths.data=1:30", "--set", "train.lr=1e-3")
    assert result.exit_code == 0, result.output
    p = load_params(path)
    assert (p.paths.data, p.train.lr) == ("1:30", 1e-3)  # as validated, not 90
    assert "  data: 1:30" in path.read_text()
    assert configure(path, overrides=["paths.data=1:30"]) == []  # already so


DUPLICATED = "train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n"  # lines 2 and 4


def test_duplicate_key_in_the_params_file_is_refused_with_its_line(tmp_path: Path) -> None:
    text = PARAMS.read_text().replace("  lr: 0.002", "  lr: 0.002\n  lr: 0.5", 1)
    line_no = text.splitlines().index("  lr: 0.5") + 1
    path = params_copy(tmp_path, text)
    line = one_line(cli("train", "--params", str(path)), str(path), f"line {line_no}", "'lr'",
                    "appears twice")
    assert "keep one" in line
    one_line(cli("configure", "--params", str(path), "--set", "train.epochs=3"), str(path),
             f"line {line_no}")  # was ruamel.yaml's DuplicateKeyError traceback
    assert path.read_text() == text


@pytest.mark.parametrize("kind", ["profile", "recipe"])
def test_duplicate_key_in_a_profile_or_recipe_is_refused_with_its_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    folder = tmp_path / kind
    folder.mkdir()
    source = params_module.PROFILES_DIR / "smoke.yaml" if kind == "profile" else \
        params_module.RECIPES_DIR / "authors.yaml"
    (folder / source.name).write_text(source.read_text() + DUPLICATED.replace("train:", "extra:"))
    for other in source.parent.glob("*.yaml"):
        if other != source:
            (folder / other.name).write_text(other.read_text())
    monkeypatch.setattr(params_module, "PROFILES_DIR" if kind == "profile" else "RECIPES_DIR", folder)
    first = len(source.read_text().splitlines())
    args = ["--profile", "smoke"] if kind == "profile" else []
    one_line(cli("train", "--params", str(PARAMS), *args), str(folder / source.name),
             f"line {first + 4}", "'lr'", f"first on line {first + 2}")


@pytest.mark.parametrize("value", ['{"lr": 0.1, "lr": 0.2}', "{lr: 0.1, epochs: 2, lr: 0.2}"])
def test_duplicate_key_in_a_set_value_is_refused(value: str) -> None:
    one_line(cli("train", "--params", str(PARAMS), "--set", f"train={value}"), "train=", "'lr'",
             "appears twice")
