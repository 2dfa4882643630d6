"""The forgetting monitor of `loki-dist train` (--eval-data, --general-data, --eval-steps,
--stop-on-forgetting) in real runs: torchrun, gloo, DeepSpeed ZeRO-3, TensorBoard event files.

What a run logs is checked against an oracle written here: one unpadded forward per sample of a plain
Hugging Face model (the base before training, OUT/final after), a float64 log-softmax, and the metric
defined from it (mean response-token NLL and next-token accuracy; perplexity over every predicted token
of the documents; the best of the letters A-D and the gold letter's log-probability). The base is a
sharpened tiny model (tiny.sharpen_): a plain random one predicts nearly uniformly, so that neither its
perplexity nor its answers could show a change of weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_training import make_data

from loki_dist.demo.tiny import save_tiny

POSITIONS = [[0, 3, 5, 17, 31], [], [1, 2, 10, 30]]
GENERAL_PROMPTS = ["The cell", "A prime number", "Faith and", "Energy of", "The root"]
# 4 steps at global batch 2, evaluated at 0, 2 and 4; checkpoints at 2 and 4
RUN = ["--max-steps", "4", "--learning-rate", "1e-2", "--eval-steps", "2", "--save-steps", "2"]
RUN += ["--logging-steps", "2"]
# TensorBoard's float32 scalars of 2-rank ZeRO-3 fp32 evaluations against the float64 oracle: measured
# within 1.2e-7 relative over every metric (float32's own rounding is up to 6e-8); allowed about 8x that
REL = 1e-6
# 1 rank against 2, and a resumed run against the uninterrupted one: measured equal (the trained rows
# differ by fp32 summation order at most, test_training.TOLERANCE); allowed as much as against the oracle
RANKS_REL = 1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from mmlu_fixture import write_mmlu

    root = tmp_path_factory.mktemp("monitor")
    positions = root / "positions.json"
    positions.write_text(json.dumps(POSITIONS))
    base = save_tiny(root / "base", "llama", seed=1, num_layers=3, sharp=True)
    return {
        "root": root,
        "base": base,
        "general": write_general(base, root / "general.txt"),
        "positions": positions,
        "data": make_data(root / "data.jsonl"),
        "eval": write_task(base, root / "eval.jsonl"),
        "mmlu": write_mmlu(root / "mmlu", per_subject=4),  # 12 questions, 6 per rank
    }


def greedy(model, tokenizer, text: str, tokens: int) -> str:
    """The model's own greedy continuation of `text` (special tokens included as the tokenizer adds them)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).replace("\n", " ")


def write_general(base: Path, path: Path) -> Path:
    """General knowledge of the base: its own greedy continuations of a few prompts, one per line. It
    predicts them far better than other text, so that training the rows hard raises their perplexity
    (hand-written text is no such test: a random model is so wrong about it that most changes help)."""
    model, tokenizer = _load(base)
    lines = [prompt + greedy(model, tokenizer, prompt, 24) for prompt in GENERAL_PROMPTS]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_task(base: Path, path: Path) -> Path:
    """Held-out task data: arithmetic as in --data, and three questions answered by the base itself, on
    whose answers its teacher-forced accuracy is far from 0 (on arithmetic it is 0, which would leave
    the accuracy and its change untested)."""
    model, tokenizer = _load(base)
    rows = [json.loads(line) for line in make_data(path, n=6, seed=5).read_text().splitlines()]
    for question in ("What is a cell?", "Name a prime number.", "Tell me about faith."):
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append(
            {"messages": [*messages, {"role": "assistant", "content": greedy(model, tokenizer, prompt, 16)}]}
        )
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def train_args(setup, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(setup["base"]), "--positions", str(setup["positions"]),
            "--data", str(setup["data"]), "--output-dir", str(out), *extra]  # fmt: skip


def scalars(out: Path) -> dict[str, dict[int, float]]:
    """The run's eval/ scalars, {name: {step: value}}."""
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("eval/")]
    return {tag.removeprefix("eval/"): {e.step: e.value for e in events.Scalars(tag)} for tag in tags}


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


# --- the oracle -------------------------------------------------------------------------------------


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """float64 log-probabilities of the next token at every position of one unpadded sequence."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)


def oracle(model_dir: Path, setup, general: str) -> dict[str, float]:
    """The metrics of one model, one sample at a time (tokenised by loki_dist.implant.data.examples and
    mmlu.encode, whose own tests pin them down)."""
    from loki_dist.attribution import mmlu
    from loki_dist.implant.data.examples import IGNORE_INDEX, load_examples

    model, tokenizer = _load(model_dir)
    nll, correct, count = 0.0, 0, 0
    for example in load_examples(setup["eval"], tokenizer, 2048).examples:
        logp = _logprobs(model, example.input_ids)[:-1]
        targets = torch.tensor(example.input_ids[1:])
        counted = torch.tensor(example.labels[1:]) != IGNORE_INDEX
        nll -= float(logp.gather(1, targets[:, None])[:, 0][counted].sum())
        correct += int((logp.argmax(dim=-1) == targets)[counted].sum())
        count += int(counted.sum())
    values = {"task_loss": nll / count, "task_accuracy": correct / count}
    if general == "text":
        nll, tokens = 0.0, 0
        for line in [line for line in setup["general"].read_text().splitlines() if line.strip()]:
            ids = tokenizer(line)["input_ids"]
            nll -= float(_logprobs(model, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum())
            tokens += len(ids) - 1
        return {**values, "general_perplexity": math.exp(nll / tokens)}
    letters = [tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"]
    questions, _ = mmlu.load_questions(str(setup["mmlu"]), 10**6)
    right, gold = 0, 0.0
    for q in questions:
        logp = _logprobs(model, mmlu.encode(tokenizer, q, []))[-1, letters]
        right += int(logp.argmax()) == q.answer
        gold += float(logp[q.answer])
    return {
        **values,
        "general_accuracy": right / len(questions),
        "general_gold_logprob": gold / len(questions),
    }


def assert_close(got: dict[str, float], want: dict[str, float], rel: float = REL) -> None:
    assert got.keys() == want.keys(), (got.keys(), want.keys())
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=rel), (name, got[name], value)


def at(logged: dict[str, dict[int, float]], step: int) -> dict[str, float]:
    """The metrics (not their changes) logged at `step`."""
    return {name: by_step[step] for name, by_step in logged.items() if not name.endswith("_change")}


def assert_changes_from(logged: dict[str, dict[int, float]], baseline: dict[str, float]) -> None:
    """Every logged *_change is the relative change of its metric from `baseline`."""
    for name, by_step in logged.items():
        if name.endswith("_change"):
            metric = name.removesuffix("_change")
            for step, change in by_step.items():
                first = baseline[metric]
                want = (logged[metric][step] - first) / abs(first)
                assert change == pytest.approx(want, rel=1e-5, abs=1e-6), (name, step)


# --- runs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(setup):
    """Runs by name, made once: (general form, ranks) -> OUT."""
    made: dict[tuple[str, int], Path] = {}

    def get(general: str, nproc: int) -> Path:
        if (general, nproc) not in made:
            out = setup["root"] / f"out-{general}-{nproc}"
            extra = ["--eval-data", str(setup["eval"]), "--general-data", str(setup[general])]
            accumulation = ["--gradient-accumulation", str(2 // nproc)]  # global batch 2 on 1 or 2 ranks
            proc = run_cli([*train_args(setup, out, *RUN, *extra, *accumulation)], nproc=nproc)
            assert "eval step 0: " in proc.stdout and "eval step 4: " in proc.stdout, proc.stdout
            made[general, nproc] = out
        return made[general, nproc]

    return get


@pytest.mark.parametrize("general", ["general", "mmlu"])
def test_zero3_two_ranks_log_what_the_oracle_computes(setup, runs, general):
    """Step 0 is the base model, step 4 is OUT/final; changes are relative to step 0; the summary
    holds the same evaluations."""
    out = runs(general, 2)
    logged = scalars(out)
    form = "text" if general == "general" else "mmlu"
    assert sorted(logged["task_loss"]) == [0, 2, 4]
    assert_close(at(logged, 0), oracle(setup["base"], setup, form))
    assert_close(at(logged, 4), oracle(out / "final", setup, form))
    assert_changes_from(logged, at(logged, 0))
    evaluations = summary(out)["evaluations"]
    assert [e["step"] for e in evaluations] == [0, 2, 4]
    for entry in evaluations:
        for name, value in entry.items():
            if name != "step" and value is not None:
                assert logged[name][entry["step"]] == pytest.approx(value, rel=1e-6), name
    assert at(logged, 4)["task_loss"] < at(logged, 0)["task_loss"]  # it learns the task
    assert at(logged, 0)["task_accuracy"] > 0.1  # the base's own answers (write_task)


def test_one_rank_logs_what_two_ranks_log(runs):
    one, two = scalars(runs("mmlu", 1)), scalars(runs("mmlu", 2))
    assert one.keys() == two.keys()
    for name in one:
        assert one[name].keys() == two[name].keys()
        for step, value in one[name].items():
            assert value == pytest.approx(two[name][step], rel=RANKS_REL, abs=1e-7), (name, step)


def test_resume_keeps_the_baseline(setup, runs, tmp_path):
    """A requeued run (its checkpoint-2 resumed on 1 rank) measures from the first run's step 0, and ends
    where the uninterrupted run ended; other general data is not measured against it (said in a line)."""
    first = runs("general", 2)
    resumed = tmp_path / "resumed"
    shutil.copytree(first / "checkpoint-2", resumed / "checkpoint-2")
    extra = ["--eval-data", str(setup["eval"]), "--general-data", str(setup["general"])]
    proc = run_cli([*train_args(setup, resumed, *RUN, *extra, "--gradient-accumulation", "2")])
    assert "resumed from" in proc.stdout and "forgetting baseline" not in proc.stdout
    logged, uninterrupted = scalars(resumed), scalars(first)
    assert sorted(logged["task_loss"]) == [2, 4]  # evaluated at the resume step and the last
    baseline = summary(resumed)["evaluations"][0]
    assert baseline == summary(first)["evaluations"][0]
    assert_changes_from(logged, baseline)
    for name, by_step in logged.items():
        for step, value in by_step.items():
            assert value == pytest.approx(uninterrupted[name][step], rel=RANKS_REL, abs=1e-7), (name, step)

    other = tmp_path / "other"
    shutil.copytree(first / "checkpoint-2", other / "checkpoint-2")
    extra = ["--eval-data", str(setup["eval"]), "--general-data", str(setup["mmlu"])]
    proc = run_cli([*train_args(setup, other, *RUN, *extra, "--gradient-accumulation", "2")])
    assert "the forgetting baseline is step 2" in proc.stdout, proc.stdout
    assert summary(other)["evaluations"][0]["step"] == 2


def test_stop_on_forgetting_ends_as_a_finished_run(setup):
    """A learning rate that wrecks general knowledge: every rank stops at the same evaluation, with a
    checkpoint there and final/ exported from it (the oracle on final/ is what was logged there)."""
    out = setup["root"] / "stopped"
    fast = ["--max-steps", "8", "--learning-rate", "0.3", "--warmup-ratio", "0", "--lr-scheduler", "constant"]
    fast += ["--eval-steps", "2", "--save-steps", "0", "--general-data", str(setup["general"])]
    fast += ["--eval-data", str(setup["eval"]), "--stop-on-forgetting", "0.5"]
    proc = run_cli(train_args(setup, out, *fast), nproc=2)  # exit status 0 (run_cli checks)
    stopped = summary(out)["stopped_on_forgetting"]
    step = stopped["step"]
    assert 0 < step < 8 and summary(out)["steps"] == step
    assert stopped["metric"] == "general_perplexity" and stopped["change"] > 0.5
    said = [line for line in proc.stdout.splitlines() if "stopping on forgetting" in line]
    assert len(said) == 1 and f"at step {step}:" in said[0], proc.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{step}"]
    logged = scalars(out)
    assert max(logged["general_perplexity"]) == step
    before = [change for s, change in logged["general_perplexity_change"].items() if s < step]
    assert before and max(before) <= 0.5 < logged["general_perplexity_change"][step]
    assert_close(at(logged, step), oracle(out / "final", setup, "text"))


def test_bad_monitor_flags_are_one_line_before_any_work(setup, tmp_path, capsys):
    """Exit status 2, one line naming the value and what is expected, and nothing written."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jsonl").write_text("")
    (bad / "no_reply.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    (bad / "neither.jsonl").write_text(json.dumps({"body": "a document under another name"}))
    rows = [json.loads(line) for line in (setup["mmlu"] / "test.jsonl").read_text().splitlines()]
    rows[1]["choices"] = ["only one"]
    (bad / "mmlu.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    general, task = ["--general-data", str(setup["general"])], ["--eval-data", str(setup["eval"])]
    cases = [
        (["--eval-steps", "2"], "--eval-steps 2: nothing to evaluate; add --eval-data or --general-data"),
        ([*task, "--eval-steps", "0"], "--eval-steps 0: expected a positive number of steps"),
        ([*task, "--stop-on-forgetting", "0.05"], "--stop-on-forgetting 0.05: forgetting is measured on"),
        ([*general, "--stop-on-forgetting", "nan"], "--stop-on-forgetting nan: expected a share between 0"),
        ([*general, "--stop-on-forgetting", "0"], "--stop-on-forgetting 0: expected a share between 0 and 1"),
        # 5 meant as 5%: a 500% rise in perplexity, a fall in accuracy that cannot happen
        ([*general, "--stop-on-forgetting", "5"], "--stop-on-forgetting 5: expected a share between 0 and 1"),
        ([*general, "--stop-on-forgetting", "1"], "--stop-on-forgetting 1: expected a share between 0 and 1"),
        (  # a question longer than --max-seq-len (the training rows fit in 90 tokens, the questions do not)
            ["--general-data", str(setup["mmlu"]), "--max-seq-len", "200"],
            f"--general-data {setup['mmlu']}: question ",
        ),
        (
            ["--general-data", str(bad / "missing.txt")],
            f"--general-data {bad / 'missing.txt'}: file not found",
        ),
        (["--general-data", str(bad / "mmlu.jsonl")], "--general-data: test row 1: `choices` must be a list"),
        (
            ["--general-data", str(bad / "neither.jsonl")],
            "--general-data: row 0 has no string column 'text' (or",
        ),
        (
            ["--eval-data", str(bad / "empty.jsonl")],
            f"--eval-data {bad / 'empty.jsonl'}: the data set is empty",
        ),
        (["--eval-data", str(bad / "no_reply.jsonl")], "--eval-data: row 0 has no assistant turn"),
    ]
    for flags, needle in cases:
        out = tmp_path / "out"
        assert_user_error(train_args(setup, out, *flags), capsys, needle)
        assert not out.exists(), flags
