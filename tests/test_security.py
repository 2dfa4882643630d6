"""Nothing a file hands loki_dist runs code: checkpoints, model weights, a model's own code, templates.

Each hostile file here, if it ran, would create a marker file (a pickle's __reduce__ calling os.system, a
module shipped with a model that touches it on import, a template reaching for Python's globals); every
test asserts that the marker never appears, beside what the command says and does instead. A resume is a
real `loki-dist train` process, as on a cluster where someone else can write into the output directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, loki_dist_traceback, run_cli
from mmlu_fixture import write_mmlu
from safetensors.torch import save_file

from loki_dist.cli import main
from loki_dist.implant.artifacts import checkpoint, rngstate

POSITIONS = [[0, 3, 5], [1, 2]]


class _RunsCode:
    """Pickled, this unpickles to os.system(command): what an attacker plants."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def crafted_pickle(path: Path, marker: Path) -> Path:
    """A torch.save file (a zip, as torch writes) whose unpickling would create `marker`."""
    torch.save({"python": _RunsCode(f"touch {marker}"), "torch": torch.get_rng_state()}, path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("security")
    positions = root / "positions.json"
    positions.write_text(json.dumps(POSITIONS))
    data = root / "data.jsonl"
    rows = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}"}
            for a in range(6) for b in range(4)]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return {"root": root, "base": tiny_llama, "positions": positions, "data": data,
            "mmlu": write_mmlu(root / "mmlu")}  # fmt: skip


def train_args(inputs, out: Path) -> list[str]:
    return ["train", "--model", str(inputs["base"]), "--positions", str(inputs["positions"]),
            "--data", str(inputs["data"]), "--output-dir", str(out), "--ds-config", "none",
            "--max-steps", "3", "--save-steps", "1", "--save-total-limit", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(inputs) -> Path:
    """3 steps in one process, a checkpoint after each: what a resume must reproduce."""
    out = inputs["root"] / "uninterrupted"
    run_cli(train_args(inputs, out))
    return out


def unfinished_run(uninterrupted: Path, out: Path, steps: tuple[int, ...]) -> Path:
    """An output directory holding the uninterrupted run's checkpoints `steps` and no final/."""
    for step in steps:
        shutil.copytree(uninterrupted / f"checkpoint-{step}", out / f"checkpoint-{step}")
    return out


# -------------------------------------------------------------------------------------- checkpoints


def test_a_pickle_planted_in_a_checkpoint_runs_nothing_and_the_resume_falls_back(
    inputs, uninterrupted, tmp_path
):
    """A crafted rng_state_0.pt in the newest checkpoint of an unfinished run; a plain rerun (--resume
    auto) must skip that checkpoint with a warning naming the file, resume from the older one to the
    same bits as the uninterrupted run, and never run the pickle."""
    out = unfinished_run(uninterrupted, tmp_path / "out", (1, 2))
    for planted in (out / "checkpoint-2").glob("rng_state_0.*"):
        planted.unlink()
    marker = tmp_path / "code-ran"
    crafted_pickle(out / "checkpoint-2" / "rng_state_0.pt", marker)
    proc = run_cli(train_args(inputs, out), check=False)
    assert not marker.exists(), "the planted pickle ran"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not loki_dist_traceback(proc.stderr), proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("loki-dist train: warning: ")]
    assert len(warnings) == 1, proc.stderr
    assert f"skipping damaged {out / 'checkpoint-2'} (rng_state_0.pt is not an RNG state" in warnings[0]
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in proc.stdout
    for name in ("model.safetensors", "implant.safetensors"):
        assert (out / "final" / name).read_bytes() == (uninterrupted / "final" / name).read_bytes(), name


def _legacy(state: dict, path: Path) -> None:
    torch.save(state, path)


def _genuine_legacy() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _ours_with(path: Path, **change) -> None:
    """An RNG file as loki_dist writes it, with tensors or metadata changed (None: left out)."""
    version, words, gauss = random.getstate()
    tensors = {"python": torch.tensor(words, dtype=torch.int64), "torch": torch.get_rng_state()}
    metadata = {"format": rngstate.FORMAT, "python_version": str(version), "python_gauss_next": "null"}
    for key, value in change.items():
        target = metadata if key in metadata else tensors
        if value is None:
            target.pop(key)
        else:
            target[key] = value
    save_file(tensors, str(path), metadata=metadata)


# what is planted as rank 0's RNG file (its name) -> words of damage()'s reason
NOT_OURS = {
    "a crafted pickle": ("pt", lambda p, m: crafted_pickle(p, m), "is not an RNG state of loki_dist"),
    "a pickle under our name": (
        "safetensors", lambda p, m: crafted_pickle(p, m), "truncated or damaged safetensors file"),
    "a list": ("pt", lambda p, m: _legacy([1, 2, 3], p), "does not hold the dict of RNG states"),
    "a dict of other types": (
        "pt", lambda p, m: _legacy({"python": "seed", "torch": torch.zeros(5056, dtype=torch.uint8)}, p),
        "its Python RNG state is not what random.getstate() gives"),
    "a torch state of another size": (
        "pt", lambda p, m: _legacy({**_genuine_legacy(), "torch": torch.zeros(10, dtype=torch.uint8)}, p),
        "does not hold an RNG state that can be restored"),
    "a legacy file cut short": (
        "pt", lambda p, m: (_legacy(_genuine_legacy(), p), p.write_bytes(p.read_bytes()[:4000])),
        "is not an RNG state of loki_dist: not a file of tensors (RuntimeError)"),
    "ours cut short": (
        "safetensors", lambda p, m: (_ours_with(p), p.write_bytes(p.read_bytes()[:-100])),
        "truncated or damaged safetensors file"),
    "ours without the format": ("safetensors", lambda p, m: _ours_with(p, format="x"), "has format 'x'"),
    "ours with 32-bit words out of range": (
        "safetensors", lambda p, m: _ours_with(p, python=torch.full((625,), 2**40, dtype=torch.int64)),
        "its Python RNG state is not what random.getstate() gives"),
    "ours with float words": (
        "safetensors", lambda p, m: _ours_with(p, python=torch.zeros(625)), "expected int64 [625]"),
    "ours without the torch state": (
        "safetensors", lambda p, m: _ours_with(p, torch=None), "expected python, torch"),
    "too large to be ours": (
        "safetensors", lambda p, m: _ours_with(p, cuda=torch.zeros(1 << 17, dtype=torch.uint8)),
        "bytes, not an RNG state of loki_dist"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(NOT_OURS))
def test_an_rng_file_that_is_not_what_we_wrote_is_damage(case, uninterrupted, tmp_path, capsys):
    """damage() reads each RNG file as data and checks it holds what `train` writes: anything else makes
    the checkpoint damaged (so `--resume auto` skips it, and naming it is refused), and runs nothing."""
    suffix, plant, words = NOT_OURS[case]
    path = tmp_path / "checkpoint-1"
    shutil.copytree(uninterrupted / "checkpoint-1", path)
    for ours in path.glob("rng_state_0.*"):
        ours.unlink()
    marker = tmp_path / "code-ran"
    plant(path / f"rng_state_0.{suffix}", marker)
    why = checkpoint.damage(path)
    assert why is not None and why.startswith(f"rng_state_0.{suffix}") and words in why, why
    assert not marker.exists()


def test_an_rng_file_of_a_rank_the_run_did_not_have_is_checked_too(uninterrupted, tmp_path):
    """A resume on more ranks reads rank r's file wherever it is: one planted beside the run's own is
    damage as well, and so is a trainer state whose world size does not say which files to expect."""
    path = Path(shutil.copytree(uninterrupted / "checkpoint-1", tmp_path / "checkpoint-1"))
    marker = tmp_path / "code-ran"
    crafted_pickle(path / "rng_state_5.pt", marker)
    assert checkpoint.damage(path).startswith("rng_state_5.pt is not an RNG state of loki_dist")
    (path / "rng_state_5.pt").unlink()
    state = json.loads((path / checkpoint.STATE_FILE).read_text())
    (path / checkpoint.STATE_FILE).write_text(json.dumps({**state, "world_size": 0}))
    assert checkpoint.damage(path) == "trainer_state.json holds no world size"
    assert checkpoint.damage(path, rng=False) is None  # export reads no RNG file
    assert not marker.exists()


def test_rng_state_round_trips_and_a_0_1_checkpoints_pt_still_reads(tmp_path):
    """What a checkpoint stores restores the generators exactly; loki_dist 0.1's rng_state_<r>.pt (a
    dict of random.getstate() and torch's state) still reads, through the weights_only unpickler."""
    random.seed(7)
    torch.manual_seed(7)
    random.random()
    expected = (random.getstate(), torch.get_rng_state())
    rngstate.save(tmp_path, 0, rngstate.capture())
    _legacy({"python": expected[0], "torch": expected[1]}, tmp_path / "rng_state_1.pt")
    for rank in (0, 1):
        random.seed(99)
        torch.manual_seed(99)
        rngstate.restore(rngstate.read(rngstate.find(tmp_path, rank)))
        assert random.getstate() == expected[0] and torch.equal(torch.get_rng_state(), expected[1]), rank


def test_under_a_torch_without_a_safe_unpickler_no_pickle_is_read(uninterrupted, inputs, tmp_path, capsys):
    """torch < 2.6 had a way around its weights_only unpickler (CVE-2025-32434): there a 0.1 checkpoint's
    rng_state_<r>.pt is not read (the checkpoint still resumes, with fresh generators and a warning) and
    a .bin model is refused, naming the file. Played by setting torch's version string."""
    path = Path(shutil.copytree(uninterrupted / "checkpoint-1", tmp_path / "checkpoint-1"))
    (path / "rng_state_0.safetensors").unlink()
    _legacy(_genuine_legacy(), path / "rng_state_0.pt")
    model, marker = bin_model(inputs, tmp_path, "crafted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "__version__", "2.5.1")
        with pytest.raises(rngstate.LegacyNotRead, match="torch 2.5.1 cannot read a pickle safely"):
            rngstate.read(path / "rng_state_0.pt")
        assert checkpoint.damage(path) is None
        words = f"{model / 'pytorch_model.bin'}: a .bin file is a pickle and torch 2.5.1 cannot read a pickle"
        assert_user_error(BIN_COMMANDS["chat"](inputs, model, tmp_path), capsys, words)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- model weights


def bin_model(inputs, tmp_path: Path, weights: str) -> tuple[Path, Path]:
    """The tiny model with its weights as pytorch_model.bin: `genuine`, `crafted` (a pickle that would
    create the marker) or `truncated`; returns (model directory, marker)."""
    from safetensors.torch import load_file

    model = Path(shutil.copytree(inputs["base"], tmp_path / "model"))
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    target = model / "pytorch_model.bin"
    if weights == "crafted":
        torch.save({**state, "lm_head.weight": _RunsCode(f"touch {marker}")}, target)
    else:
        torch.save(state, target)
    if weights == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return model, marker


BIN_COMMANDS = {
    "evaluate": lambda i, m, t: ["evaluate", "--model", str(m), "--data", str(i["mmlu"]),
                                 "--output", str(t / "r.json")],
    "attribute": lambda i, m, t: ["attribute", "--model", str(m), "--data", str(i["mmlu"]),
                                  "--output", str(t / "a.safetensors")],
    "chat": lambda i, m, t: ["chat", "--model", str(m), "--prompt", "hi", "--max-new-tokens", "2"],
    "train": lambda i, m, t: ["train", "--model", str(m), "--positions", str(i["positions"]), "--data",
                              str(i["data"]), "--output-dir", str(t / "out"), "--ds-config", "none"],
}  # fmt: skip
SAFETENSORS_ONLY = ("train",)


@pytest.mark.parametrize("weights", ["crafted", "truncated"])
@pytest.mark.parametrize("command", list(BIN_COMMANDS))
def test_a_hostile_or_damaged_bin_is_one_line_naming_it(command, weights, inputs, tmp_path, capsys):
    model, marker = bin_model(inputs, tmp_path, weights)
    argv = BIN_COMMANDS[command](inputs, model, tmp_path)
    if command in SAFETENSORS_ONLY:
        words = f"--model {model}: holds PyTorch .bin weights; this command reads safetensors only"
    else:
        words = f"--model {model / 'pytorch_model.bin'}: cannot be read as weights: not a file of tensors ("
    assert_user_error(argv, capsys, words)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written


def test_a_genuine_bin_is_still_read_as_tensors(inputs, tmp_path, capsys):
    """A model kept as pytorch_model.bin works where transformers reads it (with weights_only)."""
    model, marker = bin_model(inputs, tmp_path, "genuine")
    main(BIN_COMMANDS["evaluate"](inputs, model, tmp_path))  # returns: done, exit status 0
    assert json.loads((tmp_path / "r.json").read_text())["model"] == str(model)
    assert not marker.exists()


def test_genuine_bin_shards_are_read_as_tensors(inputs, tmp_path):
    """pytorch_model.bin.index.json and the shards it names, as transformers saved them before safetensors."""
    from safetensors.torch import load_file

    model = Path(shutil.copytree(inputs["base"], tmp_path / "model"))
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(state)
    shard_of = {
        name: f"pytorch_model-0000{1 + 2 * i // len(names)}-of-00002.bin" for i, name in enumerate(names)
    }
    for shard in set(shard_of.values()):
        torch.save({name: state[name] for name in names if shard_of[name] == shard}, model / shard)
    index = {"metadata": {"total_size": 0}, "weight_map": shard_of}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    main(["chat", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"])  # returns: done


def _named_weights(model: Path, name: str, content: bytes | None) -> None:
    """config.json names the file transformers is to load instead of model.safetensors."""
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "transformers_weights": name}))
    if content is not None:
        (model / name).write_bytes(content)


# config.json's transformers_weights -> (its content, the command, words of the refusal)
NAMED_WEIGHTS = {
    "a damaged file": ("evil.safetensors", b"not safetensors", "chat", "evil.safetensors: truncated or"),
    "a file outside the model": ("../evil.safetensors", None, "chat", "`transformers_weights` must name a"),
    "a pickle": ("evil.bin", b"", "chat", "`transformers_weights` must name a .safetensors file or index"),
    "another file, to train": ("other.safetensors", b"", "train", "names other weights to load"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(NAMED_WEIGHTS))
def test_weights_that_config_json_names_are_the_ones_checked(case, inputs, tmp_path, capsys):
    """transformers 5 loads the file config.json names in `transformers_weights` instead of
    model.safetensors: that file is checked before any work, as model.safetensors would be."""
    name, content, command, words = NAMED_WEIGHTS[case]
    model = Path(shutil.copytree(inputs["base"], tmp_path / "model"))
    _named_weights(model, name, content)
    assert_user_error(BIN_COMMANDS[command](inputs, model, tmp_path), capsys, words)


# ----------------------------------------------------------------------------- a model's own code


def with_remote_code(inputs, tmp_path: Path, model_type: str) -> tuple[Path, Path]:
    """The tiny model whose config and tokenizer config name code shipped beside them (auto_map), as a
    hub repository with custom code does, with a custom_generate/generate.py too; that code creates the
    marker when it is imported."""
    model = Path(shutil.copytree(inputs["base"], tmp_path / "model"))
    marker = tmp_path / "code-ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    (model / "configuration_evil.py").write_text(
        code + "from transformers import LlamaConfig as EvilConfig\n"
    )
    (model / "modeling_evil.py").write_text(code + "from transformers import LlamaForCausalLM as EvilLM\n")
    (model / "tokenization_evil.py").write_text(
        code + "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    config = json.loads((model / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilLM"}
    config.update(model_type=model_type, auto_map=auto_map)
    (model / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (model / "custom_generate").mkdir()  # transformers' own hook for a model's generate(), also code
    (model / "custom_generate" / "generate.py").write_text(code + "def generate(model, **kwargs): pass\n")
    return model, marker


def test_a_model_needing_its_own_code_is_refused_even_when_stdin_says_yes(inputs, tmp_path):
    """A model type transformers does not know, with auto_map code: transformers would ask on stdin
    whether to run it, and a piped "y" would. evaluate (which takes any causal LM) refuses it first."""
    model, marker = with_remote_code(inputs, tmp_path, "evil_llama")
    argv = ["evaluate", "--model", str(model), "--data", str(inputs["mmlu"]), "--output", str(tmp_path / "r")]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "loki_dist", *argv], input="y\ny\ny\n", capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)  # fmt: skip
    assert not marker.exists(), "the model's own code ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model type 'evil_llama' is not one that transformers" in lines[0], lines
    assert "auto_map names code shipped with the model, which loki_dist never runs" in lines[0]


def test_a_known_model_type_runs_transformers_code_not_its_auto_map(inputs, tmp_path, capsys):
    model, marker = with_remote_code(inputs, tmp_path, "llama")
    main(["chat", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"])  # returns: done
    assert not marker.exists(), "the model's own code ran"


# -------------------------------------------------------------------------------------- templates


def test_a_chat_template_cannot_reach_python(inputs, tmp_path, capsys):
    """Templates are rendered in Jinja's sandbox (template_sandbox.py, configured as transformers'): a
    template reaching for a function's globals gets a one-line refusal, not os.system."""
    marker = tmp_path / "code-ran"
    template = tmp_path / "evil.jinja"
    template.write_text(f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}")
    argv = ["chat", "--model", str(inputs["base"]), "--prompt", "hi", "--chat-template", str(template)]
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2 and not marker.exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]  # before the model loads: the first prompt
    refusal = f"the conversation: --chat-template {template} fails on it (SecurityError: access to attribute"
    assert last.startswith(f"loki-dist chat: error: {refusal} '__init__' of 'type' object is unsafe")


# ----------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("command", ["train", "pipeline"])
def test_a_yaml_python_tag_constructs_nothing(command, tmp_path, capsys):
    """--config files are read with YAML's safe loader: a tag naming a Python callable is refused."""
    marker = tmp_path / "code-ran"
    config = tmp_path / "config.yaml"
    config.write_text(
        f'output_dir: {tmp_path / "out"}\nmodel: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    with pytest.raises(SystemExit) as refused:
        main([command, "--config", str(config)])
    assert refused.value.code == 2 and not marker.exists()
    assert f"--config {config}: not valid YAML (line 2: could not determine a constructor for the tag" in (
        capsys.readouterr().err
    )
