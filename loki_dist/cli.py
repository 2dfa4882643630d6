"""`loki-dist` / `python -m loki_dist`: one sub-command per stage.

Each stage module owns its command line through two functions per command, `add_<command>_arguments` and
`run_<command>`; this file only routes to them, after turning a `--config FILE.yaml` into the flags it
holds (runconfig.py; every command but `pipeline`, which reads its own YAML). Only the command that
runs has its module imported (build_parser(only=)), and stage modules keep their heavy imports (torch,
DeepSpeed, transformers) inside functions, so that `--help`, a mistake refused before any work and the
commands that need no model (`forgetting`) start in a second or two, not the tens of seconds those
imports take on a loaded machine (tests/test_startup.py counts what they import). A
UserError becomes one line on stderr and exit status 2, with no traceback. With several ranks: one found
by a command's checks is agreed by every rank (`distributed.agreement`) and printed by rank 0, once when
all ranks found it, else one line per distinct message naming its ranks; one raised later, when peers
may be busy in another collective, is printed by the rank that found it, prefixed with that rank. A
collective that broke off (a peer died or stayed silent past the timeout: distributed.CollectiveFailed)
is one line naming the stage, exit status 1. Every way out (success, user error, crash, Ctrl-C, the exit
statuses 75 and 3 of a stopped or diverged training) leaves the process group: with a barrier only on
success. Under a launch/ wrapper each rank also reports its exit status (STATUS_DIR_ENV) for the wrapper
to pass on, since the launchers themselves exit with 1 for any failed worker.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback
from typing import NoReturn

from loki_dist import __version__
from loki_dist.core import allocator, distributed, exits, files, runconfig
from loki_dist.core.errors import RankErrors, UserError

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "attribute": (
        "loki_dist.attribution.attribute",
        "score every down_proj row on general-knowledge prompts (KVA)",
    ),
    "select": ("loki_dist.selection.select", "choose the rows to train from an attribution file"),
    "train": ("loki_dist.implant.train", "implant: train only the selected down_proj rows"),
    "export": (
        "loki_dist.implant.artifacts.export",
        "turn a training checkpoint into a Hugging Face model and an implant",
    ),
    "apply": ("loki_dist.implant.artifacts.apply", "merge an implant file into its base model"),
    "suppress": ("loki_dist.suppression", "copy a model with its most (least) important rows zeroed"),
    "evaluate": (
        "loki_dist.evaluation.evaluate",
        "multiple-choice accuracy (MMLU layout) or perplexity, data-parallel",
    ),
    "forgetting": (
        "loki_dist.evaluation.forgetting",
        "the paper's forgetting score of tuned models against the base",
    ),
    "chat": (
        "loki_dist.evaluation.chat",
        "talk to a model through its chat template, greedily (before, after apply)",
    ),
    "pipeline": (
        "loki_dist.pipeline.run",
        "attribute -> select -> train from one YAML file, skipping current stages",
    ),
    "estimate-memory": (
        "loki_dist.planning.estimate_memory",
        "per-GPU memory of LoKI, full fine-tuning and LoRA for a model, cluster size and ZeRO stage",
    ),
    "estimate-time": (
        "loki_dist.planning.estimate_time",
        "each stage's wall time (load, attribution, training, checkpoint, export) on a described cluster",
    ),
    "demo": (
        "loki_dist.demo.demo",
        "the whole job offline, on SmolLM2-135M when installed or a built-in tiny model",
    ),
}


class OneLineErrors(argparse.ArgumentParser):
    """argparse's own mistakes (a required flag missing, a bad choice or number, an unknown flag) said as
    every other mistake is: one line, `loki-dist COMMAND: error: ...`, exit status 2, without the usage
    that argparse prints first (tens of lines for `train`; `--help` prints it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.splitlines())}\n")


class HelpWithDefaults(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or _no_default(action):
            return text
        if "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _no_default(action: argparse.Action) -> bool:
    """None, a switch that is off, or suppressed (by identity: a default of 0 is a default to show)."""
    return action.default is None or action.default is False or action.default == argparse.SUPPRESS


def _show_defaults(command: argparse.ArgumentParser) -> None:
    """argparse prints nothing after a flag without help: those with a default get one that shows it."""
    for action in command._actions:
        if action.help is None and action.option_strings and not _no_default(action):
            action.help = "(default: %(default)s)"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with `only`, the other commands are listed (for `--help` and argparse's
    choices) but their modules are not imported (see the top)."""
    parser = OneLineErrors(prog="loki-dist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"loki_dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpWithDefaults
        )
        if only is not None and name != only:
            continue
        module = importlib.import_module(module_name)
        function_name = name.replace("-", "_")
        getattr(module, f"add_{function_name}_arguments")(command)
        if name not in runconfig.OWN_YAML:
            runconfig.add_config_argument(command)
        _show_defaults(command)
        command.set_defaults(_run=getattr(module, f"run_{function_name}"))
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    allocator.return_freed_memory()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = runconfig.command_of(argv) or "loki-dist"
    parser = build_parser(only=command)
    if command in COMMANDS:  # the top level says what the command's parser left over: the command's flags
        parser.prog = f"loki-dist {command}"
    try:
        # commands name their own stages inside, where they have them
        with exits.as_interrupt(), distributed.stage(command):
            args = parser.parse_args(_with_config(parser, argv))
            exits.running()
            args._run(args)
    except UserError as err:
        rank, size = _rank_and_size()
        for line in _error_lines(err, rank, size):
            print(f"loki-dist {command}: error: {line}", file=sys.stderr, flush=True)
        agreed = isinstance(err, RankErrors)
        if agreed:  # every rank is here: none exits (and has its launcher stop the rest) before the line
            distributed.agreement_barrier()
        _leave(keep_status=agreed and size > 1)
        _exit(1 if agreed and err.crashed else 2)
    except distributed.CollectiveFailed as err:  # a peer died or went silent: its own log says why
        rank, size = _rank_and_size()
        print(f"loki-dist {command}: error: {_error_lines(err, rank, size)[0]}", file=sys.stderr)
        _leave()
        _exit(1)
    except KeyboardInterrupt:
        _leave()
        _exit(exits.INTERRUPTED)
    except SystemExit as stop:  # 75: training stopped on a signal, every rank after the same checkpoint
        _leave(keep_status=_rank_and_size()[1] > 1)
        _exit(stop.code)
    except Exception:
        traceback.print_exc()  # before leaving: a launcher may stop this process once a peer has exited
        sys.stderr.flush()
        _leave()
        _exit(1)
    distributed.shutdown()
    if _rank_and_size()[1] > 1:
        _exit(0)


def _with_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with its --config file's settings as flags (runconfig.expand). With several ranks every rank
    reads the file and they agree on what they found, as a command's checks do: a mistake in the file is
    said once, and no rank exits (and has its launcher stop the others) before it is said."""
    world = distributed.world_from_env()
    if world.size == 1 or not runconfig.names_config(argv):
        return runconfig.expand(parser, argv)
    with distributed.agreement(world):
        return runconfig.expand(parser, argv)


def _exit(code: int | str | None) -> NoReturn:
    """sys.exit(code), except that one rank of several, and any process after a Ctrl-C, skips the
    interpreter's finalization (exits.exit_now, after its exit handlers and a flush). DeepSpeed keeps its
    process groups alive past destroy_process_group, and a gloo worker thread still releasing its last
    collective's tensors when finalization starts is killed inside a destructor: std::terminate, SIGABRT
    at exit (1 in ~15 two-rank ZeRO-3 runs, measured); after a Ctrl-C, finalization may end the process
    with signal 2 instead of 130 (exits.py). Every file loki_dist writes is complete and fsynced before
    this point (files.py)."""
    _report_status(code)
    if _rank_and_size()[1] == 1 and code != exits.INTERRUPTED:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    exits.exit_now(code if isinstance(code, int) else 0 if code is None else 1)


STATUS_DIR_ENV = "LOKI_DIST_STATUS_DIR"


def _report_status(code: int | str | None) -> None:
    """Tell a launch/ wrapper this rank's exit status (STATUS_DIR_ENV/rank<r>), so that it can exit with
    the status the ranks agreed on (75, 3, 2) where the launcher itself says 1 for any failed worker."""
    directory = os.environ.get(STATUS_DIR_ENV)
    if directory and os.path.isdir(directory):
        status = code if isinstance(code, int) else 0 if code is None else 1
        files.write_text(os.path.join(directory, f"rank{_rank_and_size()[0]}"), f"{status}\n")


def _leave(keep_status: bool = False) -> None:
    """Leave the process group on a way out that is not success: without a barrier (peers may be gone).

    keep_status: every rank is leaving at once and quickly (an agreed error, a stop after a checkpoint).
    The launcher stops the others as soon as one has exited (torchrun: SIGTERM); ignoring that signal
    lets this rank finish leaving and exit with its own status, instead of -15 half-way. Elsewhere
    leaving may hang on a broken collective, and the signal must still end the process.
    """
    if keep_status:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    distributed.shutdown(wait_for_peers=False)


def _rank_and_size() -> tuple[int, int]:
    world = distributed.joined_world() if distributed.in_group() else distributed.world_or_one()
    return world.rank, world.size


def _error_lines(err: Exception, rank: int, size: int) -> list[str]:
    """What this rank prints: an agreed error on rank 0 only, any other with this rank."""
    if isinstance(err, RankErrors):
        return err.lines() if rank == 0 else []
    return [f"rank {rank}: {err}" if size > 1 else str(err)]
