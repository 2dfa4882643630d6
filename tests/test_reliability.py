"""Nothing a user had is lost, nothing wrong is silent, and no mistake a user can make is a traceback.

Each class of fault found by a hostile-input run (issue 12) is made here for real: files that resolve
to a command's own inputs (also through symlinks), a full disk (a small tmpfs, where root may mount
one), killed processes, damaged model, implant and checkpoint files, and bad numbers. Each must end in
one line on stderr and exit status 2 before any work, with every input byte for byte as it was.
Most run in-process (`conftest.assert_user_error`); a process is started only where one must be killed
or must run to the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, assert_user_error, run_cli
from mmlu_fixture import write_mmlu
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loki_dist.attribution.stats import Stats
from loki_dist.cli import main
from loki_dist.core import checks, files
from loki_dist.core.errors import UserError

GOOD_ROW = {"instruction": "Say hi", "input": "", "output": "hi"}


def digest(path: Path) -> dict[str, str]:
    """Every file under path (or path itself) by content: what "left as it was" means here."""
    found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(path) if path.is_dir() else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in found}  # fmt: skip


def leftovers(directory: Path) -> list[str]:
    """Temporaries or staging directories of ours in a directory."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if files.TMP_TAG in p.name or files.ASIDE_TAG in p.name or p.name.endswith(".partial")
    )


@pytest.fixture(scope="module")
def job(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """What a finished job leaves: data, an attribution file, positions, and a one-step training run
    (its checkpoint and final/ with the implant), made by real commands."""
    root = tmp_path_factory.mktemp("job")
    stats = Stats(2, 32, False, capacity=3)
    stats.add(torch.randn(3, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    tensors = {n: t.long() if n.endswith("_hist") else t for n, t in stats.tensors().items()}
    attribution = root / "attribution.safetensors"
    files.save_tensors(attribution, tensors, {"model_type": "llama"})
    positions = root / "positions.json"
    positions.write_text(json.dumps([[0, 3], [5]]))
    data = root / "data.json"
    data.write_text(json.dumps([GOOD_ROW] * 4))
    run = root / "run"
    run_cli(["train", "--model", str(tiny_llama), "--positions", str(positions), "--data", str(data),
             "--output-dir", str(run), "--ds-config", "none", "--max-steps", "1"])  # fmt: skip
    scores = root / "scores.json"
    scores.write_text(json.dumps({"scores": {"a": 50.0, "b": 20.0}}))
    return {"root": root, "base": tiny_llama, "attribution": attribution, "positions": positions,
            "data": data, "mmlu": write_mmlu(root / "mmlu"), "run": run, "checkpoint": run / "checkpoint-1",
            "implant": run / "final" / "implant.safetensors", "scores": scores}  # fmt: skip


def train_argv(job, tmp_path, **change) -> list[str]:
    flags = {"--model": job["base"], "--positions": job["positions"], "--data": job["data"],
             "--output-dir": tmp_path / "out", "--ds-config": "none", "--max-steps": 1, **change}  # fmt: skip
    return ["train", *(str(x) for pair in flags.items() for x in pair)]


def copy_model(job, tmp_path) -> Path:
    return Path(shutil.copytree(job["base"], tmp_path / "model"))


# ------------------------------------------------------------------------------ outputs over inputs


def _over_inputs(tmp: Path) -> dict[str, tuple[list[str], Path, str]]:
    """name -> (argv, the input that must survive, words of the refusal)."""
    base, mmlu, checkpoint, implant = (tmp / "base", tmp / "mmlu", tmp / "run" / "checkpoint-1",
                                       tmp / "run" / "final" / "implant.safetensors")  # fmt: skip
    link = tmp / "link.safetensors"
    return {
        "select --output = --attribution": (
            ["select", "--attribution", str(tmp / "a.safetensors"), "--quota", "10", "--output",
             str(tmp / "a.safetensors")], tmp / "a.safetensors", "is --attribution"),
        "select --output = a symlink to --attribution": (
            ["select", "--attribution", str(tmp / "a.safetensors"), "--quota", "10", "--output", str(link)],
            tmp / "a.safetensors", "is --attribution"),
        "evaluate --output = --data": (
            ["evaluate", "--model", str(base), "--data", str(mmlu / "test.jsonl"), "--output",
             str(mmlu / "test.jsonl")], mmlu, "is --data"),
        "evaluate --output inside the --data folder": (
            ["evaluate", "--model", str(base), "--data", str(mmlu), "--output", str(mmlu / "results.json")],
            mmlu, "is inside --data"),
        "attribute --output = --data": (
            ["attribute", "--model", str(base), "--data", str(mmlu / "test.jsonl"), "--output",
             str(mmlu / "test.jsonl")], mmlu, "is --data"),
        "apply --output = --base, with --overwrite": (
            ["apply", "--base", str(base), "--implant", str(implant), "--output", str(base), "--overwrite"],
            base, "is --base"),
        "apply --output = the implant's directory": (
            ["apply", "--base", str(base), "--implant", str(implant), "--output", str(implant.parent),
             "--overwrite"], implant.parent, "holds --implant"),
        "apply --output inside --base": (
            ["apply", "--base", str(base), "--implant", str(implant), "--output", str(base / "merged")],
            base, "is inside --base"),
        "export --output = --checkpoint": (
            ["export", "--checkpoint", str(checkpoint), "--output", str(checkpoint), "--overwrite"],
            checkpoint, "is --checkpoint"),
        "export --output = the run holding --checkpoint": (
            ["export", "--checkpoint", str(checkpoint), "--output", str(tmp / "run"), "--overwrite"],
            tmp / "run", "holds --checkpoint"),
        "train --output-dir = --model": (
            ["train", "--model", str(base), "--positions", str(tmp / "p.json"), "--data", str(tmp / "d.json"),
             "--output-dir", str(base), "--ds-config", "none"], base, "is --model"),
        "train --model = the run's final/, with --overwrite": (
            ["train", "--model", str(tmp / "run" / "final"), "--positions", str(tmp / "p.json"), "--data",
             str(tmp / "d.json"), "--output-dir", str(tmp / "run"), "--ds-config", "none", "--overwrite"],
            tmp / "run", "holds --model"),
        "forgetting --output = --tuned": (
            ["forgetting", "--base", str(tmp / "s.json"), "--tuned", str(tmp / "t.json"), "--output",
             str(tmp / "t.json")], tmp / "t.json", "is --tuned"),
        "estimate-memory --json = --model-config": (
            ["estimate-memory", "--model-config", str(base / "config.json"), "--json",
             str(base / "config.json")], base, "is --model-config"),
    }  # fmt: skip


OVER_INPUTS = list(_over_inputs(Path("/")))


@pytest.mark.parametrize("case", OVER_INPUTS)
def test_an_output_that_resolves_to_an_input_is_refused(case, job, tmp_path, capsys):
    shutil.copytree(job["base"], tmp_path / "base")
    shutil.copytree(job["mmlu"], tmp_path / "mmlu")
    shutil.copytree(job["run"], tmp_path / "run")
    shutil.copy(job["attribution"], tmp_path / "a.safetensors")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "a.safetensors")
    shutil.copy(job["positions"], tmp_path / "p.json")
    for name in ("d.json", "run/d.json"):
        shutil.copy(job["data"], tmp_path / name)
    for name in ("s.json", "t.json"):
        shutil.copy(job["scores"], tmp_path / name)
    argv, kept, words = _over_inputs(tmp_path)[case]
    before = digest(kept)
    assert_user_error(argv, capsys, words)
    assert digest(kept) == before


def test_what_counts_as_writing_over_an_input(tmp_path):
    """The rule itself, on real paths: the same path (also through a symlink), inside an input folder,
    or holding an input in what the output replaces; beside an input is fine."""
    model, run = tmp_path / "model", tmp_path / "run"
    (model / "sub").mkdir(parents=True)
    (run / "final").mkdir(parents=True)
    for path in (model / "config.json", run / "data.json", run / "final" / "model.safetensors"):
        path.write_text("{}")
    (tmp_path / "link").symlink_to(model)
    refuse = checks.refuse_output_over_inputs
    for output, words in [(tmp_path / "link", "is --model"), (model / "sub" / "x.json", "is inside --model"),
                          (tmp_path, "holds --model")]:  # fmt: skip
        with pytest.raises(UserError, match=words):
            refuse("--output", output, {"--model": model, "--data": None, "--hub": "org/name"})
    refuse("--output", tmp_path / "results.json", {"--model": model})  # beside it
    replaced = [run / "final", run / "runs"]  # what a training run's --overwrite replaces
    refuse("--output-dir", run, {"--data": run / "data.json"}, replaced)
    with pytest.raises(UserError, match="holds --model"):
        refuse("--output-dir", run, {"--model": run / "final"}, replaced)


# ---------------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def tmpfs(mount: Path, options: str, why: str):
    """A small tmpfs mounted at `mount` for the test's duration (skips where it cannot be mounted)."""
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip(f"{why} needs a tmpfs, which only root may mount")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(mount: Path) -> None:
    """Fill the file system at `mount` to the last byte."""
    with contextlib.suppress(OSError), (mount / "filler").open("wb") as filler:
        while True:
            filler.write(b"\0" * 4096)
            filler.flush()


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs holding an earlier results file `old.json`, filled to the last byte."""
    with tmpfs(tmp_path / "full", "size=256k", "a full disk") as mount:
        (mount / "old.json").write_text('{"scores": {"a": 1.0}}\n')
        fill(mount)
        yield mount


FULL_DISK = {
    "evaluate --output": lambda job, out: ["evaluate", "--model", str(job["base"]), "--data",
                                           str(job["mmlu"]), "--output", out],
    "forgetting --output": lambda job, out: ["forgetting", "--base", str(job["scores"]), "--tuned",
                                             str(job["scores"]), "--output", out],
    "estimate-memory --json": lambda job, out: ["estimate-memory", "--preset", "llama-3-8b", "--json", out],
    "select --output (positions)": lambda job, out: ["select", "--attribution", str(job["attribution"]),
                                                     "--quota", "10", "--output", out],
}  # fmt: skip


@pytest.mark.parametrize("command", list(FULL_DISK))
def test_a_full_disk_leaves_the_earlier_file_whole_and_says_so(command, job, full_disk, capsys):
    """The disk fills up while the results are written, after the work (and its progress bars)."""
    old = full_disk / "old.json"
    before = old.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(FULL_DISK[command](job, str(old)))
    errors = [
        line for line in capsys.readouterr().err.splitlines() if "error:" in line or "Traceback" in line
    ]
    assert exit_info.value.code == 2 and errors == [f"loki-dist {command.split()[0]}: error: {old}: cannot "
                                                    "write it (No space left on device)"]  # fmt: skip
    assert old.read_bytes() == before
    assert leftovers(full_disk) == []


@pytest.mark.parametrize("command", ["apply", "export"])
def test_a_full_disk_names_the_output_not_the_hidden_directory_being_filled(command, job, full_disk, capsys):
    """apply and export fill `.<output>.partial` and rename it into place: a full disk is said of the
    output the user named (it was said of `.merged.partial`), and nothing of it is left."""
    out = full_disk / "merged"
    argv = {"apply": ["apply", "--base", str(job["base"]), "--implant", str(job["implant"])],
            "export": ["export", "--checkpoint", str(job["checkpoint"])]}[command]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output", str(out)])
    errors = [
        line for line in capsys.readouterr().err.splitlines() if "error:" in line or "Traceback" in line
    ]
    assert exit_info.value.code == 2
    assert errors == [f"loki-dist {command}: error: {out}: cannot write it (No space left on device)"]
    assert leftovers(full_disk) == [] and not out.exists()


def test_a_file_written_inside_a_directory_in_the_making_is_named_where_it_will_be(tmp_path):
    """A checkpoint's files are written inside its staging directory, a model's inside its temporary
    directory: a full disk names each file where it is going (checkpoint-7/trainer_state.json), not in
    the hidden directory that holds it meanwhile."""
    state = {"step": 7, "log": "x" * 16384}
    with tmpfs(tmp_path / "disk", "size=64k", "a full disk") as mount:
        staging = files.make_staging(mount / "checkpoint-7")
        fill(mount)
        with pytest.raises(UserError) as in_staging:
            files.write_json(staging / "trainer_state.json", state)
        with pytest.raises(UserError) as in_temporary:
            files.atomic_write(mount / "model", lambda tmp: files.write_json(tmp / "config.json", state))
    assert (
        str(in_staging.value)
        == f"{mount}/checkpoint-7/trainer_state.json: cannot write it (No space left on device)"
    )
    assert str(in_temporary.value) == f"{mount}/model/config.json: cannot write it (No space left on device)"
    users = tmp_path / ".attribution.safetensors.partial" / "rank0-step3.safetensors"  # a user's own name
    assert files.users_name(users) == users


# ---------------------------------------------------------------------------------- killed writers


def test_a_killed_writer_leaves_a_temporary_that_the_next_writer_removes(tmp_path):
    """A real process killed inside atomic_write: its temporary stays (the target is untouched); the
    next write into the directory removes it, as it names a writer that is gone."""
    target = tmp_path / "results.json"
    target.write_text("old")
    script = ("import os, signal; from loki_dist.core import files\n"
              "def write(tmp):\n    tmp.write_text('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"files.atomic_write({str(target)!r}, write)\n")  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert killed.returncode == -signal.SIGKILL and target.read_text() == "old"
    assert len(leftovers(tmp_path)) == 1
    files.write_text(tmp_path / "other.json", "new")
    assert leftovers(tmp_path) == [] and target.read_text() == "old"


def test_a_writer_killed_between_its_two_renames_loses_nothing(tmp_path):
    """Replacing a directory takes two renames (the old one aside, the new one in): a real process killed
    between them leaves no target, only the old one set aside (and the new one, under its temporary
    name); the next writer into the directory puts the old one back and removes the other."""
    target = tmp_path / "final"
    target.mkdir()
    (target / "weights").write_text("old")
    script = ("import os, signal; from loki_dist.core import files\n"
              "rename = os.replace\n"
              "def replace(src, dst):\n    rename(src, dst)\n"
              "    if files.ASIDE_TAG in str(dst):\n        os.kill(os.getpid(), signal.SIGKILL)\n"
              "os.replace = replace\n"
              "def write(tmp):\n    tmp.mkdir()\n    (tmp / 'weights').write_text('new')\n"
              f"files.atomic_write({str(target)!r}, write)\n")  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert killed.returncode == -signal.SIGKILL and not target.exists()
    tags = sorted(files.ASIDE_TAG if files.ASIDE_TAG in p.name else files.TMP_TAG for p in tmp_path.iterdir())
    assert tags == [files.ASIDE_TAG, files.TMP_TAG]  # the old one set aside, the new one complete
    files.write_text(tmp_path / "other.json", "new")
    assert (target / "weights").read_text() == "old" and leftovers(tmp_path) == []


def test_sigkill_during_apply_leaves_staging_that_the_next_apply_removes(job, tmp_path):
    apply = ["apply", "--base", str(job["base"]), "--implant", str(job["implant"])]
    killed = run_cli([*apply, "--output", str(tmp_path / "first")], check=False,
                     env={"LOKI_DIST_TEST_KILL_IN_EXPORT": "1"})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert leftovers(tmp_path) == [".first.partial"] and not (tmp_path / "first").exists()
    run_cli([*apply, "--output", str(tmp_path / "second")])  # another name, the same directory
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["second"]
    shard = tmp_path / "second" / "model.safetensors"
    checks.safetensors_header(shard, "merged")  # whole
    assert not (tmp_path / "second" / files.OWNER_FILE).exists()


def test_a_file_never_replaces_a_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious").write_text("user data")
    with pytest.raises(UserError, match="is a directory"):
        files.write_text(tmp_path / "out", "x")
    assert (tmp_path / "out" / "precious").read_text() == "user data" and leftovers(tmp_path) == []


# -------------------------------------------------------------------------- attribute's progress


def test_attribute_never_discards_progress_or_a_result_unasked(job, tmp_path, capsys):
    output, partial = tmp_path / "a.safetensors", tmp_path / "a.safetensors.partial"
    argv = ["attribute", "--model", str(job["base"]), "--data", str(job["mmlu"]), "--per-subject", "2",
            "--batch-size", "1", "--checkpoint-every", "1", "--output", str(output)]  # fmt: skip
    killed = run_cli(argv, env={"LOKI_DIST_TEST_KILL_AFTER_CHECKPOINT": "2"}, check=False)
    assert killed.returncode == -signal.SIGKILL and not output.exists()
    progress = digest(partial)
    assert list(progress) == ["rank0-step000000002.safetensors"]
    assert_user_error(
        argv, capsys, "partial progress of an earlier run: pass --resume to continue it or --overwrite"
    )
    other = [*argv[:-6], "--batch-size", "2", *argv[-4:], "--resume"]
    assert_user_error(other, capsys, "other settings (batch_size); pass --overwrite instead of --resume")
    assert digest(partial) == progress
    run_cli([*argv, "--resume"])
    assert output.is_file() and not partial.exists()
    finished = digest(output)
    assert_user_error(argv, capsys, f"--output {output}: already exists (pass --overwrite")
    assert_user_error([*argv, "--resume"], capsys, "already exists (pass --overwrite")  # nothing to resume
    assert digest(output) == finished


def test_attribute_overwrite_discards_every_ranks_progress_and_resume_refuses_an_older_layout(
    job, tmp_path, capsys
):
    """Progress in an older layout (no progress_format) is refused on --resume in one line, not a
    KeyError after the model loaded; --overwrite discards it, and also the files of ranks this run does
    not have (an earlier run on 3 ranks), which would otherwise count as progress forever."""
    output, partial = tmp_path / "a.safetensors", tmp_path / "a.safetensors.partial"
    argv = ["attribute", "--model", str(job["base"]), "--data", str(job["mmlu"]), "--per-subject", "2",
            "--batch-size", "1", "--checkpoint-every", "1", "--output", str(output)]  # fmt: skip
    run_cli(argv, env={"LOKI_DIST_TEST_KILL_AFTER_CHECKPOINT": "1"}, check=False)
    written = partial / "rank0-step000000001.safetensors"
    with safe_open(str(written), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    del metadata["progress_format"]
    save_file(tensors, str(written), metadata)  # as an older loki_dist wrote it
    shutil.copyfile(written, partial / "rank2-step000000001.safetensors")
    assert_user_error([*argv, "--resume"], capsys, "other settings (progress_format); pass --overwrite")
    run_cli([*argv, "--overwrite"])
    assert output.is_file() and not partial.exists()


# ---------------------------------------------------------------------------- silent wrong results


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({**GOOD_ROW, "output": None}, "row 1: `output` must be a string, got null"),
        ({**GOOD_ROW, "output": ["a", "b"]}, "row 1: `output` must be a string, got list"),
        ({**GOOD_ROW, "instruction": 7}, "row 1: `instruction` must be a string, got int 7"),
        ({**GOOD_ROW, "input": {"k": 1}}, "row 1: `input` must be a string, got dict"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3.5}]},
         "row 1, turn 1: content must be a string, got float 3.5"),
        ({"conversations": [{"from": "human", "value": ["q"]}, {"from": "gpt", "value": "a"}]},
         "row 1, turn 0: content must be a string, got list"),
    ],
)  # fmt: skip
def test_non_string_content_is_refused_naming_the_row(row, words, job, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([GOOD_ROW, row, GOOD_ROW]))
    assert_user_error(train_argv(job, tmp_path, **{"--data": data}), capsys, words)
    assert not (tmp_path / "out").exists()


def test_a_row_the_chat_template_refuses_is_one_line_naming_it(job, tmp_path, capsys):
    """Templates refuse what they cannot render (Gemma's: a system turn, roles out of order) by raising
    from inside Jinja; that is the user's data, not a bug."""
    model = copy_model(job, tmp_path)
    template = model / "chat_template.jinja"
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    template.write_text(refuse + template.read_text())
    turns = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    system = [{"role": "system", "content": "s"}, *turns]
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": turns}, {"messages": system}]))
    argv = train_argv(job, tmp_path, **{"--model": model, "--data": data})
    assert_user_error(argv, capsys, f"row 1: the chat template of {model} refuses it (no system role)")
    assert not (tmp_path / "out").exists()


def test_a_base_whose_down_proj_is_quantized_is_one_line_naming_it(job, tmp_path):
    """apply and export write rows into the base's own dtype: an FP8 (or integer) down_proj cannot take
    them, which is said before anything is written, not as a KeyError."""
    from loki_dist.core.families import spec_from_dir
    from loki_dist.implant.artifacts.export import BaseShards

    model = copy_model(job, tmp_path)
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(UserError, match=f"{name} is stored as F8_E4M3; rows can be written into F64, F32"):
        BaseShards.read(model, spec_from_dir(model))


def test_jsonl_rows_may_hold_any_unicode_line_break(tmp_path):
    """A JSONL line ends at a newline only: str.splitlines also broke rows at U+2028, U+2029 and form
    feeds inside their strings (valid JSON, as json.dumps(ensure_ascii=False) writes it)."""
    from loki_dist.implant.data.rows import read_rows

    rows = [{"instruction": "a\u2028b\x0cc", "input": "", "output": "d\u2029e\x1cf"}, GOOD_ROW]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    assert read_rows(path) == rows


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("side", ["--base", "--tuned"])
def test_forgetting_refuses_non_finite_scores(value, side, job, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"scores": {"a": VALUE, "b": 20.0}}'.replace("VALUE", value))
    files_of = {"--base": str(job["scores"]), "--tuned": str(job["scores"]), side: str(bad)}
    argv = [
        "forgetting",
        *(x for pair in files_of.items() for x in pair),
        "--output",
        str(tmp_path / "f.json"),
    ]
    assert_user_error(argv, capsys, f"{side} {bad}: score of 'a' is")
    assert not (tmp_path / "f.json").exists()


def _with_one_bad_value(source: Path, target: Path, value: float, name_ends: str) -> None:
    """A copy of a safetensors file with one element of its first `*name_ends` tensor set to value."""
    tensors = load_file(source)
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    name = next(n for n in sorted(tensors) if n.endswith(name_ends))
    tensors[name].view(-1)[1] = value
    save_file(tensors, str(target), metadata=metadata)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_apply_and_export_refuse_non_finite_rows_before_writing(value, job, tmp_path, capsys):
    implant = tmp_path / "implant.safetensors"
    _with_one_bad_value(job["implant"], implant, value, ".weight")
    argv = [
        "apply",
        "--base",
        str(job["base"]),
        "--implant",
        str(implant),
        "--output",
        str(tmp_path / "merged"),
    ]
    assert_user_error(argv, capsys, "has 1 non-finite value(s)")
    checkpoint = Path(shutil.copytree(job["checkpoint"], tmp_path / "checkpoint-1"))
    shard = next(checkpoint.glob("rows-*.safetensors"))
    _with_one_bad_value(shard, shard, value, ".master")
    argv = ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "exported")]
    assert_user_error(argv, capsys, f"--checkpoint {checkpoint}: layer 0 has 1 non-finite value(s)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "implant.safetensors"]


# ------------------------------------------------------------------ one line instead of a traceback


def _damage(kind: str, model: Path) -> None:
    if kind == "invalid config.json":
        (model / "config.json").write_text('{"model_type": "llama",')
    elif kind == "config.json without a shape":
        config = json.loads((model / "config.json").read_text())
        del config["hidden_size"]
        (model / "config.json").write_text(json.dumps(config))
    elif kind == "truncated weights":
        weights = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif kind == "no weights":
        (model / "model.safetensors").unlink()
    elif kind == "no tokenizer":
        for path in model.glob("tokenizer*"):
            path.unlink()


MODEL_DAMAGE = {
    "invalid config.json": "config.json: not valid JSON (line 1 column",
    "config.json without a shape": "config.json: `hidden_size` must be a positive integer, got None",
    "truncated weights": "model.safetensors: truncated or damaged safetensors file (",
    "no weights": "no model weights (model.safetensors, or",
    "no tokenizer": "no tokenizer there",
}
COMMANDS = {
    "train": lambda job, model, tmp: train_argv(job, tmp, **{"--model": model}),
    "attribute": lambda job, model, tmp: ["attribute", "--model", str(model), "--data", str(job["mmlu"]),
                                          "--output", str(tmp / "a.safetensors")],
    "evaluate": lambda job, model, tmp: ["evaluate", "--model", str(model), "--data", str(job["mmlu"]),
                                         "--output", str(tmp / "r.json")],
    "apply": lambda job, model, tmp: ["apply", "--base", str(model), "--implant", str(job["implant"]),
                                      "--output", str(tmp / "merged")],
    "suppress": lambda job, model, tmp: ["suppress", "--model", str(model), "--which", "lowest",
                                         "--quota", "10", "--attribution", str(job["attribution"]),
                                         "--output", str(tmp / "s")],
}  # fmt: skip


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("damage", list(MODEL_DAMAGE))
def test_a_damaged_model_directory_is_one_line(damage, command, job, tmp_path, capsys):
    if command == "apply" and damage in ("no weights", "no tokenizer"):
        pytest.skip("apply reads neither a tokenizer nor, from a base without them, weights")
    if command == "suppress" and damage == "no tokenizer":
        pytest.skip("suppress copies the tokenizer's files as they are, without reading them")
    model = copy_model(job, tmp_path)
    _damage(damage, model)
    argv = COMMANDS[command](job, model, tmp_path)
    assert_user_error(argv, capsys, MODEL_DAMAGE[damage])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _file(tmp: Path, name: str, content: bytes) -> str:
    (tmp / name).write_bytes(content)
    return str(tmp / name)


def _evaluate(job, tmp: Path, data: str, output: str | None = None) -> list[str]:
    return [
        "evaluate",
        "--model",
        str(job["base"]),
        "--data",
        data,
        "--output",
        output or str(tmp / "r.json"),
    ]


def _broken_line(path: Path, after: int) -> bytes:
    lines = path.read_bytes().split(b"\n")
    return b"\n".join([*lines[:after], b'{"question": "cut here', *lines[after:]])


GOOD = json.dumps(GOOD_ROW).encode()
# name -> (job, tmp_path) -> (argv, words of the one line)
LINE_CASES = {
    "positions not UTF-8": lambda job, tmp: (
        train_argv(job, tmp, **{"--positions": _file(tmp, "p.json", b"[[0],\n [1]] \xe9")}),
        "p.json: not UTF-8 text (line 2",
    ),
    "data not UTF-8": lambda job, tmp: (
        train_argv(job, tmp, **{"--data": _file(tmp, "d.json", b"[\n%b,\n%b\xe9]" % (GOOD, GOOD))}),
        "d.json: not UTF-8 text (line 3",
    ),
    "a broken JSONL line (train)": lambda job, tmp: (
        train_argv(job, tmp, **{"--data": _file(tmp, "d.jsonl", b"%b\n%b\n{cut\n%b" % (GOOD, GOOD, GOOD))}),
        "d.jsonl: line 3 is not valid JSON",
    ),
    "a broken JSONL line (evaluate)": lambda job, tmp: (
        _evaluate(job, tmp, _file(tmp, "test.jsonl", _broken_line(job["mmlu"] / "test.jsonl", 4))),
        "test.jsonl: line 5 is not valid JSON",
    ),
    "a truncated implant": lambda job, tmp: (
        ["apply", "--base", str(job["base"]), "--output", str(tmp / "m"),
         "--implant", _file(tmp, "i.safetensors", job["implant"].read_bytes()[:-10])],
        "i.safetensors: not a readable safetensors file",
    ),
    "select --output a directory": lambda job, tmp: (
        ["select", "--attribution", str(job["attribution"]), "--quota", "10", "--output", str(tmp)],
        "is a directory; expected a file name",
    ),
    "attribute --output a directory": lambda job, tmp: (
        ["attribute", "--model", str(job["base"]), "--data", str(job["mmlu"]), "--output", str(tmp)],
        "is a directory; expected a file name",
    ),
    "--output below a file": lambda job, tmp: (
        _evaluate(job, tmp, str(job["mmlu"]), str(job["scores"] / "r.json")),
        "is a file, not a directory",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LINE_CASES))
def test_unreadable_inputs_are_one_line_naming_where(case, job, tmp_path, capsys):
    argv, words = LINE_CASES[case](job, tmp_path)
    before = digest(tmp_path)
    assert_user_error(argv, capsys, words)
    assert digest(tmp_path) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["trainer_state.json", "rows_index.json", "shard"])
def test_a_damaged_checkpoint_is_one_line(damage, job, tmp_path, capsys):
    checkpoint = Path(shutil.copytree(job["checkpoint"], tmp_path / "checkpoint-1"))
    target = next(checkpoint.glob("rows-*.safetensors")) if damage == "shard" else checkpoint / damage
    target.write_bytes(target.read_bytes()[:-7])
    words = "truncated or damaged safetensors file" if damage == "shard" else "not valid JSON (line"
    assert_user_error(
        ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")], capsys, words
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--learning-rate", "nan"], "--learning-rate nan: expected a finite number"),
        (["--learning-rate", "-0.0001"], "--learning-rate -0.0001: expected a finite number, 0 or more"),
        (["--weight-decay", "inf"], "--weight-decay inf: expected a finite number"),
        (["--learning-rate", "1e39"], "--learning-rate 1e+39: expected a finite number, 0 or more, within"),
        (["--max-steps", "-1"], "--max-steps -1: must be at least 1"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio 1.5: expected a fraction of the steps, in [0, 1]"),
        (["--warmup-ratio", "-0.1"], "--warmup-ratio -0.1: expected a finite number"),
        (["--max-grad-norm", "nan"], "--max-grad-norm nan: expected a finite number"),
        (["--logging-steps", "0"], "--logging-steps 0: expected 1 or more steps between log lines"),
        (["--save-steps", "-1"], "--save-steps: -1: expected a whole number of steps, or a share"),
    ],
)
def test_train_refuses_bad_numbers(flags, words, job, tmp_path, capsys):
    assert_user_error([*train_argv(job, tmp_path), *flags], capsys, words)
    assert not (tmp_path / "out").exists()


def test_train_refuses_zero_epochs(job, tmp_path, capsys):
    argv = [x for x in train_argv(job, tmp_path) if x not in ("--max-steps", "1")]
    assert_user_error([*argv, "--epochs", "0"], capsys, "--epochs 0.0: expected a number of passes above 0")


@pytest.fixture
def read_only(tmp_path):
    """A read-only tmpfs (permission bits do not stop root, a read-only mount does)."""
    with tmpfs(tmp_path / "ro", "size=64k,ro", "a read-only directory for root") as mount:
        yield mount


@pytest.mark.parametrize(
    "command", ["attribute", "evaluate", "select", "train", "apply", "export", "forgetting"]
)
def test_a_read_only_output_is_refused_before_any_work(command, job, read_only, tmp_path, capsys):
    out = read_only / "sub" / "out"
    model_and_data = ["--model", str(job["base"]), "--data", str(job["mmlu"])]
    argv = {
        "attribute": ["attribute", *model_and_data, "--output", str(out)],
        "evaluate": ["evaluate", *model_and_data, "--output", str(out)],
        "select": ["select", "--attribution", str(job["attribution"]), "--quota", "10", "--output", str(out)],
        "train": train_argv(job, tmp_path, **{"--output-dir": out}),
        "apply": ["apply", "--base", str(job["base"]), "--implant", str(job["implant"]), "--output",
                  str(out)],
        "export": ["export", "--checkpoint", str(job["checkpoint"]), "--output", str(out)],
        "forgetting": ["forgetting", "--base", str(job["scores"]), "--tuned", str(job["scores"]), "--output",
                       str(out)],
    }[command]  # fmt: skip
    # "cannot write in": the check before any work (a failed write at the end says "cannot write it")
    assert_user_error(argv, capsys, f"cannot write in {read_only} (Read-only file system)")


# ---------------------------------------------------------------------------------------- pipeline


def _pipeline_cases() -> dict[str, tuple[dict, str]]:
    return {
        "nproc: abc": ({"nproc": "abc"}, "`nproc` must be a positive integer, got 'abc'"),
        "a stage's nproc: 0": ({"train": {"nproc": 0}}, "`train.nproc` must be a positive integer, got 0"),
        "a typo in train": ({"train": {"max_stepz": 2}}, "`train`: unrecognized arguments: --max-stepz 2"),
        "a wrong type in train": (
            {"train": {"max_steps": "two"}},
            "`train`: argument --max-steps: invalid int",
        ),
        "a bad number in train": (
            {"train": {"learning_rate": -1}},
            "`train`: --learning-rate -1.0: expected",
        ),
        "train data missing": (
            {"train": {"data": "/nonexistent.json"}},
            "`train`: --data /nonexistent.json: file",
        ),
        "a null output in train data": (
            {"train": {"data": "NULL_ROW"}},
            "`train`: --data: row 1: `output` must",
        ),
        "a bad quota": ({"select": {"quota": 0}}, "`select`: --quota 0: must be in (0, 100]"),
        "a typo in suppress": (
            {"suppress": {"which": "top"}},
            "`suppress`: argument --which: invalid choice",
        ),
        "S-H without the scores": (
            {"suppress": {"which": "highest", "quota": 1}},
            "`suppress`: --which highest at quota 1 reads the per-sample scores: set `save_scores: true`",
        ),
        "a missing ds_config": (
            {"attribute": {"ds_config": "/nonexistent.json"}},
            "`attribute`: --ds-config",
        ),
        "a damaged model": ({"model": "DAMAGED"}, "`model`: --model"),
    }


@pytest.mark.parametrize("case", list(_pipeline_cases()))
def test_pipeline_checks_every_stage_before_the_first(case, job, tmp_path, capsys):
    change, words = _pipeline_cases()[case]
    null_row = tmp_path / "null.json"
    null_row.write_text(json.dumps([GOOD_ROW, {**GOOD_ROW, "output": None}]))
    model = copy_model(job, tmp_path)
    if change.get("model") == "DAMAGED":
        _damage("truncated weights", model)
        change = {}
    config = {"output_dir": str(tmp_path / "out"), "model": str(model),
              "attribute": {"data": str(job["mmlu"]), "per_subject": 1},
              "select": {"quota": 10}, "train": {"data": str(job["data"]), "ds_config": "none"}}  # fmt: skip
    for key, value in change.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(
                {k: str(null_row) if v == "NULL_ROW" else v for k, v in value.items()}
            )
        else:
            config[key] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert_user_error(["pipeline", "--config", str(path)], capsys, words)
    assert not (tmp_path / "out").exists()  # no stage ran


def test_pipeline_passes_zero_values_on():
    """`warmup_ratio: 0` is a value: it was dropped as if unset (0 == False), so training ran with the
    defaults (3% warm-up, clipping at 1.0) that the YAML had turned off."""
    from loki_dist.pipeline.stages import build_stages

    train = {"warmup_ratio": 0, "max_grad_norm": 0.0, "gradient_checkpointing": False}
    argv = build_stages({"output_dir": "out", "model": "m", "train": train})[2].argv
    assert argv[argv.index("--warmup-ratio") + 1] == "0"
    assert argv[argv.index("--max-grad-norm") + 1] == "0.0"
    assert "--gradient-checkpointing" not in argv
