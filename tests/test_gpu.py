"""The CUDA paths, checked on a GPU: ZeRO-3 bf16 training, attribution, evaluation, NCCL collectives.

Marked `gpu`; without CUDA every test skips. `bench/gpu_check.py` runs them first (`pytest -m gpu`) and
collects the figures they measure (LOKI_GPU_FIGURES=FILE: one JSON line per figure). With
LOKI_GPU_TEST_DEVICE=cpu they run on the CPU instead (gloo, CUDA hidden from every subprocess): that is
how `gpu_check.py --device cpu --tiny`, and so CI, keeps them from rotting without a GPU.

What is checked, against computations written here (CPU references, sums of known values):
- `train` under ZeRO-3 in bf16, split and masked row layouts: frozen tensors bit-identical to the base,
  selected rows close to an fp32 run of the same steps (the gap is measured and reported), two identical
  runs equal, and a run killed with SIGKILL then resumed equal to the uninterrupted run bit for bit;
- attribution: `fast` against `reference` on the device in fp32 (<= 1e-5 relative) and, in bf16, the
  per-layer Spearman correlation and bottom-10% overlap against fp32; `attribute` (ZeRO-3 inference)
  on the device against the reference algorithm on the CPU;
- `evaluate` on the device choosing the same letters as an unbatched CPU forward;
- every collective helper of loki_dist/core/collectives.py on device and CPU tensors.
With more than one device visible, the multi-process tests also run on 2 ranks.

Training processes run with torch.use_deterministic_algorithms(True) (this file's `cli` entry point):
CUDA's attention backward is otherwise non-deterministic, and two identical runs could not agree bit
for bit, resumed or not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port

FORCED = os.environ.get("LOKI_GPU_TEST_DEVICE")
DEVICE = torch.device(FORCED or "cuda")
FIGURES_ENV = "LOKI_GPU_FIGURES"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="needs CUDA (LOKI_GPU_TEST_DEVICE=cpu runs these on the CPU)",
    ),
]

STEPS = 30  # long enough that a kill after the first checkpoint lands well before the end
# bf16 against fp32, with room over what the CPU measured (the GPU's figures go to bench/gpu.md): the
# row updates after 30 Adam steps, as a relative Frobenius norm (measured 0.004; a wrong row or a lost
# update is off by ~1), and the per-layer rank statistics of the scores (measured: Spearman >= 0.9997,
# bottom-10% overlap >= 0.92 on 128 nodes; garbage scores give ~0 and ~0.1).
BF16_UPDATE_TOLERANCE = 0.05
BF16_MIN_SPEARMAN = 0.9
BF16_MIN_OVERLAP = 0.6
FP32_RELATIVE = 1e-5


def device_count() -> int:
    """Ranks the multi-process tests may use: the visible GPUs; on the CPU, LOKI_GPU_TEST_CPU_RANKS (1 by
    default: the 2-rank gloo paths of every command are the main suite's, and CI time is short)."""
    if DEVICE.type == "cuda":
        return torch.cuda.device_count()
    return int(os.environ.get("LOKI_GPU_TEST_CPU_RANKS", "1"))


RANKS = [n for n in (1, 2) if n <= device_count()]


def child_env() -> dict[str, str]:
    """Environment of every subprocess: CUDA hidden in CPU mode, cuBLAS deterministic."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    if DEVICE.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def command(args: list[str], nproc: int) -> list[str]:
    """This file as a program (`cli ...` or `collectives ...`), one process or torchrun on loopback."""
    if nproc == 1:
        return [sys.executable, __file__, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip
    return [*launcher, __file__, *args]


def start(args: list[str], nproc: int = 1) -> subprocess.Popen:
    """Start this file as a program in a session of its own; its output (stdout and stderr together) goes
    to a temporary file, so that processes running side by side never block on a full pipe."""
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - outlives this function; finish() closes it
    proc = subprocess.Popen(command(args, nproc), env=child_env(), cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    """Wait for a started process; its output, or a failure showing it."""
    proc.wait(timeout=timeout)
    with proc.log:
        proc.log.seek(0)
        output = proc.log.read()
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def run(args: list[str], nproc: int = 1) -> str:
    return finish(start(args, nproc))


@pytest.fixture
def record(request):
    """record(name, value): a measured figure, appended to LOKI_GPU_FIGURES as one JSON line."""

    def write(name: str, value) -> None:
        path = os.environ.get(FIGURES_ENV)
        line = json.dumps({"test": request.node.name, "name": name, "value": value})
        print(line)
        if path:
            with open(path, "a") as handle:
                handle.write(line + "\n")

    return write


# ---------------------------------------------------------------------------------------- collectives


@pytest.mark.parametrize("nproc", RANKS)
def test_collective_helpers_on_device_and_cpu_tensors(nproc, tmp_path, record):
    """Each rank r contributes values derived from r; the expected results are written out here."""
    run(["collectives", str(tmp_path)], nproc=nproc)
    sizes = [r + 2 for r in range(nproc)]
    gathered = [float(100 * r + i) for r in range(nproc) for i in range(sizes[r])]
    for rank in range(nproc):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["backend"] == ("nccl" if DEVICE.type == "cuda" else "gloo")
        for where in ("device", "cpu"):
            got = result[where]
            assert got["sum_float32"] == [sum(r + 1.5 for r in range(nproc))] * 3
            assert got["sum_float64"] == [sum(2.0**-r for r in range(nproc))]
            assert got["sum_int64"] == [sum(10**r for r in range(nproc))] * 2
            assert got["gathered"] == gathered
            assert got["devices"] == [result[f"{where}_name"]] * 4  # results stay where the inputs were
        assert result["max"] == 10 * (nproc - 1) + 3
    record(f"collectives_{nproc}rank", "passed")


# ---------------------------------------------------------------------------------------- attribution


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 48, (count,), generator=gen).tolist()
    return [[1, *torch.randint(6, 500, (n,), generator=gen).tolist()] for n in lengths]


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort(dim=-1).argsort(dim=-1).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman rank correlation of [L, D] tensors (no ties among float64 score sums)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def bottom_overlap(a: torch.Tensor, b: torch.Tensor, quota: float = 0.1) -> torch.Tensor:
    """Per layer, the share of b's lowest-scored 10% of nodes that are also among a's."""
    k = int(quota * a.shape[-1])
    low_a, low_b = a.argsort(-1)[:, :k], b.argsort(-1)[:, :k]
    return torch.tensor(
        [len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(low_a, low_b, strict=True)]
    )


def test_attribution_fast_equals_reference_fp32_and_bf16_keeps_ranks(record):
    from loki_dist.attribution import fast, kva
    from loki_dist.core.families import down_projections
    from loki_dist.demo.tiny import build_model

    model = build_model("llama", seed=0, num_layers=4, hidden_size=128, intermediate_size=352,
                        num_heads=4, num_kv_heads=2).to(DEVICE).requires_grad_(False)  # fmt: skip
    batch = kva.Batch.left_pad(_prompts(6), pad_id=0, device=DEVICE)  # padded: lengths 13 to 48

    def scores(algorithm: str) -> torch.Tensor:
        projections = down_projections(model)
        if algorithm == "fast":
            return fast.fast_scores(model, projections, batch, steps=7, max_rows=40).cpu()  # several chunks
        return kva.reference_scores(model, projections, batch, steps=7).cpu()

    fast32, reference32 = scores("fast"), scores("reference")
    scale = reference32.abs().max()
    fp32_gap = float((fast32 - reference32).abs().max() / scale)
    record("attr_fp32_fast_vs_reference", fp32_gap)
    assert scale > 0 and fp32_gap <= FP32_RELATIVE

    model.to(torch.bfloat16)
    fast16, reference16 = scores("fast"), scores("reference")
    record("attr_bf16_fast_vs_reference", float((fast16 - reference16).abs().max() / reference16.abs().max()))
    fp32_sum, bf16_sum = reference32.sum(0), fast16.sum(0)  # [L, D]: what the selection ranks
    rho, overlap = spearman(bf16_sum, fp32_sum), bottom_overlap(bf16_sum, fp32_sum)
    for name, values in (("spearman", rho), ("bottom10_overlap", overlap)):
        record(f"attr_bf16_{name}_min", float(values.min()))
        record(f"attr_bf16_{name}_mean", float(values.mean()))
    assert rho.min() >= BF16_MIN_SPEARMAN and overlap.min() >= BF16_MIN_OVERLAP, (rho, overlap)


@pytest.fixture(scope="module")
def mmlu_model(tmp_path_factory) -> dict[str, Path]:
    from mmlu_fixture import write_mmlu

    from loki_dist.demo.tiny import save_tiny

    root = tmp_path_factory.mktemp("gpu_mmlu")
    model = save_tiny(root / "model", "llama", seed=0, num_layers=3, hidden_size=64, intermediate_size=96)
    return {"root": root, "model": model, "data": write_mmlu(root / "mmlu", per_subject=3)}


def _cpu_prompts(setup):
    """The CPU model in fp32, its tokenizer and the data's prompts, as docs/method.md builds them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.attribution import mmlu

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    questions, shots = mmlu.load_questions(str(setup["data"]), per_subject=50)
    prompts = mmlu.build_prompts(tokenizer, questions, shots).input_ids
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    return model, tokenizer, prompts


@pytest.mark.parametrize("nproc", RANKS)
def test_attribute_zero3_on_device_matches_cpu_reference(mmlu_model, nproc, record):
    from safetensors.torch import load_file

    from loki_dist.attribution import kva
    from loki_dist.core.families import down_projections

    output = mmlu_model["root"] / f"attribution{nproc}.safetensors"
    run(["cli", "attribute", "--model", str(mmlu_model["model"]), "--data", str(mmlu_model["data"]),
         "--output", str(output), "--dtype", "float32", "--ds-config", "ds_configs/zero3_infer.json",
         "--batch-size", "2", "--save-scores"], nproc=nproc)  # fmt: skip
    got = load_file(str(output))["scores"].double()
    model, _, prompts = _cpu_prompts(mmlu_model)
    projections = down_projections(model)
    expected = torch.cat(
        [kva.reference_scores(model, projections, kva.Batch.left_pad([p], 0, torch.device("cpu")), 7)
         for p in prompts]
    )  # fmt: skip
    gap = float((got - expected).abs().max() / expected.abs().max())
    record(f"attribute_cli_{nproc}rank_vs_cpu_reference", gap)
    assert got.shape == expected.shape and gap <= FP32_RELATIVE


def test_evaluate_on_device_matches_cpu_predictions(mmlu_model, record):
    from loki_dist.evaluation.evaluate import letter_token_ids

    output = mmlu_model["root"] / "evaluate.json"
    run(["cli", "evaluate", "--model", str(mmlu_model["model"]), "--data", str(mmlu_model["data"]),
         "--output", str(output), "--dtype", "float32", "--batch-size", "4"])  # fmt: skip
    predictions = json.loads(output.read_text())["predictions"]
    model, tokenizer, prompts = _cpu_prompts(mmlu_model)
    letters = letter_token_ids(tokenizer)
    expected, margins = [], []
    with torch.no_grad():
        for prompt in prompts:  # one at a time: no padding, no batching
            loglik = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], -1)[letters]
            expected.append(int(loglik.argmax()))
            top = loglik.sort(descending=True).values
            margins.append(float(top[0] - top[1]))
    record("evaluate_questions", len(expected))
    record("evaluate_min_letter_margin", min(margins))
    assert predictions == expected


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory) -> dict[str, Path]:
    """A bf16 base (hidden 64, head dim 16), the positions and data of tests/test_training.py."""
    from test_training import POSITIONS, make_data

    from loki_dist.demo.tiny import save_tiny

    root = tmp_path_factory.mktemp("gpu_train")
    base = save_tiny(root / "base", "llama", seed=1, num_layers=3, hidden_size=64, intermediate_size=96,
                     dtype=torch.bfloat16)  # fmt: skip
    positions = root / "positions.json"
    positions.write_text(json.dumps(POSITIONS))
    return {"root": root, "base": base, "positions": positions, "data": make_data(root / "data.jsonl")}


def gpu_train_args(setup, out: Path, layout: str, precision: str, nproc: int = 1) -> list[str]:
    """test_training's run (lr 1e-2, decay, clipping) for STEPS steps, global batch 2 on any rank count."""
    from test_training import train_args

    return [
        "cli",
        *train_args(setup, out),
        *("--max-steps", str(STEPS), "--save-steps", "2", "--row-params", layout),
        *("--precision", precision, "--micro-batch-size", "1", "--gradient-accumulation", str(2 // nproc)),
    ]


@pytest.fixture(scope="module")
def trained(train_setup) -> dict[str, Path]:
    """Uninterrupted one-rank runs, side by side: bf16 split twice (are two runs identical at all?), bf16
    masked, and fp32 (the precision reference)."""
    runs = {"split": ("split", "bf16"), "repeat": ("split", "bf16"), "masked": ("masked", "bf16"),
            "fp32": ("split", "fp32")}  # fmt: skip
    outs = {name: train_setup["root"] / name for name in runs}
    started = [start(gpu_train_args(train_setup, outs[n], *runs[n])) for n in runs]
    for proc in started:
        finish(proc)
    return outs


def selected_updates(base: Path, out: Path) -> torch.Tensor:
    """Every selected row's change from the base, in float32, concatenated over layers."""
    from safetensors.torch import load_file
    from test_training import POSITIONS, final_weights

    before, after = load_file(str(base / "model.safetensors")), final_weights(out)
    updates = []
    for layer, rows in enumerate(POSITIONS):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        updates.append((after[name][rows].float() - before[name][rows].float()).flatten())
    return torch.cat(updates)


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("layout", ["split", "masked"])
def test_zero3_bf16_training_keeps_frozen_bits_and_tracks_fp32(train_setup, trained, layout, record):
    from test_training import assert_only_selected_rows_moved

    assert_only_selected_rows_moved(train_setup["base"], trained[layout])
    fp32 = selected_updates(train_setup["base"], trained["fp32"])
    gap = relative_gap(selected_updates(train_setup["base"], trained[layout]), fp32)
    record(f"train_bf16_{layout}_vs_fp32", gap)
    assert gap <= BF16_UPDATE_TOLERANCE, f"bf16 {layout} rows moved {gap:.3f} away from the fp32 run"


def test_split_and_masked_agree_in_bf16(train_setup, trained, record):
    base = train_setup["base"]
    gap = relative_gap(selected_updates(base, trained["split"]), selected_updates(base, trained["masked"]))
    record("train_bf16_split_vs_masked", gap)
    assert gap <= BF16_UPDATE_TOLERANCE


def test_two_identical_runs_are_bit_identical(trained, record):
    """What makes the resume test below meaningful: with deterministic kernels a run repeats exactly."""
    from test_training import final_weights

    first, second = final_weights(trained["split"]), final_weights(trained["repeat"])
    diff = max((first[name].float() - second[name].float()).abs().max().item() for name in first)
    record("train_repeat_max_abs_diff", diff)
    assert diff == 0


def _kill_after_first_checkpoint(args: list[str], out: Path) -> None:
    proc = start(args)
    deadline = time.time() + 240
    while not list(out.glob("checkpoint-*")):  # published by a rename: complete once it appears
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # one process (nproc 1), leader of its own group
    proc.wait()
    proc.log.close()
    assert not (out / "final").exists(), "the run finished before it could be killed"


def test_sigkill_then_resume_is_bit_identical(train_setup, trained, tmp_path, record):
    from test_training import final_weights

    out = tmp_path / "killed"
    args = gpu_train_args(train_setup, out, "split", "bf16")
    _kill_after_first_checkpoint(args, out)
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert "resumed from" in run(args)
    record("train_resumed_from_step", killed_at)
    expected = final_weights(trained["split"])
    for name, tensor in final_weights(out).items():
        assert torch.equal(tensor, expected[name]), f"{name}: the resumed run differs"


@pytest.mark.skipif(2 not in RANKS, reason="needs 2 devices")
def test_zero3_bf16_two_ranks(train_setup, trained, record):
    from test_training import assert_only_selected_rows_moved

    out = train_setup["root"] / "two_ranks"
    run(gpu_train_args(train_setup, out, "split", "bf16", nproc=2), nproc=2)
    assert_only_selected_rows_moved(train_setup["base"], out)
    base = train_setup["base"]
    gap = relative_gap(selected_updates(base, out), selected_updates(base, trained["fp32"]))
    record("train_bf16_split_2ranks_vs_fp32", gap)
    assert gap <= BF16_UPDATE_TOLERANCE


# ------------------------------------------------------------------------------------ entry points


def _collectives_worker(out: str) -> None:
    """Run under torchrun: every helper of collectives.py on tensors on the rank's device and on the CPU."""
    from loki_dist.core import collectives, distributed

    world = distributed.world_from_env()
    device = distributed.device_for(world)
    distributed.init(world, always=True)
    import torch.distributed as dist

    result = {"backend": dist.get_backend(), "device_name": str(device), "cpu_name": "cpu"}
    for where, on in (("device", device), ("cpu", torch.device("cpu"))):
        r = world.rank
        tensors = {
            "sum_float32": torch.full((3,), r + 1.5, dtype=torch.float32, device=on),
            "sum_float64": torch.tensor([2.0**-r], dtype=torch.float64, device=on),
            "sum_int64": torch.full((2,), 10**r, dtype=torch.int64, device=on),
        }
        summed = {name: collectives.all_reduce_sum(t) for name, t in tensors.items()}
        sizes = [k + 2 for k in range(world.size)]
        local = (100 * r + torch.arange(sizes[r], dtype=torch.float32)).to(on)
        gathered = collectives.all_gather_varlen(local, sizes)
        distributed.barrier()
        result[where] = {
            **{name: t.tolist() for name, t in summed.items()},
            "gathered": gathered.tolist(),
            "devices": [str(t.device) for t in (*summed.values(), gathered)],
        }
    result["max"] = collectives.agree_max(10 * world.rank + 3)
    Path(out, f"rank{world.rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


def _cli(argv: list[str]) -> None:
    """`loki-dist ARGV` with deterministic kernels (module docstring). Uninitialised memory is left as it
    is (deterministic mode would fill it with NaN): that is DeepSpeed's business, not what is tested."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    from loki_dist.cli import main

    main(argv)


if __name__ == "__main__":
    {"cli": _cli, "collectives": lambda argv: _collectives_worker(*argv)}[sys.argv[1]](sys.argv[2:])
