"""`--config FILE.yaml` for every command but `pipeline` (which has a YAML of its own).

A run of many flags is easier to keep, diff and share as a file. The file's keys are the command's flag
names (`learning_rate` or `learning-rate`); the file becomes flags placed before the command line's own,
so one parser reads both and a flag given on the command line overrides the file (argparse keeps the
last value). Each key is checked against the command's own flags first, so an unknown key, a value of
the wrong type or outside a flag's choices is one line naming the key and what is expected. A switch
takes true or false; a flag that takes a comma-separated list also takes a YAML list; a repeatable flag
(`chat --prompt`) takes a list of its values. A switch set in the file cannot be switched off on the
command line (there is no --no-X): leave it out of the file for that.

`loki-dist train --config` also reads a LLaMA-Factory training YAML (the LoKI reference trains with
`llamafactory-cli train toolace.yaml`): its keys are translated where they have a loki_dist meaning
(llamafactory.py), and each key that has none is named on one line, with why, and the run goes on.
"""

from __future__ import annotations

import argparse
import sys

from loki_dist.core.errors import UserError, preview, shown

CONFIG_FLAG = "--config"
OWN_YAML = {"pipeline"}  # commands whose --config is their own format
# flags that take comma-separated values: a YAML list is joined with commas
LIST_FLAGS = {"--dataset", "--eval-dataset", "--mix-ratios", "--subjects"}


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        CONFIG_FLAG,
        metavar="FILE.yaml",
        help="read flags from a YAML file (keys: the flag names, _ or -); the command line overrides them",
    )


def command_of(argv: list[str]) -> str | None:
    """The sub-command's name: the first word that is not an option (the top level has no valued ones)."""
    return next((word for word in argv if not word.startswith("-")), None)


def names_config(argv: list[str]) -> bool:
    """Whether argv gives --config (to a command that reads it as flags)."""
    return command_of(argv) not in OWN_YAML and any(
        word == CONFIG_FLAG or word.startswith(CONFIG_FLAG + "=") for word in argv
    )


def expand(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with its --config file turned into flags put right after the command, before its own."""
    command = command_of(argv)
    commands = _commands(parser)
    if command not in commands or command in OWN_YAML:
        return argv
    at = argv.index(command) + 1
    path, rest = _take_config(argv[at:])
    if path is None:
        return argv
    settings = load(path)
    if command == "train":
        from loki_dist.implant.data import llamafactory

        settings, notes = llamafactory.translate(settings, path)
        _say(command, notes)
    return [*argv[:at], *to_flags(commands[command], command, settings, path), *rest]


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices) if found else {}


def _take_config(words: list[str]) -> tuple[str | None, list[str]]:
    """(the --config value, the other words); --config given twice or without a value is an error."""
    path, rest, i = None, [], 0
    while i < len(words):
        word = words[i]
        if word == CONFIG_FLAG or word.startswith(CONFIG_FLAG + "="):
            if path is not None:
                raise UserError(f"{CONFIG_FLAG} given twice ({path} and more); give one file")
            if "=" in word:
                path = word.split("=", 1)[1]
            elif i + 1 < len(words):
                path, i = words[i + 1], i + 1
            else:
                raise UserError(f"{CONFIG_FLAG}: expected a YAML file after it")
        else:
            rest.append(word)
        i += 1
    return path, rest


def load(path: str) -> dict:
    """The YAML file as a mapping of settings (read by yamlfile: aliases, nesting and repeated keys
    bounded, `1e-4` a number)."""
    from loki_dist.core import yamlfile

    settings = yamlfile.read(path, CONFIG_FLAG)
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise UserError(f"{CONFIG_FLAG} {path}: expected a mapping of flag names to values")
    return {str(key): value for key, value in settings.items()}


def to_flags(command: argparse.ArgumentParser, name: str, settings: dict, path: str) -> list[str]:
    """The settings as command-line words, every key and value checked against the command's flags."""
    flags = _flag_actions(command)
    seen: dict[str, str] = {}
    words: list[str] = []
    for key, value in settings.items():
        action = flags.get(key)
        if action is None:
            raise UserError(
                f"{CONFIG_FLAG} {path}: unknown key `{key}` for `loki-dist {name}` (its keys are the flags "
                f"of `loki-dist {name} --help`, with _ or -)"
            )
        flag = _long(action)
        if flag in seen:
            raise UserError(f"{CONFIG_FLAG} {path}: `{seen[flag]}` and `{key}` both set {flag}; keep one")
        seen[flag] = key
        words += _words(action, flag, value, f"{CONFIG_FLAG} {path}: `{key}`")
    return words


def _flag_actions(command: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each settable flag under both spellings of its name (without the dashes, - or _)."""
    flags = {}
    for action in command._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        for option in action.option_strings:
            if option.startswith("--") and option != CONFIG_FLAG:
                bare = option[2:]
                flags[bare] = flags[bare.replace("-", "_")] = action
    return flags


def _long(action: argparse.Action) -> str:
    return next(option for option in action.option_strings if option.startswith("--"))


def _words(action: argparse.Action, flag: str, value: object, where: str) -> list[str]:
    """One setting as words: `--flag=value` (a value that starts with '-' stays a value)."""
    if value is None:  # `key:` with nothing after it leaves the flag at its default
        return []
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false (a switch), got {shown(value)}")
        return [flag] if value else []
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        scalars = [_scalar(action, item, where) for item in values]
        if action.nargs in ("+", "*"):
            return [flag, *scalars]
        return [f"{flag}={item}" for item in scalars]
    if isinstance(value, list) and flag in LIST_FLAGS:
        return [f"{flag}={','.join(_scalar(action, item, where, choices=False) for item in value)}"]
    return [f"{flag}={_scalar(action, value, where)}"]


def _scalar(action: argparse.Action, value: object, where: str, choices: bool = True) -> str:
    """One value as the flag's text, or a UserError naming the type or choices the flag expects."""
    if isinstance(value, (list, dict)):
        raise UserError(f"{where}: expected one value, got {shown(value)}")
    if action.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where}: expected an integer, got {shown(value)}")
    if action.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f"{where}: expected a number, got {shown(value)}")
    if isinstance(value, bool):
        raise UserError(f"{where}: expected a value, not {shown(value)} (only switches take true/false)")
    if choices and action.choices is not None and value not in action.choices:
        raise UserError(f"{where}: {preview(value)} is not one of {', '.join(map(str, action.choices))}")
    text = repr(value) if isinstance(value, float) else str(value)
    if action.type not in (None, int, float, str):  # a flag's own reader (flags.steps_or_share): its words
        try:
            action.type(text)
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise UserError(f"{where}: {err}") from None
    return text


def _say(command: str, notes: list[str]) -> None:
    """The lines about ignored keys, once per job (rank 0)."""
    from loki_dist.core.distributed import world_from_env

    if notes and world_from_env().is_main:
        for note in notes:
            print(f"loki-dist {command}: {note}", file=sys.stderr, flush=True)
