"""The command line stops at the command (issue 26): a command reads its flags once into one frozen
settings dataclass whose fields are its flags, each saying what it means, and no module below the command
module is handed the argparse namespace, so what a module depends on is written in its signature."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import re
import sys

import pytest
from mmlu_fixture import write_mmlu

from loki_dist.cli import COMMANDS, build_parser, main
from loki_dist.planning.memory import PRESETS

WITH_SETTINGS = ("attribute", "evaluate")


def _flat(settings) -> dict:
    """The settings' values by field name, a nested group's fields in its place."""
    values = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        values.update(_flat(value) if dataclasses.is_dataclass(value) else {field.name: value})
    return values


@pytest.mark.parametrize("command", WITH_SETTINGS)
def test_settings_are_every_flag_once_frozen_and_documented(command):
    args = build_parser(only=command).parse_args([command, "--model", "m", "--data", "d", "--output", "o"])
    settings = importlib.import_module(COMMANDS[command][0]).read_settings(args)
    flags = {name: value for name, value in vars(args).items() if name not in ("command", "_run", "config")}
    assert _flat(settings) == flags  # no flag left out, no field without its flag
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.model = "elsewhere"
    groups = [settings, *(getattr(settings, f.name) for f in dataclasses.fields(settings))]
    for cls in {type(group) for group in groups if dataclasses.is_dataclass(group)}:
        source = inspect.getsource(cls)
        for field in dataclasses.fields(cls):
            assert re.search(rf"^    {field.name}: .+  # \S", source, re.M), f"{cls.__name__}.{field.name}"


class NamespaceTrips:
    """Every function of loki_dist called with an argparse.Namespace argument, outside the modules that
    may hold one (the parsing cli.py and the command's own module): a profile hook on the real run."""

    def __init__(self, command_module: str):
        self.allowed = {"loki_dist.cli", command_module}
        self.found: set[str] = set()

    def __call__(self, frame, event, _arg) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("loki_dist") or module in self.allowed:
            return
        code = frame.f_code
        for name in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
            if isinstance(frame.f_locals.get(name), argparse.Namespace):
                self.found.add(f"{module}.{code.co_qualname}({name})")

    def run(self, argv: list[str]) -> set[str]:
        sys.setprofile(self)
        try:
            main(argv)
        finally:
            sys.setprofile(None)
        return self.found


def test_no_module_below_the_command_is_handed_the_namespace(tmp_path, tiny_llama, capsys):
    mmlu = write_mmlu(tmp_path / "mmlu")
    retention = tmp_path / "retention"
    retention.mkdir()
    (retention / "facts.jsonl").write_text(
        json.dumps({"prompt": "Two plus two is", "answer": " four"}) + "\n"
    )
    (retention / "prose.jsonl").write_text(json.dumps({"text": "Water is wet. " * 4}) + "\n")
    model = ["--model", str(tiny_llama)]
    runs = {
        "attribute": ["attribute", *model, "--data", str(mmlu), "--output", str(tmp_path / "a.safetensors")],
        "evaluate": ["evaluate", *model, "--data", str(mmlu), "--output", str(tmp_path / "mc.json")],
        "evaluate --task retention": ["evaluate", *model, "--task", "retention", "--data", str(retention),
                                      "--output", str(tmp_path / "r.json")],
        "select": ["select", "--attribution", str(tmp_path / "a.safetensors"), "--quota", "10",
                   "--output", str(tmp_path / "positions.json")],
        "suppress": ["suppress", *model, "--attribution", str(tmp_path / "a.safetensors"), "--quota", "10",
                     "--which", "lowest", "--output", str(tmp_path / "suppressed")],
        "forgetting": ["forgetting", "--base", str(tmp_path / "mc.json"),
                       "--tuned", str(tmp_path / "mc.json")],
        "estimate-time": ["estimate-time", "--preset", sorted(PRESETS)[0]],
    }  # fmt: skip
    trips = {run: NamespaceTrips(COMMANDS[argv[0]][0]).run(argv) for run, argv in runs.items()}
    assert trips == {run: set() for run in runs}
    capsys.readouterr()
