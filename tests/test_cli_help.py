"""Every command's --help as an 80-column terminal shows it: option names whole, no line past 80
columns, help text printed as written, every choice of an option listed."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from llmexport.cli import app


def _commands(group, path: tuple[str, ...] = ()):
    """(command path, click command) for every command, subcommands included."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer's own click classes)
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = dict(_commands(typer.main.get_command(app)))


def _help(*path: str) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_option_name_is_whole_at_80_columns(path):
    text = _help(*path)
    command = COMMANDS[path]
    params = command.get_params(command.context_class(command))  # --help included
    names = [n for p in params for n in (*p.opts, *p.secondary_opts) if n.startswith("-")]
    cut = [n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)]
    assert cut == [], f"{' '.join(path)} --help at 80 columns lacks {cut}:\n{text}"
    assert max(map(len, text.splitlines())) <= 80, text


def test_the_command_list_is_not_cut_at_80_columns():
    text = _help()
    listed = text[text.index("Commands:"):]
    for path in COMMANDS:
        assert f"  {path[0]} " in listed
    assert "..." not in listed, listed  # click shortens a first sentence that does not fit


def test_help_text_is_printed_as_written():
    assert "pip install -e '.[serve]'" in " ".join(_help("serve").split())  # not eaten as markup


@pytest.mark.parametrize("path, option, choices", [
    (("onnx",), "--target", ("ort", "portable", "tensorrt")),
    (("onnx",), "--dtype", ("float32", "float16", "bfloat16")),
    (("onnx",), "--quant", ("none", "int8", "int4")),
    (("onnx",), "--quant-head", ("int8", "int4")),
    (("bench",), "--target", ("ort", "portable", "tensorrt")),
    (("bench",), "--dtype", ("float32", "float16", "bfloat16")),
    (("generate",), "--backend", ("onnxruntime", "torch")),
    (("doctor",), "--device", ("cpu", "cuda")),
])
def test_every_choice_is_listed(path, option, choices):
    from llmexport.exporter.targets import TARGETS

    if option == "--target":
        assert set(choices) == set(TARGETS)  # the list below is the library's
    text = " ".join(_help(*path).split())
    entry = text[text.index(f" {option} "):]
    entry = entry[:entry.index(" --", 3)]  # up to the next option
    assert all(re.search(rf"\b{c}\b", entry) for c in choices), entry
