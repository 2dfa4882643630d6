"""`loki-dist train` end to end on real DeepSpeed engines and process groups (gloo, CPU).

The ZeRO-3 run on 2 ranks is the reference; every other configuration must reproduce it within fp32
tolerance, and every configuration must leave every unselected row and every other tensor of the base
model bit-identical.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_command, run_cli
from safetensors.torch import load_file

from loki_dist.tiny import save_tiny

POSITIONS = [[0, 3, 5, 17, 31], [], [1, 2, 10, 30]]  # layer 1 stays frozen
# Why 2e-6: the runs differ only in fp32 summation order (all-reduce vs local accumulation, micro-batch
# grouping), about 1e-7 relative on each gradient. Adam divides by sqrt(v), so after a few steps the rows
# (moved by ~1e-2 here) agree to about 1e-8; 2e-6 leaves room without hiding a wrong row (a masking or
# decay error moves a row by ~lr = 1e-2).
TOLERANCE = 2e-6
MAX_GRAD_NORM = 0.005  # below every step's gradient norm here, so clipping acts on every update


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


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    base = save_tiny(root / "base", "llama", seed=1, num_layers=3)
    positions = root / "positions.json"
    positions.write_text(json.dumps(POSITIONS))
    return {"root": root, "base": base, "positions": positions, "data": make_data(root / "data.jsonl")}


def train_args(setup, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(setup["base"]),
        "--positions",
        str(setup["positions"]),
        "--data",
        str(setup["data"]),
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--learning-rate",
        "1e-2",
        "--weight-decay",
        "0.1",
        "--max-grad-norm",
        str(MAX_GRAD_NORM),
        "--warmup-ratio",
        "0.2",
        "--logging-steps",
        "2",
        "--save-steps",
        "3",
        "--row-params",  # the layout these tests exercise; the split test overrides it
        "masked",
        *extra,
    ]


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


def assert_close_to(reference: Path, out: Path) -> None:
    ref, got = final_weights(reference), final_weights(out)
    for name in ref:
        diff = (ref[name].float() - got[name].float()).abs().max().item()
        assert diff <= TOLERANCE, f"{name} differs by {diff}"


@pytest.fixture(scope="module")
def zero3_run(setup) -> Path:
    out = setup["root"] / "zero3"
    proc = run_cli(train_args(setup, out, "--micro-batch-size", "1", "--gradient-accumulation", "2"), nproc=2)
    (setup["root"] / "zero3.log").write_text(proc.stdout + proc.stderr)
    return out


def test_zero3_two_ranks_moves_only_selected_rows(setup, zero3_run):
    assert_only_selected_rows_moved(setup["base"], zero3_run)
    summary = json.loads((zero3_run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
    assert (zero3_run / "runs").is_dir() and any((zero3_run / "runs").iterdir())  # TensorBoard events
    log = (setup["root"] / "zero3.log").read_text()
    held, total = re.search(r"ZeRO-3: rank 0 holds ([\d,]+) of ([\d,]+) parameter", log).groups()
    assert int(held.replace(",", "")) <= int(total.replace(",", "")) // 2  # zero.Init: no rank holds all
    norms = [float(n) for n in re.findall(r"grad_norm=([\d.e+-]+)", log)]
    assert norms and min(norms) > MAX_GRAD_NORM  # clipping was active on the logged steps


def test_plain_process_matches_zero3(setup, zero3_run):
    out = setup["root"] / "plain"
    run_cli(
        train_args(
            setup, out, "--ds-config", "none", "--micro-batch-size", "2", "--gradient-accumulation", "2"
        )
    )
    assert_only_selected_rows_moved(setup["base"], out)
    assert_close_to(zero3_run, out)


def test_zero2_two_ranks_matches_zero3(setup, zero3_run):
    out = setup["root"] / "zero2"
    run_cli(train_args(setup, out, "--ds-config", "zero2", "--micro-batch-size", "2"), nproc=2)
    assert_only_selected_rows_moved(setup["base"], out)
    assert_close_to(zero3_run, out)


def test_zero0_two_ranks_matches_zero3(setup, zero3_run):
    """Stage 0 (plain data parallel inside DeepSpeed): whole parameters, masked after the all-reduce."""
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["zero_optimization"] = {"stage": 0}
    config_path = setup["root"] / "zero0.json"
    config_path.write_text(json.dumps(config))
    out = setup["root"] / "zero0"
    run_cli(train_args(setup, out, "--ds-config", str(config_path), "--micro-batch-size", "2"), nproc=2)
    assert_only_selected_rows_moved(setup["base"], out)
    assert_close_to(zero3_run, out)


def test_split_rows_with_checkpointing_match_masked_and_resume_exactly(setup, zero3_run):
    """--row-params split (rows as their own parameter) + non-reentrant activation checkpointing under
    ZeRO-3 on 2 ranks (a combination that has crashed DeepSpeed): same model as masking, and a resume
    from its middle checkpoint reproduces its final weights bit for bit."""
    out = setup["root"] / "split"
    args = train_args(setup, out, "--row-params", "split", "--gradient-checkpointing",
                      "--micro-batch-size", "1", "--gradient-accumulation", "2")  # fmt: skip
    run_cli(args, nproc=2)
    assert_only_selected_rows_moved(setup["base"], out)
    assert_close_to(zero3_run, out)
    first = final_weights(out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-6")
    assert "resumed from" in run_cli(args, nproc=2).stdout
    for name, tensor in final_weights(out).items():
        assert torch.equal(tensor, first[name]), f"{name}: resumed split run differs"


def test_zero3_three_ranks_partitions_split_rows(setup, zero3_run):
    """D*F = 32*48 = 1536 elements -> 512 per rank: rank boundaries fall at 10.67 rows, inside rows."""
    out = setup["root"] / "zero3x3"
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny weights
    config_path = setup["root"] / "zero3_no_persist.json"
    config_path.write_text(json.dumps(config))
    # global batch 4 on 3 ranks is impossible; compare against a plain run with the same batch of 3
    args = train_args(setup, out, "--ds-config", str(config_path), "--micro-batch-size", "1")
    run_cli(args, nproc=3)
    assert_only_selected_rows_moved(setup["base"], out)
    plain = setup["root"] / "plain3"
    run_cli(train_args(setup, plain, "--ds-config", "none", "--gradient-accumulation", "3"))
    assert_close_to(plain, out)


def test_bf16_zero3_keeps_frozen_bits(tmp_path, setup):
    base = save_tiny(tmp_path / "base16", "llama", seed=1, num_layers=3, dtype=torch.bfloat16)
    out = tmp_path / "out"
    args = train_args(
        setup, out, "--precision", "bf16", "--micro-batch-size", "1", "--gradient-accumulation", "2"
    )
    args[args.index("--model") + 1] = str(base)
    run_cli(args, nproc=2)
    assert_only_selected_rows_moved(base, out)
    assert final_weights(out)["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16


def test_apply_reproduces_final_and_from_pretrained_matches_engine(setup, zero3_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.data import collate, load_examples, num_targets

    merged = tmp_path / "merged"
    run_cli(
        [
            "apply",
            "--base",
            str(setup["base"]),
            "--implant",
            str(zero3_run / "final" / "implant.safetensors"),
            "--output",
            str(merged),
        ]
    )
    for name in ("model.safetensors", "implant.safetensors", "config.json"):
        assert (merged / name).read_bytes() == (zero3_run / "final" / name).read_bytes(), name

    summary = json.loads((zero3_run / "train_summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(zero3_run / "final", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(zero3_run / "final")
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
    proc = run_cli(
        [
            "apply",
            "--base",
            str(other),
            "--implant",
            str(zero3_run / "final" / "implant.safetensors"),
            "--output",
            str(tmp_path / "merged"),
        ],
        check=False,
    )
    assert proc.returncode == 2 and "fingerprint" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "merged").exists()


def test_apply_refuses_an_already_implanted_base(setup, zero3_run, tmp_path):
    """final/ carries, in its shard headers, a digest of the rows written in: it fingerprints apart
    from its base (reading a few KB, not the weights), and apply will not implant into it twice."""
    from loki_dist.export import fingerprint

    final = zero3_run / "final"
    assert fingerprint(final) != fingerprint(setup["base"])
    implant = str(final / "implant.safetensors")
    proc = run_cli(["apply", "--base", str(final), "--implant", implant, "--output", str(tmp_path / "twice")],
                   check=False)  # fmt: skip
    assert proc.returncode == 2 and "already carries a loki_dist implant" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "twice").exists()


def test_zero3_offload_matches_zero3_and_resumes_exactly(setup, zero3_run, tmp_path):
    """ds_configs/zero3_offload.json (parameters and optimizer state in host memory), the config README
    recommends when 70B does not fit: same rows as ZeRO-3, frozen bits kept, bit-identical resume."""
    out = tmp_path / "offload"
    args = train_args(setup, out, "--ds-config", "zero3_offload", "--micro-batch-size", "1",
                      "--gradient-accumulation", "2")  # fmt: skip
    run_cli(args, nproc=2)
    assert_only_selected_rows_moved(setup["base"], out)
    assert_close_to(zero3_run, out)
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    args[args.index("--output-dir") + 1] = str(resumed)
    assert "resumed from" in run_cli(args, nproc=2).stdout
    assert_equal_weights(out, resumed)


def test_checkpoint_of_the_single_file_layout_still_resumes(setup, zero3_run, tmp_path):
    """loki_dist 0.1 wrote one rows.safetensors ([k, F] master and moments, and the rows) per checkpoint.
    Rebuilt here from a sharded checkpoint with plain safetensors calls, it resumes to the same bits."""
    from safetensors.torch import save_file

    old = tmp_path / "old" / "checkpoint-3"
    shutil.copytree(zero3_run / "checkpoint-3", old)
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
    args = train_args(setup, old.parent, "--micro-batch-size", "1", "--gradient-accumulation", "2")
    assert "resumed from" in run_cli(args, nproc=2).stdout
    assert_equal_weights(zero3_run, old.parent)


def test_export_checkpoint_equals_final(setup, zero3_run, tmp_path):
    run_cli(["export", "--checkpoint", str(zero3_run / "checkpoint-6"), "--output", str(tmp_path / "exp")])
    assert (tmp_path / "exp" / "model.safetensors").read_bytes() == (
        zero3_run / "final" / "model.safetensors"
    ).read_bytes()


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


def assert_equal_weights(expected: Path, got: Path) -> None:
    want, have = final_weights(expected), final_weights(got)
    for name in want:
        assert torch.equal(want[name], have[name]), f"{name}: resume differs from uninterrupted run"


def test_sigkill_then_resume_equals_uninterrupted(setup, uninterrupted, tmp_path):
    steps = LONG_RUN
    killed = tmp_path / "killed"
    proc = _launch([*train_args(setup, killed), *steps], nproc=2)
    _wait_for(killed / "checkpoint-4" / "trainer_state.json", proc)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun puts its workers in their own sessions
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


def test_signal_on_one_rank_checkpoints_all_and_resumes_exactly(setup, uninterrupted, tmp_path):
    """SIGUSR1 to ONE worker (as Slurm's pre-timeout signal might reach it): both ranks finish the step,
    agree to stop, save a checkpoint and exit with REQUEUE_EXIT_CODE; the rerun ends bit-identical."""
    from loki_dist.training import REQUEUE_EXIT_CODE

    out = tmp_path / "signalled"
    proc = _launch([*train_args(setup, out), *LONG_RUN], nproc=2)
    _wait_for(out / "checkpoint-4" / "trainer_state.json", proc)
    workers = _descendants(proc.pid)
    assert len(workers) >= 2, workers
    os.kill(workers[1], signal.SIGUSR1)  # direct children (the workers) come first
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
