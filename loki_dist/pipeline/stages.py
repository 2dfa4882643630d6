"""The pipeline's YAML -> its stages: each stage's command line, checked before anything runs.

Config (unknown keys are refused):

    output_dir: runs/llama8b                 # attribution.safetensors, positions.json, train/ go here
    model: /models/Llama-3.1-8B-Instruct     # a Hugging Face directory
    nproc: 8                                 # ranks per node for attribute and train (default 1)
    launcher: slurm/srun_torchrun.sh         # optional command prefix that starts the ranks itself
    attribute: {data: cais/mmlu, data_config: all, ds_config: zero3_infer}
    select: {quota: 10}                      # rule: magnitude ranks by |score| (default signed)
    suppress: {quota: 1, which: lowest}      # optional: OUTPUT_DIR/suppressed, those rows zeroed
    train: {data: toolace.jsonl, epochs: 2, ds_config: zero3}

Stage sections hold that command's flags (`data_config: all` -> `--data-config all`; `true` -> a bare
flag) and may set their own `nproc`. `suppress`, the paper's suppression check, runs (as one process)
only when its section is there, after select. Every section is checked before the first stage starts,
with the stage's own command-line parser and the checks that need nothing from an earlier stage (data
files, the model directory, the numbers of `train`), so that a typo in `train:` is not found after
hours of attribution.

Also here: the inputs record beside each stage's output (OUTPUT.inputs.json: the stage's command line
and a fingerprint of every file or directory it names), which tells run.py whether a stage is current.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from loki_dist.core import checks
from loki_dist.core.errors import UserError, preview

STAGES = ("attribute", "select", "suppress", "train")
OPTIONAL_STAGES = {"suppress"}  # run only when the YAML has their section
TOP_LEVEL_KEYS = {"output_dir", "model", "nproc", "launcher", *STAGES}
# files up to this size are fingerprinted by content, larger ones by size and modification time
CONTENT_HASH_LIMIT = 64 * 2**20


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
    from loki_dist.core import yamlfile

    config = yamlfile.read(path, "--config")
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
            got = preview(nproc)
            raise UserError(f"--config {path}: `{where}nproc` must be a positive integer, got {got}")
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
            raise UserError(f"pipeline `{name}.{key}`: expected one value, got {preview(value)}")
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
    suppressed = out / "suppressed"
    fixed = {
        "attribute": ["--model", model, "--output", str(attribution)],
        "select": ["--attribution", str(attribution), "--output", str(positions), "--model", model],
        "suppress": ["--model", model, "--attribution", str(attribution), "--output", str(suppressed)],
        "train": ["--model", model, "--positions", str(positions), "--output-dir", str(run)],
    }
    for name, section in sections.items():
        clash = sorted({f for f in _flags(section, name) if f.startswith("--")} & set(fixed[name]))
        if clash:
            raise UserError(f"pipeline `{name}`: {clash} are set by the pipeline itself")
    stages = [
        Stage("attribute", ["attribute", *fixed["attribute"], *_flags(sections["attribute"])],
              attribution, attribution, "--output", nproc["attribute"], distributed=True,
              fresh_flags=("--overwrite",), resume_flags=("--resume", "--overwrite")),
        Stage("select", ["select", *fixed["select"], *_flags(sections["select"])],
              positions, positions, "--output", 1, distributed=False),
        Stage("suppress", ["suppress", *fixed["suppress"], *_flags(sections["suppress"])],
              suppressed, suppressed / "config.json", "--output", 1, distributed=False,
              fresh_flags=("--overwrite",), resume_flags=("--overwrite",)),  # nothing to resume: redone
        Stage("train", ["train", *fixed["train"], *_flags(sections["train"])],
              run, run / "final" / "implant.safetensors", "--output-dir", nproc["train"], distributed=True,
              fresh_flags=("--overwrite",)),
    ]  # fmt: skip
    return [stage for stage in stages if stage.name not in OPTIONAL_STAGES or stage.name in config]


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
    from loki_dist.core.flags import parse_quota
    from loki_dist.core.modeling import check_weights, load_tokenizer
    from loki_dist.implant import train
    from loki_dist.implant.data import chat_templates, sources
    from loki_dist.suppression import check_flags as check_suppress_flags

    with _section(path, "model"):
        spec = spec_from_dir(config["model"])
        check_weights(config["model"], safetensors_only=True, spec=spec)  # train exports from its shards
        load_tokenizer(config["model"])
    with _section(path, "output_dir"):
        checks.check_writable("output_dir", config["output_dir"], directory=True)
    parsed = {}
    for stage in stages:
        with _section(path, stage.name):
            parsed[stage.name] = _parse(stage)
    inputs = {"model": config["model"], "attribute.data": parsed["attribute"].data}
    with _section(path, "train"):
        train.check_flags(parsed["train"])  # --data or --dataset, before their files are named
        inputs.update({f"train {flag}": file for flag, file in sources.input_paths(parsed["train"]).items()})
    for stage in stages:
        with _section(path, stage.name):
            checks.refuse_output_over_inputs(stage.output_flag, stage.output, inputs)
    attribute_args, select_args, train_args = (parsed[name] for name in ("attribute", "select", "train"))
    with _section(path, "attribute"):
        if attribute_args.ds_config:
            dsconfig.load(attribute_args.ds_config)
    with _section(path, "select"):
        parse_quota(select_args.quota)
    if "suppress" in parsed:
        with _section(path, "suppress"):
            quota, which = check_suppress_flags(parsed["suppress"]), parsed["suppress"].which
            if not attribute_args.save_scores and (
                which == "highest" or (which == "lowest" and quota.denominator != 1)
            ):  # found now, not after attribution
                raise UserError(
                    f"--which {which} at quota {quota} reads the per-sample scores: set `save_scores: true` "
                    "under `attribute`"
                )
    with _section(path, "train"):
        dsconfig.load(train_args.ds_config)
        sources.read_conversations(train_args)  # every row readable, of a known form
        if train_args.chat_template:
            chat_templates.resolve(train_args.chat_template)


@contextlib.contextmanager
def _section(path: str, name: str):
    """Say which part of the YAML a check refused."""
    try:
        yield
    except UserError as err:
        raise UserError(f"--config {path}: `{name}`: {err}") from None


def fingerprint_path(path: Path) -> str:
    """A digest of a file or directory: content for small files, size and mtime for big ones.

    A model directory uses implant_file.fingerprint (its config, shard headers and the first bytes of
    every tensor), so a 70B base is identified in a few MB of reads rather than 140 GB.
    """
    from loki_dist.implant.artifacts.implant_file import fingerprint

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
