"""`loki-dist train` end to end on real DeepSpeed engines and process groups (gloo, CPU), against an oracle
written here in plain PyTorch.

The oracle trains the selected rows as their own float64 tensor, spliced into the base model's weights
for each forward: the loss of a step is the summed next-token NLL of the global batch's response tokens
(each sample on its own, unpadded) divided by their count; torch.optim.AdamW steps the rows with its own
decoupled weight decay; the learning rate follows the documented schedule, computed here. Every
configuration (ZeRO-3 on 2 and 3 ranks, ZeRO-2, ZeRO-0, one plain process, ZeRO-3 with offload; both
row layouts; fp32 and bf16) must reproduce its rows after several steps, and the loss, gradient norm and
learning rate it logged, and must leave every unselected row and every other tensor of the base model
bit-identical. With clipping off a loss normalisation off by a constant shows in the logged loss and
gradient norm (Adam's update itself hardly depends on the gradient's scale); one run clips every step and
is compared with the oracle's clipped update.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, cli_command, run_cli
from safetensors.torch import load_file

from loki_dist.demo.tiny import save_tiny

POSITIONS = [[0, 3, 5, 17, 31], [], [1, 2, 10, 30]]  # layer 1 stays frozen
# Why 2e-6 between two runs: they differ only in fp32 summation order (all-reduce vs local accumulation,
# micro-batch grouping), about 1e-7 relative on each gradient; Adam divides by sqrt(v), so the rows
# (moved by ~1e-2 here) agree to about 1e-8; a masking or decay error moves a row by ~lr * wd * w or more.
TOLERANCE = 2e-6
MAX_GRAD_NORM = 0.005  # below every step's gradient norm here, so clipping acts on every update

# The options of the runs below (flag -> value). RUN clips every step; ORACLE_RUN does not clip and
# logs every step: 4 steps at global batch 6, learning rates 0, 5e-3, 1e-2, 5e-3.
RUN = {
    "--max-steps": 6,
    "--learning-rate": 1e-2,
    "--weight-decay": 0.1,
    "--max-grad-norm": MAX_GRAD_NORM,
    "--warmup-ratio": 0.2,
    "--logging-steps": 2,
    "--save-steps": 3,
    "--row-params": "masked",  # the layout most tests here exercise; the oracle runs ask for each
}
ORACLE_RUN = {**RUN, "--max-steps": 4, "--max-grad-norm": 0, "--warmup-ratio": 0.5, "--logging-steps": 1,
              "--save-steps": 2}  # fmt: skip
GLOBAL_BATCH = 6
LAYOUTS = ("split", "masked")


@dataclass(frozen=True)
class Tolerance:
    """How close a run must come to the oracle: rows (absolute), loss and gradient norm (relative)."""

    rows: float
    loss: float
    norm: float


# fp32 runs against the float64 oracle, measured over every configuration: rows within 4.0e-8 after
# 4 steps (they move by 2e-2), losses within 9.1e-8 and gradient norms within 1.4e-7 relative (fp32
# summation order). Allowed: about 10x that. A decay applied after Adam's step instead of before, or with
# another step's learning rate, moves a row by ~1e-5; a loss normalised by a wrong constant multiplies
# the logged loss and gradient norm by it.
FP32 = Tolerance(rows=4e-7, loss=1e-6, norm=2e-6)
# bf16 runs (bf16 base, bf16 forward and gradients, fp32 master) against the oracle started from the same
# bf16 weights, measured on ZeRO-3, 2 ranks, both layouts: rows within 7.5e-4 (bf16 gradient noise
# turns Adam's step on elements whose gradient is near 0; final rows are rounded to bf16, 2^-9 relative),
# losses within 8.3e-6 and gradient norms within 2.8e-3 relative. Allowed: about 4x, 12x and 3.5x that.
BF16 = Tolerance(rows=3e-3, loss=1e-4, norm=1e-2)


def make_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if i % 3 == 0:
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": f"Add {a} and {b}."},
                        {"role": "assistant", "content": f"{a + b}"},
                    ]
                }
            )
        else:
            rows.append(
                {
                    "instruction": f"What is {a} plus {b}?",
                    "input": "" if i % 2 else "Show the sum.",
                    "output": f"{a} plus {b} is {a + b}." * (1 + i % 4),
                }
            )
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _config_variant(root: Path, name: str, stem: str, zero: dict) -> Path:
    """A shipped DeepSpeed config with some zero_optimization entries replaced."""
    config = json.loads((REPO / "ds_configs" / f"{stem}.json").read_text())
    config["zero_optimization"] = {**config["zero_optimization"], **zero}
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    positions = root / "positions.json"
    positions.write_text(json.dumps(POSITIONS))
    return {
        "root": root,
        "base": save_tiny(root / "base", "llama", seed=1, num_layers=3),
        "base16": save_tiny(root / "base16", "llama", seed=1, num_layers=3, dtype=torch.bfloat16),
        "positions": positions,
        "data": make_data(root / "data.jsonl"),
        # stage 0: plain data parallel inside DeepSpeed (whole parameters, masked after the all-reduce)
        "zero0": _config_variant(root, "zero0", "zero2", {"stage": 0}),
        # threshold 0: every weight partitioned, even tiny ones, so rank boundaries fall inside rows
        "zero3_no_persist": _config_variant(
            root, "zero3_no_persist", "zero3", {"stage3_param_persistence_threshold": 0}
        ),
    }


def train_args(setup, out: Path, *extra: str, options: dict = RUN, base: Path | None = None) -> list[str]:
    flags = [text for flag, value in options.items() for text in (flag, str(value))]
    model = str(base or setup["base"])
    return ["train", "--model", model, "--positions", str(setup["positions"]), "--data", str(setup["data"]),
            "--output-dir", str(out), *flags, *extra]  # fmt: skip


@dataclass(frozen=True)
class Run:
    out: Path
    stdout: str
    options: dict
    stderr: str = ""


def train(setup, out: Path, *extra: str, nproc: int = 1, options: dict = RUN, base=None) -> Run:
    proc = run_cli(train_args(setup, out, *extra, options=options, base=base), nproc=nproc)
    return Run(out, proc.stdout, options, proc.stderr)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_only_selected_rows_moved(base_dir: Path, out: Path) -> None:
    base, trained = load_file(str(base_dir / "model.safetensors")), final_weights(out)
    assert base.keys() == trained.keys()
    for name, tensor in base.items():
        if ".mlp.down_proj." not in name:
            assert torch.equal(tensor, trained[name]), f"{name} moved"
            continue
        layer = int(name.split(".")[2])
        selected = torch.zeros(tensor.shape[0], dtype=torch.bool)
        selected[POSITIONS[layer]] = True
        assert torch.equal(tensor[~selected], trained[name][~selected]), f"{name}: an unselected row moved"
        changed = (tensor[selected] != trained[name][selected]).any(dim=1)
        assert changed.all(), (
            f"{name}: selected rows {torch.tensor(POSITIONS[layer])[~changed]} did not train"
        )


def assert_equal_weights(expected: Path, got: Path) -> None:
    want, have = final_weights(expected), final_weights(got)
    for name in want:
        assert torch.equal(want[name], have[name]), f"{name}: resume differs from uninterrupted run"


# --- the oracle ------------------------------------------------------------------------------------------


@dataclass
class Oracle:
    lrs: list[float]  # the learning rate of each step
    losses: list[float]  # each step's mean response-token NLL over its global batch, before its update
    norms: list[float]  # each step's gradient 2-norm, before clipping
    probes: list[float]  # the loss of global batch 0 before the first step and after each step
    rows: dict[int, torch.Tensor]  # layer -> its selected rows after the last step


def scheduled_lr(step: int, options: dict) -> float:
    """--warmup-ratio with --lr-scheduler cosine: linear warm-up from 0 over ceil(ratio * steps) steps, then
    cosine decay to 0."""
    total, peak = options["--max-steps"], options["--learning-rate"]
    warmup = math.ceil(options["--warmup-ratio"] * total)
    if step < warmup:
        return peak * step / warmup
    return peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def global_batches(num_samples: int, global_batch: int, steps: int, seed: int = 42) -> list[list[int]]:
    """train's data order: each epoch a permutation of the samples seeded by --seed + epoch, cut into
    global batches (so a batch does not depend on how many ranks share it)."""
    per_epoch = num_samples // global_batch
    batches = []
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches.append(order[index * global_batch : (index + 1) * global_batch])
    return batches


def train_oracle(base: Path, data: Path, options: dict, global_batch: int) -> Oracle:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.implant.data.examples import load_examples

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval().requires_grad_(False)
    max_len = options.get("--max-seq-len", 2048)
    samples = [
        (torch.tensor(e.input_ids), torch.tensor(e.labels))
        for e in load_examples(data, AutoTokenizer.from_pretrained(base), max_len).examples
    ]
    weights = dict(model.named_parameters())
    names = {layer: f"model.layers.{layer}.mlp.down_proj.weight" for layer, r in enumerate(POSITIONS) if r}
    index = {layer: torch.tensor(POSITIONS[layer]) for layer in names}
    params, rows = parametrise({layer: weights[name][index[layer]] for layer, name in names.items()}, options)
    # torch's AdamW decays decoupled, w <- w * (1 - lr * wd), before its moment update and step
    # (_single_tensor_adam), the order in which loki_dist decays the fp32 master and then steps Adam with
    # weight_decay 0; betas (0.9, 0.999) and eps 1e-8 are torch's defaults, which the trainer keeps too
    optimizer = torch.optim.AdamW(params, weight_decay=options["--weight-decay"], foreach=False)

    def mean_loss(batch: list[int]) -> torch.Tensor:
        spliced = {
            name: weights[name].index_copy(0, index[layer], rows(layer)) for layer, name in names.items()
        }
        total, count = torch.zeros((), dtype=torch.float64), 0
        for ids, labels in (samples[i] for i in batch):
            logits = torch.func.functional_call(model, spliced, (ids[None],)).logits[0]
            total = total + torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="sum")
            count += int((labels[1:] != -100).sum())
        return total / count

    steps, clip = options["--max-steps"], options["--max-grad-norm"]
    batches = global_batches(len(samples), global_batch, steps)
    oracle = Oracle([], [], [], [], {})
    with torch.no_grad():
        oracle.probes.append(mean_loss(batches[0]).item())
    for step, batch in enumerate(batches):
        optimizer.zero_grad()
        loss = mean_loss(batch)
        loss.backward()
        norm = torch.cat([p.grad.flatten() for p in params]).norm().item()
        if clip > 0:
            for p in params:
                p.grad.mul_(min(1.0, clip / (norm + 1e-6)))
        oracle.lrs.append(scheduled_lr(step, options))
        optimizer.param_groups[0]["lr"] = oracle.lrs[-1]
        optimizer.step()
        oracle.losses.append(loss.item())
        oracle.norms.append(norm)
        with torch.no_grad():
            oracle.probes.append(mean_loss(batches[0]).item())
    oracle.rows = {layer: rows(layer).detach() for layer in names}
    return oracle


def parametrise(frozen: dict[int, torch.Tensor], options: dict):
    """(the tensors the oracle trains, layer -> its selected rows as they now stand) from each trained
    layer's base rows W_S0. The rows themselves; or, with --lora-rank R (LoKI*), W_S0 + A B with A [k, R]
    starting at zero and B [R, F] drawn as loki_dist documents it: torch's kaiming_uniform_(a=sqrt(5)),
    PEFT's lora_A initialisation, in float32 from one CPU generator seeded with --seed (42 by default),
    layer after layer."""
    rank = options.get("--lora-rank", 0)
    if not rank:
        rows = {layer: w.clone().requires_grad_(True) for layer, w in frozen.items()}
        return list(rows.values()), rows.__getitem__
    generator = torch.Generator().manual_seed(options.get("--seed", 42))
    factors = {}
    for layer, w in sorted(frozen.items()):
        b = torch.empty(rank, w.shape[1])
        torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=generator)
        a = torch.zeros(w.shape[0], rank, dtype=w.dtype)
        factors[layer] = (a.requires_grad_(True), b.to(w.dtype).requires_grad_(True))
    params = [t for pair in factors.values() for t in pair]
    return params, lambda layer: frozen[layer] + factors[layer][0] @ factors[layer][1]


@pytest.fixture(scope="module")
def oracle(setup):
    """oracle(options, global_batch, base) -> Oracle, each computed once."""
    cache: dict = {}

    def get(options: dict, global_batch: int, base: Path | None = None) -> Oracle:
        key = (json.dumps(options, sort_keys=True), global_batch, base)
        if key not in cache:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # its ops are tiny: two threads take 10x longer on a busy machine
            try:
                cache[key] = train_oracle(base or setup["base"], setup["data"], options, global_batch)
            finally:
                torch.set_num_threads(threads)
        return cache[key]

    return get


def logged_scalars(run: Run) -> dict[str, dict[int, float]]:
    """TensorBoard's scalars, {name: {step: value}}, read back from the event files; the printed log
    lines must say the same (to their 4 significant digits) at the same steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.out / "runs"))
    events.Reload()
    scalars = {tag.removeprefix("train/"): {e.step: e.value for e in events.Scalars(tag)}
               for tag in events.Tags()["scalars"]}  # fmt: skip
    printed = re.findall(r"^step (\d+): (.*)$", run.stdout, flags=re.MULTILINE)
    assert sorted(int(step) for step, _ in printed) == sorted(scalars["loss"]), run.stdout[-2000:]
    for step, line in printed:
        values = dict(item.split("=") for item in line.split())
        assert values.keys() == scalars.keys(), (values, scalars.keys())
        for name, text in values.items():
            assert float(text) == pytest.approx(scalars[name][int(step)], rel=5.1e-4), (step, name, line)
    return scalars


def assert_matches_oracle(run: Run, expected: Oracle, tolerance: Tolerance) -> None:
    """Rows, logged loss (a window mean), gradient norm and learning rate, and the summary's probes."""
    weights = final_weights(run.out)
    for layer, want in expected.rows.items():
        got = weights[f"model.layers.{layer}.mlp.down_proj.weight"][POSITIONS[layer]].double()
        diff = (got - want).abs().max().item()
        assert diff <= tolerance.rows, f"layer {layer}: rows differ from the oracle's by {diff:.3g}"
    scalars = logged_scalars(run)
    total, every = run.options["--max-steps"], run.options["--logging-steps"]
    steps = [s for s in range(1, total + 1) if s % every == 0 or s == total]
    assert sorted(scalars["loss"]) == steps and set(scalars) == {"loss", "lr", "grad_norm", "tokens_per_s"}
    for before, step in zip([0, *steps], steps, strict=False):
        window = expected.losses[before:step]
        assert scalars["loss"][step] == pytest.approx(sum(window) / len(window), rel=tolerance.loss), step
        assert scalars["grad_norm"][step] == pytest.approx(expected.norms[step - 1], rel=tolerance.norm), step
        assert scalars["lr"][step] == pytest.approx(expected.lrs[step - 1], rel=1e-6), step
        assert scalars["tokens_per_s"][step] > 0
    summary = json.loads((run.out / "train_summary.json").read_text())
    assert summary["start_step"] == 0
    assert summary["probe_loss_at_start_step"] == pytest.approx(expected.probes[0], rel=tolerance.loss)
    assert summary["probe_loss"] == pytest.approx(expected.probes[-1], rel=tolerance.loss)


# --- every configuration, both layouts, against the oracle ------------------------------------------------

# (ranks, arguments); each makes global batch 6 from micro-batches of 1, 2 or 3 samples of unequal length
CONFIGS = {
    "zero3-2ranks": (2, "--micro-batch-size 1 --gradient-accumulation 3"),
    # every weight partitioned: 3 ranks cut the masked [32, 48] weight at 10.67 rows and a split [5, 48]
    # at 1.67 rows; activation checkpointing (non-reentrant) with frozen parameters, which has crashed
    # DeepSpeed with the split layout
    "zero3-3ranks": (3, "--ds-config {zero3_no_persist} --micro-batch-size 2 --gradient-checkpointing"),
    "zero2-2ranks": (2, "--ds-config zero2 --micro-batch-size 3"),
    "zero0-2ranks": (2, "--ds-config {zero0} --micro-batch-size 1 --gradient-accumulation 3"),
    # a checkpoint every step (the later flag wins), 2 kept: test_save_total_limit_keeps_the_newest_...
    "plain": (
        1,
        "--ds-config none --micro-batch-size 2 --gradient-accumulation 3 --save-steps 1 --save-total-limit 2",
    ),
}


@pytest.fixture(scope="module")
def trained(setup):
    """trained(config, layout, precision) -> the Run of ORACLE_RUN in that configuration, run once."""
    cache: dict[tuple[str, str, str], Run] = {}

    def get(config: str, layout: str, precision: str = "fp32") -> Run:
        key = (config, layout, precision)
        if key not in cache:
            nproc, extra = CONFIGS[config]
            base = setup["base16"] if precision == "bf16" else setup["base"]
            args = extra.format(**setup).split()
            out = setup["root"] / "-".join(key)
            options = {**ORACLE_RUN, "--row-params": layout}
            cache[key] = train(setup, out, *args, "--precision", precision, nproc=nproc, options=options,
                               base=base)  # fmt: skip
        return cache[key]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fp32_training_matches_the_oracle(setup, trained, oracle, config, layout):
    run = trained(config, layout)
    assert_only_selected_rows_moved(setup["base"], run.out)
    assert_matches_oracle(run, oracle(ORACLE_RUN, GLOBAL_BATCH), FP32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_zero3_keeps_frozen_bits_and_tracks_the_oracle(setup, trained, oracle, layout):
    run = trained("zero3-2ranks", layout, "bf16")
    assert_only_selected_rows_moved(setup["base16"], run.out)
    assert final_weights(run.out)["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert_matches_oracle(run, oracle(ORACLE_RUN, GLOBAL_BATCH, setup["base16"]), BF16)


def test_save_total_limit_keeps_the_newest_checkpoints(trained):
    """A checkpoint at every one of 4 steps with --save-total-limit 2: the two newest remain, nothing else."""
    for layout in LAYOUTS:
        out = trained("plain", layout).out
        assert sorted(p.name for p in out.iterdir()) == [
            "checkpoint-3", "checkpoint-4", "final", "runs", "train_summary.json"
        ]  # fmt: skip


def truncation_counts(setup, max_len: int) -> tuple[int, int]:
    """(samples longer than max_len tokens, samples whose prompt alone fills max_len), from the lengths of
    the rendered conversation and of its prompt (the conversation before its one assistant turn)."""
    from transformers import AutoTokenizer

    from loki_dist.implant.data.rows import read_rows, to_messages

    tokenizer = AutoTokenizer.from_pretrained(setup["base"])

    def length(messages: list[dict], prompt: bool) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    conversations = [to_messages(row, i) for i, row in enumerate(read_rows(setup["data"]))]
    truncated = sum(length(m, False) > max_len for m in conversations)
    dropped = sum(length(m[:-1], True) >= max_len for m in conversations)
    return truncated, dropped


def test_overwrite_starts_a_finished_run_over_on_truncated_data(setup, trained, oracle, tmp_path):
    """--overwrite on a finished 4-step run: its checkpoints, final/ and TensorBoard events are gone, the
    user's own files stay, and the new run trains from the base (not the old checkpoints) on data cut to
    --max-seq-len, with the truncated and dropped samples counted in the log as computed here."""
    out = tmp_path / "run"
    shutil.copytree(trained("plain", "split").out, out)
    (out / "notes.txt").write_text("the user's own file")
    max_len = 30
    truncated, dropped = truncation_counts(setup, max_len)
    assert 0 < dropped < truncated and 48 - dropped >= 2 * GLOBAL_BATCH  # some cut, some dropped
    options = {**ORACLE_RUN, "--max-steps": 2, "--row-params": "split", "--max-seq-len": max_len}
    run = train(setup, out, *CONFIGS["plain"][1].split(), "--overwrite", options=options)
    samples = 48 - dropped
    assert (f"{samples} samples ({truncated} truncated to {max_len} tokens, {dropped} dropped with no "
            "response token left)") in run.stdout  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-1", "checkpoint-2", "final", "notes.txt", "runs", "train_summary.json"
    ]  # fmt: skip
    assert json.loads((out / "train_summary.json").read_text())["samples"] == samples
    assert_matches_oracle(run, oracle(options, GLOBAL_BATCH), FP32)  # its events only: steps 1 and 2


# ZeRO++'s in-node secondary partition (zero_hpz_partition_size): 4 ranks as 2 "nodes" of 2. Gathers then
# come from the node's copy; the gradients, and so the masks of the rows, stay on the primary partitions.
@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero3_in_node_secondary_partition_matches_the_oracle(setup, oracle, layout):
    config = _config_variant(setup["root"], f"hpz-{layout}", "zero3", {"zero_hpz_partition_size": 2})
    options = {**ORACLE_RUN, "--row-params": layout}
    run = train(setup, setup["root"] / f"hpz-{layout}", "--ds-config", str(config), "--micro-batch-size", "1",
                nproc=4, options=options)  # fmt: skip
    assert_only_selected_rows_moved(setup["base"], run.out)
    assert_matches_oracle(run, oracle(ORACLE_RUN, 4), FP32)


# --- one run clipping every step: the oracle's clipped update, and the export/apply paths -------------------


@pytest.fixture(scope="module")
def zero3_run(setup) -> Run:
    out = setup["root"] / "zero3"
    return train(setup, out, "--micro-batch-size", "1", "--gradient-accumulation", "2", nproc=2)


def test_zero3_two_ranks_clipped_updates_match_the_oracle(setup, zero3_run, oracle):
    assert_only_selected_rows_moved(setup["base"], zero3_run.out)
    summary = json.loads((zero3_run.out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
    held, total = re.search(r"ZeRO-3: rank 0 holds ([\d,]+) of ([\d,]+) parameter", zero3_run.stdout).groups()
    assert int(held.replace(",", "")) <= int(total.replace(",", "")) // 2  # zero.Init: no rank holds all
    expected = oracle(RUN, 4)
    assert min(expected.norms) > MAX_GRAD_NORM  # clipping acts on every update
    assert_matches_oracle(zero3_run, expected, FP32)
    # DeepSpeed calls collectives that torch 2.13 deprecates, every step: silenced where DeepSpeed is set up
    assert "is deprecated" not in zero3_run.stderr, zero3_run.stderr[-2000:]


def test_apply_reproduces_final_and_from_pretrained_matches_engine(setup, zero3_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.implant.data.examples import collate, load_examples, num_targets

    final = zero3_run.out / "final"
    merged = tmp_path / "merged"
    run_cli(["apply", "--base", str(setup["base"]), "--implant", str(final / "implant.safetensors"),
             "--output", str(merged)])  # fmt: skip
    for name in ("model.safetensors", "implant.safetensors", "config.json"):
        assert (merged / name).read_bytes() == (final / name).read_bytes(), name

    summary = json.loads((zero3_run.out / "train_summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    examples = load_examples(setup["data"], tokenizer, 2048).examples
    probe = [examples[i] for i in summary["probe_samples"]]
    batch = collate(probe, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    ) / sum(num_targets(e) for e in probe)
    assert abs(loss.item() - summary["probe_loss"]) <= 1e-6 * summary["probe_loss"]


def test_apply_refuses_another_base(setup, zero3_run, tmp_path):
    other = save_tiny(tmp_path / "other", "llama", seed=7, num_layers=3)
    implant = str(zero3_run.out / "final" / "implant.safetensors")
    merged = tmp_path / "merged"
    proc = run_cli(
        ["apply", "--base", str(other), "--implant", implant, "--output", str(merged)], check=False
    )
    assert proc.returncode == 2 and "fingerprint" in proc.stderr and "Traceback" not in proc.stderr
    assert not merged.exists()


@pytest.mark.parametrize(
    "shape", [{"num_layers": 2}, {"hidden_size": 64}, {"intermediate_size": 64}], ids=["layers", "D", "F"]
)
def test_apply_refuses_a_base_of_other_shapes(shape, zero3_run, tmp_path, capsys):
    other = save_tiny(tmp_path / "other", "llama", seed=1, **{"num_layers": 3, **shape})
    capsys.readouterr()  # save_pretrained's progress bar
    implant = str(zero3_run.out / "final" / "implant.safetensors")
    argv = ["apply", "--base", str(other), "--implant", implant, "--output", str(tmp_path / "merged")]
    assert_user_error(argv, capsys, "does not match the implant's ('llama', 3, 32, 48)")
    assert not (tmp_path / "merged").exists()


def test_apply_refuses_an_already_implanted_base(setup, zero3_run, tmp_path):
    """final/ carries, in its shard headers, a digest of the rows written in: it fingerprints apart
    from its base (reading a few KB, not the weights), and apply will not implant into it twice."""
    from loki_dist.implant.artifacts.implant_file import fingerprint

    final = zero3_run.out / "final"
    assert fingerprint(final) != fingerprint(setup["base"])
    implant = str(final / "implant.safetensors")
    proc = run_cli(["apply", "--base", str(final), "--implant", implant, "--output", str(tmp_path / "twice")],
                   check=False)  # fmt: skip
    assert proc.returncode == 2 and "already carries a loki_dist implant" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "twice").exists()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero3_offload_matches_the_oracle_and_resumes_exactly(setup, oracle, tmp_path, layout):
    """ds_configs/zero3_offload.json (parameters and optimizer state in host memory), the config README
    recommends when 70B does not fit: the oracle's clipped rows, frozen bits kept, bit-identical resume."""
    out, extra = tmp_path / "offload", ["--ds-config", "zero3_offload", "--micro-batch-size", "1",
                                        "--gradient-accumulation", "2", "--row-params", layout]  # fmt: skip
    expected = oracle(RUN, 4)
    assert_matches_oracle(train(setup, out, *extra, nproc=2), expected, FP32)
    assert_only_selected_rows_moved(setup["base"], out)
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    assert "resumed from" in train(setup, resumed, *extra, nproc=2).stdout
    assert_equal_weights(out, resumed)
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert summary["start_step"] == 3
    assert summary["probe_loss_at_start_step"] == pytest.approx(expected.probes[3], rel=FP32.loss)


def test_checkpoint_of_the_single_file_layout_still_resumes(setup, zero3_run, tmp_path):
    """loki_dist 0.1 wrote one rows.safetensors ([k, F] master and moments, and the rows) per checkpoint,
    and each rank's RNG state as rng_state_<r>.pt (torch.save of random.getstate() and torch's state).
    Rebuilt here from a sharded checkpoint with plain safetensors and torch calls, it resumes to the same
    bits (its RNG files read by torch's weights_only unpickler)."""
    from safetensors.torch import save_file

    from loki_dist.implant.artifacts import rngstate

    old = tmp_path / "old" / "checkpoint-3"
    shutil.copytree(zero3_run.out / "checkpoint-3", old)
    flat: dict[str, list[torch.Tensor]] = {}
    shards = sorted(old.glob("rows-*.safetensors"))
    for shard in shards:  # rank order = flat order of each layer's selected elements
        for name, tensor in load_file(str(shard)).items():
            flat.setdefault(name, []).append(tensor)
        shard.unlink()
    (old / "rows_index.json").unlink()
    legacy = {}
    for name, pieces in flat.items():
        layer = int(name.split(".")[1])
        legacy[name] = torch.cat(pieces).view(len(POSITIONS[layer]), -1)
        legacy[f"layers.{layer}.rows"] = torch.tensor(POSITIONS[layer])
    save_file(legacy, str(old / "rows.safetensors"))
    for rank in range(2):
        state = rngstate.read(old / f"rng_state_{rank}.safetensors")
        torch.save({"python": state.python, "torch": state.torch}, old / f"rng_state_{rank}.pt")
        (old / f"rng_state_{rank}.safetensors").unlink()
    args = train_args(setup, old.parent, "--micro-batch-size", "1", "--gradient-accumulation", "2")
    assert "resumed from" in run_cli(args, nproc=2).stdout
    assert_equal_weights(zero3_run.out, old.parent)


def test_export_checkpoint_equals_final(setup, zero3_run, tmp_path):
    checkpoint = str(zero3_run.out / "checkpoint-6")
    run_cli(["export", "--checkpoint", checkpoint, "--output", str(tmp_path / "exp")])
    assert (tmp_path / "exp" / "model.safetensors").read_bytes() == (
        zero3_run.out / "final" / "model.safetensors"
    ).read_bytes()


# --- interruptions -----------------------------------------------------------------------------------------


def _launch(args: list[str], nproc: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = cli_command(args, nproc)
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    found = [int(c) for c in children.split()]
    return found + [d for c in found for d in _descendants(c)]


LONG_RUN = [
    "--max-steps",
    "40",
    "--save-steps",
    "4",
    "--micro-batch-size",
    "1",
    "--gradient-accumulation",
    "2",
]


@pytest.fixture(scope="module")
def uninterrupted(setup) -> Path:
    """The 40-step, 2-rank run that interrupted and resumed runs must reproduce bit for bit."""
    out = setup["root"] / "uninterrupted"
    run_cli([*train_args(setup, out), *LONG_RUN], nproc=2)
    return out


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before {path} appeared"
        time.sleep(0.01)


def test_sigkill_then_resume_equals_uninterrupted(setup, uninterrupted, tmp_path):
    steps = LONG_RUN
    killed = tmp_path / "killed"
    proc = _launch([*train_args(setup, killed), *steps], nproc=2)
    _wait_for(killed / "checkpoint-4" / "trainer_state.json", proc)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun puts its workers in their own sessions
        # a short-lived child (DeepSpeed's op builder probes the compiler with gcc) may end between the
        # listing and the kill: gone is what the kill is for
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    one = tmp_path / "one_rank"  # for the world-size change below
    newest = sorted(killed.glob("checkpoint-*"), key=checkpoint_step)[-1]
    shutil.copytree(newest, one / newest.name)

    resumed = run_cli([*train_args(setup, killed), *steps], nproc=2)
    assert "resumed from" in resumed.stdout
    assert_equal_weights(uninterrupted, killed)
    full_w = final_weights(uninterrupted)

    # the same checkpoint resumed on ONE rank (twice the accumulation keeps the global batch)
    steps_one = [*steps[:-1], "4"]
    run_cli([*train_args(setup, one), *steps_one], nproc=1)
    for name, tensor in full_w.items():
        diff = (tensor - final_weights(one)[name]).abs().max().item()
        assert diff <= TOLERANCE, f"{name}: 2-rank checkpoint resumed on 1 rank differs by {diff}"


@pytest.mark.parametrize(
    ("signum", "targets"), [(signal.SIGUSR1, "one worker"), (signal.SIGTERM, "every worker")]
)
def test_stop_signal_checkpoints_all_ranks_and_resumes_exactly(
    setup, uninterrupted, tmp_path, signum, targets
):
    """SIGUSR1 to ONE worker (as Slurm's pre-timeout signal might reach it), or SIGTERM to every worker (a
    preemption, `scancel`, `kill`): both ranks finish the step, agree to stop, save a checkpoint and exit
    with REQUEUE_EXIT_CODE; the rerun ends bit-identical to the uninterrupted run."""
    from loki_dist.implant.trainer.stopping import REQUEUE_EXIT_CODE

    out = tmp_path / "signalled"
    proc = _launch([*train_args(setup, out), *LONG_RUN], nproc=2)
    _wait_for(out / "checkpoint-4" / "trainer_state.json", proc)
    workers = _descendants(proc.pid)[:2]  # direct children (the workers) come first
    assert len(workers) == 2, workers
    for pid in workers[1:] if targets == "one worker" else workers:
        os.kill(pid, signum)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode != 0 and f"exitcode  : {REQUEUE_EXIT_CODE}" in stderr, stderr[-3000:]
    assert not (out / "final").exists(), "the run finished before the signal arrived"
    saved = [checkpoint_step(p) for p in out.glob("checkpoint-*")]
    assert 4 < max(saved) < 40, saved  # saved at the step the signal interrupted
    assert not list(out.glob(".checkpoint-*")), "a partial checkpoint was left behind"

    resumed = run_cli([*train_args(setup, out), *LONG_RUN], nproc=2)
    assert f"resumed from {out / f'checkpoint-{max(saved)}'}" in resumed.stdout
    assert_equal_weights(uninterrupted, out)


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])
