"""The CUDA paths, checked on a GPU: ZeRO-3 bf16 training (with CPU offload too), the ZeRO-3 loader,
attribution, evaluation, NCCL collectives.

Marked `gpu`; without CUDA every test skips. `bench/gpu_check.py` runs them first (`pytest -m gpu`) and
collects the figures they measure (LOKI_GPU_FIGURES=FILE: one JSON line per figure). With
LOKI_GPU_TEST_DEVICE=cpu they run on the CPU instead (gloo, CUDA hidden from every subprocess): that is
how `gpu_check.py --device cpu --tiny`, and so CI, keeps them from rotting without a GPU.

Every process these tests check is started at once by one fixture (`launched`, tests/gpu_launch.py),
before the first test: on one GPU they share it, and the whole takes about its slowest process plus a
resume, not six process starts in a row. The tests come most valuable first (training, then loading,
attribution, evaluation, collectives), so a run cut short by gpu_check's budget has checked the most.

What is checked, against computations written here (CPU references, sums of known values):
- `train` under ZeRO-3 in bf16, split and masked row layouts: frozen tensors bit-identical to the base,
  selected rows close to an fp32 run of the same steps (the gap is measured and reported), two identical
  runs equal, a run killed with SIGKILL then resumed equal to the uninterrupted run bit for bit, and the
  split layout under `zero3_offload` (its row parameters partitioned by the run's own DeepSpeed config);
- loading: the model built empty under zero.Init and filled from safetensors slices
  (core/zero3_load.py) holds on the device exactly what transformers' whole load reads;
- attribution: `fast` against `reference` on the device in fp32 (<= 1e-5 relative) and, in bf16, the
  per-layer Spearman correlation and bottom-10% overlap against fp32; `attribute` (ZeRO-3 inference)
  on the device against the reference algorithm on the CPU;
- `evaluate` on the device choosing the same letters as an unbatched CPU forward;
- every collective helper of loki_dist/core/collectives.py on device and CPU tensors: sums, the int64
  sums of uint8 counts and the point-to-point streams to rank 0 that attribution ends with, the
  variable-length gathers.
With two devices visible the collectives, `attribute` and a ZeRO-3 training also run on 2 ranks over
NCCL. One GPU cannot show those: NCCL refuses two ranks on one device ("Duplicate GPU detected", NCCL
2.5 and later), so on one GPU they run on 1 rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from gpu_launch import DEVICE, Launch

FIGURES_ENV = "LOKI_GPU_FIGURES"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="needs CUDA (LOKI_GPU_TEST_DEVICE=cpu runs these on the CPU)",
    ),
]

STEPS = 8  # checkpoints at 2, 4, 6: a kill after the first one lands well before the end
# bf16 against fp32, with room over what the CPU measured (the GPU's figures go to bench/gpu.md): the
# row updates after STEPS Adam steps, as a relative Frobenius norm (measured 0.004 after 30 steps; a
# wrong row or a lost update is off by ~1), and the per-layer rank statistics of the scores (measured:
# Spearman >= 0.9997, bottom-10% overlap >= 0.92 on 128 nodes; garbage scores give ~0 and ~0.1).
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
ZERO3_INFER = ["--ds-config", "ds_configs/zero3_infer.json"]
# the uninterrupted training runs: name -> (row layout, precision, extra flags)
TRAINED = {"split": ("split", "bf16", []), "repeat": ("split", "bf16", []),
           "masked": ("masked", "bf16", []), "fp32": ("split", "fp32", []),
           "offload": ("split", "bf16", ["--ds-config", "zero3_offload"])}  # fmt: skip


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


# ------------------------------------------------------------------------------ inputs, one launcher


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A bf16 base (hidden 64, head dim 16) with tests/test_training.py's positions and data; an fp32
    model and MMLU-layout questions for attribution and evaluation."""
    from mmlu_fixture import write_mmlu
    from test_training import POSITIONS, make_data

    from loki_dist.demo.tiny import save_tiny

    root = tmp_path_factory.mktemp("gpu")
    base = save_tiny(root / "base", "llama", seed=1, num_layers=3, hidden_size=64, intermediate_size=96,
                     dtype=torch.bfloat16)  # fmt: skip
    positions = root / "positions.json"
    positions.write_text(json.dumps(POSITIONS))
    model = save_tiny(root / "model", "llama", seed=0, num_layers=3, hidden_size=64, intermediate_size=96,
                      max_shard_size="20KB")  # fmt: skip
    return {"root": root, "base": base, "positions": positions, "data": make_data(root / "data.jsonl"),
            "model": model, "mmlu": write_mmlu(root / "mmlu", per_subject=3)}  # fmt: skip


def gpu_train_args(setup, out: Path, layout: str, precision: str, nproc: int = 1) -> list[str]:
    """test_training's run (lr 1e-2, decay, clipping) for STEPS steps, global batch 2 on any rank count."""
    from test_training import train_args

    return [
        "cli",
        *train_args(setup, out),
        *("--max-steps", str(STEPS), "--save-steps", "2", "--row-params", layout),
        *("--precision", precision, "--micro-batch-size", "1", "--gradient-accumulation", str(2 // nproc)),
    ]


def attribute_args(setup, nproc: int) -> list[str]:
    output = setup["root"] / f"attribution{nproc}.safetensors"
    return ["cli", "attribute", "--model", str(setup["model"]), "--data", str(setup["mmlu"]),
            "--output", str(output), "--dtype", "float32", *ZERO3_INFER, "--batch-size", "2",
            "--save-scores"]  # fmt: skip


@pytest.fixture(scope="module")
def launched(setup):
    """Every process of this file, started at once; the killed run is killed after its first checkpoint
    and resumed here, while the others run."""
    root, launch = setup["root"], Launch()
    killed = gpu_train_args(setup, root / "killed", "split", "bf16")
    launch.start("killed", killed)
    for name, (layout, precision, extra) in TRAINED.items():
        launch.start(name, [*gpu_train_args(setup, root / name, layout, precision), *extra])
    launch.start("load", ["load", str(root / "load.json"), str(setup["model"])])
    for nproc in RANKS:
        launch.start(f"attribute{nproc}", attribute_args(setup, nproc), nproc=nproc)
        (root / f"collectives{nproc}").mkdir()
        launch.start(f"collectives{nproc}", ["collectives", str(root / f"collectives{nproc}")], nproc=nproc)
    launch.start("evaluate", ["cli", "evaluate", "--model", str(setup["model"]), "--data", str(setup["mmlu"]),
                              "--output", str(root / "evaluate.json"), "--dtype", "float32",
                              "--batch-size", "4"])  # fmt: skip
    if 2 in RANKS:
        launch.start(
            "two_ranks", gpu_train_args(setup, root / "two_ranks", "split", "bf16", nproc=2), nproc=2
        )
    try:
        launch.kill_after_first_checkpoint("killed", root / "killed")
        launch.start("resumed", killed)
        yield launch
    finally:
        launch.stop()


def trained(setup, launched, name: str) -> Path:
    launched.output(name)
    return setup["root"] / name


# ------------------------------------------------------------------------------------------- training


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
def test_zero3_bf16_training_keeps_frozen_bits_and_tracks_fp32(setup, launched, layout, record):
    from test_training import assert_only_selected_rows_moved

    out = trained(setup, launched, layout)
    assert_only_selected_rows_moved(setup["base"], out)
    fp32 = selected_updates(setup["base"], trained(setup, launched, "fp32"))
    gap = relative_gap(selected_updates(setup["base"], out), fp32)
    record(f"train_bf16_{layout}_vs_fp32", gap)
    assert gap <= BF16_UPDATE_TOLERANCE, f"bf16 {layout} rows moved {gap:.3f} away from the fp32 run"


def test_split_and_masked_agree_in_bf16(setup, launched, record):
    base = setup["base"]
    split, masked = (selected_updates(base, trained(setup, launched, n)) for n in ("split", "masked"))
    gap = relative_gap(split, masked)
    record("train_bf16_split_vs_masked", gap)
    assert gap <= BF16_UPDATE_TOLERANCE


def test_two_identical_runs_are_bit_identical(setup, launched, record):
    """What makes the resume test below meaningful: with deterministic kernels a run repeats exactly."""
    from test_training import final_weights

    first, second = (final_weights(trained(setup, launched, n)) for n in ("split", "repeat"))
    diff = max((first[name].float() - second[name].float()).abs().max().item() for name in first)
    record("train_repeat_max_abs_diff", diff)
    assert diff == 0


def test_sigkill_then_resume_is_bit_identical(setup, launched, record):
    from test_training import final_weights

    out = setup["root"] / "killed"
    assert "resumed from" in launched.output("resumed")
    resumed_from = int(
        launched.output("resumed").split("resumed from ")[1].split("checkpoint-")[1].split()[0]
    )
    record("train_resumed_from_step", resumed_from)
    expected = final_weights(trained(setup, launched, "split"))
    for name, tensor in final_weights(out).items():
        assert torch.equal(tensor, expected[name]), f"{name}: the resumed run differs"


def test_zero3_offload_split_rows_keep_frozen_bits_and_track_fp32(setup, launched, record):
    """ds_configs/zero3_offload.json (parameters and optimizer state in host memory) with the split rows,
    whose own parameters zero.Init partitions by the run's config: offloaded with the model."""
    from test_training import assert_only_selected_rows_moved

    out = trained(setup, launched, "offload")
    assert_only_selected_rows_moved(setup["base"], out)
    fp32 = selected_updates(setup["base"], trained(setup, launched, "fp32"))
    gap = relative_gap(selected_updates(setup["base"], out), fp32)
    record("train_bf16_offload_split_vs_fp32", gap)
    assert gap <= BF16_UPDATE_TOLERANCE


@pytest.mark.skipif(2 not in RANKS, reason="needs 2 devices")
def test_zero3_bf16_two_ranks(setup, launched, record):
    from test_training import assert_only_selected_rows_moved

    out = trained(setup, launched, "two_ranks")
    assert_only_selected_rows_moved(setup["base"], out)
    base = setup["base"]
    gap = relative_gap(selected_updates(base, out), selected_updates(base, trained(setup, launched, "fp32")))
    record("train_bf16_split_2ranks_vs_fp32", gap)
    assert gap <= BF16_UPDATE_TOLERANCE


# -------------------------------------------------------------------------------------------- loading


def test_zero3_loader_fills_the_partitions_on_the_device(setup, launched, record):
    """core/zero3_load.py on the device: the model built empty under zero.Init, each partition filled
    from safetensors slices of a model in 8 shards, gathered equal bit for bit to from_pretrained's
    whole CPU load, having read no more than the model."""
    launched.output("load")
    result = json.loads((setup["root"] / "load.json.rank0").read_text())[str(setup["model"])]
    size = sum(p.stat().st_size for p in setup["model"].glob("*.safetensors"))
    record("zero3_load_parameters_differing", len(result["differ"]))
    assert result["differ"] == [] and 0 < result["read"] <= size


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


def _cpu_prompts(setup):
    """The CPU model in fp32, its tokenizer and the data's prompts, as docs/method.md builds them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.attribution import mmlu

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    questions, shots = mmlu.load_questions(str(setup["mmlu"]), per_subject=50)
    prompts = mmlu.build_prompts(tokenizer, questions, shots).input_ids
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    return model, tokenizer, prompts


@pytest.mark.parametrize("nproc", RANKS)
def test_attribute_zero3_on_device_matches_cpu_reference(setup, launched, nproc, record):
    from safetensors.torch import load_file

    from loki_dist.attribution import kva
    from loki_dist.core.families import down_projections

    launched.output(f"attribute{nproc}")
    got = load_file(str(setup["root"] / f"attribution{nproc}.safetensors"))["scores"].double()
    model, _, prompts = _cpu_prompts(setup)
    projections = down_projections(model)
    expected = torch.cat(
        [kva.reference_scores(model, projections, kva.Batch.left_pad([p], 0, torch.device("cpu")), 7)
         for p in prompts]
    )  # fmt: skip
    gap = float((got - expected).abs().max() / expected.abs().max())
    record(f"attribute_cli_{nproc}rank_vs_cpu_reference", gap)
    assert got.shape == expected.shape and gap <= FP32_RELATIVE


def test_evaluate_on_device_matches_cpu_predictions(setup, launched, record):
    from loki_dist.evaluation.scoring import letter_token_ids

    launched.output("evaluate")
    predictions = json.loads((setup["root"] / "evaluate.json").read_text())["predictions"]
    model, tokenizer, prompts = _cpu_prompts(setup)
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


# ---------------------------------------------------------------------------------------- collectives


@pytest.mark.parametrize("nproc", RANKS)
def test_collective_helpers_on_device_and_cpu_tensors(setup, launched, nproc, record):
    """Each rank r contributes values derived from r; the expected results are written out here."""
    launched.output(f"collectives{nproc}")
    sizes = [r + 2 for r in range(nproc)]
    gathered = [float(100 * r + i) for r in range(nproc) for i in range(sizes[r])]
    streamed = [float(1000 * r + i) for r in range(nproc) for i in range(300 + 7 * r)]
    counts = sum(200 + r for r in range(nproc))  # over 255 from 2 ranks: summed as int64, not uint8
    for rank in range(nproc):
        result = json.loads((setup["root"] / f"collectives{nproc}" / f"rank{rank}.json").read_text())
        assert result["backend"] == ("nccl" if DEVICE.type == "cuda" else "gloo")
        for where in ("device", "cpu"):
            got = result[where]
            assert got["sum_float32"] == [sum(r + 1.5 for r in range(nproc))] * 3
            assert got["sum_float64"] == [sum(2.0**-r for r in range(nproc))]
            assert got["sum_int64"] == [sum(10**r for r in range(nproc))] * 2
            assert got["gathered"] == gathered
            assert got["devices"] == [result[f"{where}_name"]] * 4  # results stay where the inputs were
            if rank != 0:  # only rank 0 receives the sums and the streams
                assert got["reduced"] == [] and got["streamed"] == []
                continue
            assert {dtype for _, dtype, _ in got["reduced"]} == {"torch.int64"}
            first = [v for i, _, piece in got["reduced"] if i == 0 for v in piece]
            second = [v for i, _, piece in got["reduced"] if i == 1 for v in piece]
            assert first == [counts] * 700 and second == [nproc * v for v in range(5)]
            assert got["streamed"] == streamed and got["streamed_pieces"] > nproc  # many 128-byte pieces
        assert result["max"] == 10 * (nproc - 1) + 3
    record(f"collectives_{nproc}rank", "passed")
