"""The README tells the truth: its Python blocks run (with the tiny random CLIP and the session's
smoke projectors substituted for the named pretrained weights and files) and every `pipeline ...`
line of its shell blocks parses against the real command (options and arguments exist)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from segment_world import world  # noqa: F401  (session fixture)

from pipeline.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def pipeline_commands() -> list[list[str]]:
    """Each `pipeline ...` command of the bash blocks, as argv after `pipeline`."""
    commands = []
    for block in blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"<[^>]*>", "X", line.split(" #")[0])  # placeholders like <sha256 ...>
            for part in line.split("&&"):
                argv = shlex.split(part.strip())
                if argv[:1] == ["pipeline"]:
                    commands.append(argv[1:])
    return commands


def test_readme_lists_pipeline_commands() -> None:
    names = {argv[0] for argv in pipeline_commands()}
    assert {"demo", "extract-features", "train", "evaluate", "configure"} <= names


@pytest.mark.parametrize("argv", pipeline_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_cli_example_parses(argv: list[str]) -> None:
    command = main.get_command(click.Context(main), argv[0])
    assert command is not None, f"README names `pipeline {argv[0]}`, which does not exist"
    command.make_context(argv[0], list(argv[1:]))  # raises click.UsageError on an unknown option
    assert command.get_help(click.Context(command, info_name=argv[0]))


def test_readme_python_blocks_run(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The README's blocks with only the weights and file names substituted."""
    first, api = blocks("python")
    side = 128  # tiny-RN: 4x4 tokens
    first = first.replace('load_backbone("RN101", pretrained="openai")',
                          'load_backbone("tiny-RN", pretrained=None)')
    first = first.replace("448, 448", f"{side}, {side}")
    assert "tiny-RN" in first and f"{side}, {side}" in first  # the README still reads this way
    scope: dict = {}
    exec(compile(first, "README.md", "exec"), scope)  # noqa: S102
    assert scope["tokens"].shape == (2, 1 + (side // 32) ** 2, scope["clip"].embed_dim)
    assert scope["scores"].shape == (2, 3) and bool(scope["loss"].isfinite())

    monkeypatch.chdir(tmp_path)
    api = api.replace('"cache/models/projectors-best.pt"', repr(str(world["recorded"])))  # with its record
    api = api.replace('["a.jpg"]', repr([str(world["files"][0])]))
    assert str(world["recorded"]) in api
    scope = {}
    exec(compile(api, "README.md", "exec"), scope)  # noqa: S102
    result = scope["result"]
    assert result.label_maps[0].ndim == 2 and result.score_maps[0].shape[0] == 3
    assert result.image_scores.shape == (1, 3)
