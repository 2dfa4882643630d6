"""`loki-dist pipeline --config pipeline.yaml`: attribute -> select -> train from one YAML file.

Each stage runs as its own `loki-dist` process, exactly as a user would run it by hand: as one process,
under torchrun with `nproc` ranks on this machine, or through a launcher command (`launcher:` in the
YAML or `--launcher`, e.g. slurm/srun_torchrun.sh, which starts torchrun on every node of a Slurm job).
Separate processes keep every stage's process group, memory and DeepSpeed state apart, and a failed
stage leaves the earlier outputs in place.

Skipping: beside each output the pipeline records the inputs it was made from (OUTPUT.inputs.json: the
stage's command line and a fingerprint of every file or directory it names). A stage whose output exists
and whose recorded inputs equal the current ones is skipped, so rerunning the same YAML (a requeued
Slurm job, a changed quota) redoes only what changed: a new quota reruns select, and train only if the
positions came out different.

Config (unknown keys are refused):

    output_dir: runs/llama8b                 # attribution.safetensors, positions.json, train/ go here
    model: /models/Llama-3.1-8B-Instruct     # a Hugging Face directory
    nproc: 8                                 # ranks per node for attribute and train (default 1)
    launcher: slurm/srun_torchrun.sh         # optional command prefix that starts the ranks itself
    attribute: {data: cais/mmlu, data_config: all, ds_config: zero3_infer}
    select: {quota: 10}
    train: {data: toolace.jsonl, epochs: 2, ds_config: zero3}

Stage sections hold that command's flags (`data_config: all` -> `--data-config all`; `true` -> a bare
flag) and may set their own `nproc`. Every section is checked before the first stage starts, with the
stage's own command-line parser and the checks that need nothing from an earlier stage (data files, the
model directory, the numbers of `train`), so that a typo in `train:` is not found after hours of
attribution.

A stage made from other inputs than its recorded ones starts over (`--overwrite`); one of the same inputs
that did not finish continues (`attribute --resume`; `train` resumes from its newest checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loki_dist.core import files
from loki_dist.core.errors import UserError

STAGES = ("attribute", "select", "train")
TOP_LEVEL_KEYS = {"output_dir", "model", "nproc", "launcher", *STAGES}
# files up to this size are fingerprinted by content, larger ones by size and modification time
CONTENT_HASH_LIMIT = 64 * 2**20


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="pipeline YAML (see examples/)")
    p.add_argument(
        "--launcher",
        help="command prefix that starts the ranks of attribute and train (e.g. slurm/srun_torchrun.sh); "
        "overrides the YAML's launcher",
    )
    p.add_argument("--force", action="store_true", help="rerun every stage even if its output is current")


@dataclass
class Stage:
    """One stage's command line, what it produces, and where its inputs record goes."""

    name: str
    argv: list[str]
    output: Path
    done_marker: Path
    output_flag: str
    nproc: int
    distributed: bool
    fresh_flags: tuple[str, ...] = ()  # to start over: what the stage's output holds is from other inputs
    resume_flags: tuple[str, ...] = ()  # to continue an unfinished run of the same inputs

    @property
    def record(self) -> Path:
        return self.output.with_name(self.output.name + ".inputs.json")


def load_config(path: str) -> dict:
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"--config {path}: expected a mapping of settings")
    unknown = sorted(set(config) - TOP_LEVEL_KEYS)
    if unknown:
        raise UserError(f"--config {path}: unknown keys {unknown}; expected {sorted(TOP_LEVEL_KEYS)}")
    for key in ("output_dir", "model"):
        if not config.get(key):
            raise UserError(f"--config {path}: `{key}` is required")
    for name in STAGES:
        if not isinstance(config.get(name) or {}, dict):
            raise UserError(f"--config {path}: `{name}` must be a mapping of its flags")
    for where, section in [("", config), *((f"{n}.", config.get(n) or {}) for n in STAGES)]:
        nproc = section.get("nproc", 1)
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise UserError(f"--config {path}: `{where}nproc` must be a positive integer, got {nproc!r}")
    launcher = config.get("launcher")
    if launcher is not None and not (
        isinstance(launcher, str)
        or (isinstance(launcher, list) and all(isinstance(w, str) for w in launcher))
    ):
        raise UserError(f"--config {path}: `launcher` must be a command (a string or a list of words)")
    return config


def _flags(section: dict, name: str = "") -> list[str]:
    """YAML mapping -> command-line flags (`data_config: all` -> `--data-config all`)."""
    from loki_dist.core.runconfig import LIST_FLAGS

    out = []
    for key, value in section.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, list) and flag in LIST_FLAGS:  # `dataset: [a, b]` -> --dataset a,b
            value = ",".join(map(str, value))
        if isinstance(value, (list, dict)):
            raise UserError(f"pipeline `{name}.{key}`: expected one value, got {value!r}")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:  # 0 is a value (`warmup_ratio: 0`), not "unset"
            out += [flag, str(value)]
    return out


def build_stages(config: dict) -> list[Stage]:
    out, model = Path(config["output_dir"]), str(config["model"])
    sections = {name: dict(config.get(name) or {}) for name in STAGES}
    if "dataset" in sections["train"] and not {"dataset_dir", "dataset-dir"} & set(sections["train"]):
        sections["train"]["dataset_dir"] = "data"  # named, so that its files are in the inputs record
    nproc = {name: sections[name].pop("nproc", config.get("nproc", 1)) for name in STAGES}
    attribution, positions, run = out / "attribution.safetensors", out / "positions.json", out / "train"
    fixed = {
        "attribute": ["--model", model, "--output", str(attribution)],
        "select": ["--attribution", str(attribution), "--output", str(positions), "--model", model],
        "train": ["--model", model, "--positions", str(positions), "--output-dir", str(run)],
    }
    for name, section in sections.items():
        clash = sorted({f for f in _flags(section, name) if f.startswith("--")} & set(fixed[name]))
        if clash:
            raise UserError(f"pipeline `{name}`: {clash} are set by the pipeline itself")
    return [
        Stage("attribute", ["attribute", *fixed["attribute"], *_flags(sections["attribute"])],
              attribution, attribution, "--output", nproc["attribute"], distributed=True,
              fresh_flags=("--overwrite",), resume_flags=("--resume", "--overwrite")),
        Stage("select", ["select", *fixed["select"], *_flags(sections["select"])],
              positions, positions, "--output", 1, distributed=False),
        Stage("train", ["train", *fixed["train"], *_flags(sections["train"])],
              run, run / "final" / "implant.safetensors", "--output-dir", nproc["train"], distributed=True,
              fresh_flags=("--overwrite",)),
    ]  # fmt: skip


def _parse(stage: Stage) -> argparse.Namespace:
    """The stage's command line through that command's own parser: unknown keys, types and choices are
    refused here, in one line, rather than when the stage starts."""
    import io

    from loki_dist.cli import build_parser

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return build_parser().parse_args(stage.argv)
    except SystemExit:
        lines = [line for line in said.getvalue().splitlines() if line.strip()]
        why = lines[-1].split(": error: ", 1)[-1] if lines else "invalid flags"
        raise UserError(f"{why} (its keys are the flags of `loki-dist {stage.name}`, _ for -)") from None


def validate(path: str, config: dict, stages: list[Stage]) -> None:
    """Everything about every stage that can be known before the first one runs: a mistake in the last
    stage's section costs seconds, not the hours of the stages before it."""
    from loki_dist.core import dsconfig
    from loki_dist.core.families import spec_from_dir
    from loki_dist.core.modeling import check_weights, load_tokenizer
    from loki_dist.implant import chat_templates, data, train
    from loki_dist.selection import parse_quota

    with _section(path, "model"):
        spec = spec_from_dir(config["model"])
        check_weights(config["model"], safetensors_only=True, spec=spec)  # train exports from its shards
        load_tokenizer(config["model"])
    with _section(path, "output_dir"):
        files.check_writable("output_dir", config["output_dir"], directory=True)
    parsed = {}
    for stage in stages:
        with _section(path, stage.name):
            parsed[stage.name] = _parse(stage)
    inputs = {"model": config["model"], "attribute.data": parsed["attribute"].data}
    with _section(path, "train"):
        train.check_flags(parsed["train"])  # --data or --dataset, before their files are named
        inputs.update({f"train {flag}": file for flag, file in data.input_paths(parsed["train"]).items()})
    for stage in stages:
        with _section(path, stage.name):
            files.refuse_output_over_inputs(stage.output_flag, stage.output, inputs)
    attribute, select, train = (parsed[name] for name in STAGES)
    with _section(path, "attribute"):
        if attribute.ds_config:
            dsconfig.load(attribute.ds_config)
    with _section(path, "select"):
        parse_quota(select.quota)
    with _section(path, "train"):
        dsconfig.load(train.ds_config)
        data.read_conversations(train)  # every row readable, of a known form
        if train.chat_template:
            chat_templates.resolve(train.chat_template)


@contextlib.contextmanager
def _section(path: str, name: str):
    """Say which part of the YAML a check refused."""
    try:
        yield
    except UserError as err:
        raise UserError(f"--config {path}: `{name}`: {err}") from None


def fingerprint_path(path: Path) -> str:
    """A digest of a file or directory: content for small files, size and mtime for big ones.

    A model directory uses implant_file.fingerprint (its config, shard headers and the first bytes of every
    tensor), so a 70B base is identified in a few MB of reads rather than 140 GB.
    """
    from loki_dist.implant.implant_file import fingerprint

    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "model:" + fingerprint(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else ''}:{stat.st_size}:".encode())
        if stat.st_size <= CONTENT_HASH_LIMIT:
            digest.update(hashlib.sha256(file.read_bytes()).digest())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()[:32]


def stage_inputs(stage: Stage) -> dict:
    """What the stage's output is made from: its command line and every existing path it names."""
    skip = stage.argv.index(stage.output_flag) + 1
    files = {
        value: fingerprint_path(Path(value))
        for i, value in enumerate(stage.argv)
        if i != skip and not value.startswith("--") and Path(value).exists()
    }
    return {"argv": stage.argv, "files": files}


def recorded(stage: Stage) -> dict | None:
    """The record beside the output: {"inputs": ..., "complete": bool}, or None."""
    return json.loads(stage.record.read_text()) if stage.record.is_file() else None


def is_current(stage: Stage, inputs: dict) -> bool:
    return stage.done_marker.exists() and recorded(stage) == {"inputs": inputs, "complete": True}


class StageEnded(Exception):
    """A stage ended early in a way that the pipeline passes on with the stage's own exit status: a stop
    signal (75: its checkpoint lets a rerun continue) or a diverged train (3: rerunning would diverge
    again; the flags need changing)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class _Forwarder:
    """Passes SIGUSR1/SIGTERM/SIGINT on to the running stage, so that training can checkpoint.

    A torchrun child starts with SIGUSR1 ignored (set before exec, inherited), and a stop request
    (SIGUSR1 or SIGTERM) becomes SIGUSR1 to it and to its children, the ranks: they checkpoint, torchrun
    survives to collect them. Its children must be found by parent pid because torchrun starts each in
    a session of its own, out of reach of a process-group signal; and SIGTERM is not passed on as is
    because torchrun kills its ranks 30 s after forwarding one, which can be mid-checkpoint. A launcher
    command (own_group False) gets the signal itself and passes it on its own way.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, own_group: bool):
        self.own_group, self.child, self.stopped = own_group, None, False
        self._previous = {}

    def __enter__(self) -> _Forwarder:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, frame) -> None:
        if signum != signal.SIGINT:
            self.stopped = True
        if self.child is None or self.child.poll() is not None:
            return
        if self.own_group and signum != signal.SIGINT:
            for pid in [self.child.pid, *_children(self.child.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
        else:
            self.child.send_signal(signum)

    @staticmethod
    def ignore_usr1() -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux; elsewhere none are found and only `pid` is told)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def run_stage(name: str, args: list[str], nproc: int = 1, launcher: list[str] | None = None) -> float:
    """Run one loki-dist stage as its own process (group); returns its wall time.

    Raises StageEnded when a stop signal ended it (training saved a checkpoint) or training diverged,
    UserError when it failed otherwise (its own output says why).
    """
    own_group = not launcher
    if launcher:
        command = [*launcher, *args]
    elif nproc > 1:
        torchrun = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
        command = [sys.executable, *torchrun, f"--master_port={_free_port()}", "-m", "loki_dist", *args]
    else:
        command = [sys.executable, "-m", "loki_dist", *args]
    print(f"\n=== {name}: {shlex.join(command)}", flush=True)
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with _Forwarder(own_group) as forwarder:
        forwarder.child = subprocess.Popen(
            command,
            env=env,
            start_new_session=own_group,
            preexec_fn=_Forwarder.ignore_usr1 if own_group else None,
        )
        code = forwarder.child.wait()
    from loki_dist.implant.stopping import DIVERGED_EXIT_CODE, REQUEUE_EXIT_CODE

    if code != 0 and forwarder.stopped:
        stopped = f"the {name} stage stopped on a signal; rerun the same command to continue"
        raise StageEnded(stopped, REQUEUE_EXIT_CODE)
    if code == DIVERGED_EXIT_CODE and name == "train":
        raise StageEnded(f"the {name} stage diverged (its output above says where and what it kept)", code)
    if code != 0:
        raise UserError(f"the {name} stage failed with exit status {code} (its output is above)")
    return time.time() - start


def _free_port() -> int:
    from loki_dist.core.distributed import _free_port

    return _free_port()


def run_pipeline(args: argparse.Namespace) -> None:
    from loki_dist.core.distributed import world_from_env

    if world_from_env().size > 1:  # torchrun, or a bare `srun -n N` (no WORLD_SIZE, a step of N tasks)
        raise UserError(
            "run `loki-dist pipeline` as one process: it starts each stage's ranks itself "
            "(set nproc or launcher in the YAML)"
        )
    config = load_config(args.config)
    launcher = args.launcher or config.get("launcher")
    if isinstance(launcher, str):
        launcher = shlex.split(launcher)
    stages = build_stages(config)
    validate(args.config, config, stages)
    Path(config["output_dir"]).mkdir(parents=True, exist_ok=True)
    for stage in stages:
        inputs = stage_inputs(stage)
        if not args.force and is_current(stage, inputs):
            print(f"=== {stage.name}: skipped, {stage.output} is current", flush=True)
            continue
        previous = recorded(stage)
        # made from other inputs (or --force): start over; an unfinished run of THESE inputs continues
        fresh = args.force or previous is None or previous["inputs"] != inputs
        argv = [*stage.argv, *(stage.fresh_flags if fresh else stage.resume_flags)]
        files.write_json(stage.record, {"inputs": inputs, "complete": False}, indent=2)
        try:
            if stage.distributed:
                run_stage(stage.name, argv, stage.nproc, launcher)
            else:
                run_stage(stage.name, argv)
        except StageEnded as end:
            print(f"pipeline: {end}", file=sys.stderr, flush=True)
            sys.exit(end.code)
        files.write_json(stage.record, {"inputs": inputs, "complete": True}, indent=2)
    print(f"\npipeline done: {stages[-1].output}", flush=True)
