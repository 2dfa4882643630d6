"""KVA attribution: fast and reference equal the formula computed here in float64 (and by finite
differences) on every supported family, and bf16 ranks the nodes as fp32 does; batching and ZeRO-3
sharding change no result beyond rounding, the world size changes no bit; a killed run resumes to the
identical file; the file is docs/method.md's whatever the ranks kept, and only rank 0 receives the
statistics and scores."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, cli_command, run_cli, zero3_rank0_share
from mmlu_fixture import write_mmlu
from safetensors.torch import load_file

from loki_dist.attribution import fast, kva
from loki_dist.attribution.stats import HISTOGRAMS
from loki_dist.core.families import down_projections
from loki_dist.core.files import temporary_name
from loki_dist.demo.tiny import build_model, save_tiny, tiny_config

CPU = torch.device("cpu")
LENGTHS = (9, 23, 4, 15)  # prompts of very different lengths, batched with padding


def _prompts(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(6, 500, (n,), generator=gen).tolist()] for n in LENGTHS]


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox")
# Both algorithms in float32 against the formula in float64, as max|a - b| / max|b| over a batch of 4.
# Measured on these tiny models (3 layers, hidden 32): fast 2.1e-7 to 5.5e-7, reference 1.7e-7 to
# 5.2e-7, fast against reference at most 4.2e-7, batched against alone at most 1.2e-6 (gemma2). A
# float32 output embedding in `reference` (before kva._Float64Head) was 6.1e-6 off with the 50000-token
# vocabulary. 2e-6 leaves room for another CPU's summation order.
TOLERANCE = 2e-6


def _model(name: str):
    """A 3-layer tiny model of the family; `-window`: Gemma-2 with a sliding window shorter than the
    prompts, so the window really cuts; `-wide`: a 50000-token vocabulary, as wide as a real model's,
    where a float32 sum over the vocabulary shows."""
    family, _, variant = name.partition("-")
    if variant == "window":
        from transformers import AutoModelForCausalLM

        config = tiny_config(family, num_layers=3)
        config.sliding_window = 6
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    extra = {"vocab_size": 50000} if variant == "wide" else {}
    return build_model(family, seed=0, num_layers=3, **extra).requires_grad_(False)


def _formula(model, prompt: list[int], steps: int = 7) -> torch.Tensor:
    """docs/method.md's scores [L, D] for one prompt, written out: a float64 copy of the model, one layer and
    one step at a time, plain autograd. y is the float32 model's own prediction, as in the method."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        y = model(ids).logits[0, -1].argmax()
    wide = copy.deepcopy(model).double()
    layers = down_projections(wide)
    z = {}  # a hook that returns None leaves the output as it is
    handles = [
        module.register_forward_hook(lambda _m, _i, out, layer=layer: z.__setitem__(layer, out[0, -1]))
        for layer, module in enumerate(layers)
    ]
    with torch.no_grad():
        wide(ids)
    for handle in handles:
        handle.remove()
    scores = torch.zeros(len(layers), z[0].numel(), dtype=torch.float64)
    for layer in range(len(layers)):
        for k in range(steps):
            value = (k / steps * z[layer]).requires_grad_(True)
            handle = layers[layer].register_forward_hook(
                lambda _m, _i, out, value=value: torch.cat([out[:, :-1], value[None, None]], dim=1)
            )
            probability = torch.softmax(wide(ids).logits[0, -1], dim=-1)[y]
            handle.remove()
            scores[layer] += torch.autograd.grad(probability, value)[0]
        scores[layer] *= z[layer] / steps
    return scores


def _assert_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= tolerance, f"max |difference| / max |expected| = {error:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("name", [*FAMILIES, "gemma2-window", "llama-wide"])
def test_fast_and_reference_equal_the_formula_and_batching_changes_nothing(name):
    model = _model(name)
    projections = down_projections(model)
    prompts = _prompts()
    formula = torch.stack([_formula(model, prompt) for prompt in prompts])
    assert formula.abs().max() > 0
    batch = kva.Batch.left_pad(prompts, pad_id=0, device=CPU)
    packed = fast.fast_scores(model, projections, batch, steps=7, max_rows=10)  # several chunks
    reference = kva.reference_scores(model, projections, batch, steps=7, max_copies=3)  # uneven chunks
    _assert_relative(packed, formula)
    _assert_relative(reference, formula)
    _assert_relative(packed, reference)
    alone = [fast.fast_scores(model, projections, kva.Batch.left_pad([p], 0, CPU), 7, 1000) for p in prompts]
    _assert_relative(packed, torch.cat(alone))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman rank correlation of [..., D] tensors (float scores: no ties)."""
    ra, rb = (x.argsort(-1).argsort(-1).double() for x in (a, b))
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def _bottom_overlap(a: torch.Tensor, b: torch.Tensor, quota: float = 0.1) -> torch.Tensor:
    """Per layer of [L, D] tensors: the share of b's lowest 10% of nodes that are also among a's."""
    k = int(quota * a.shape[-1])
    low_a, low_b = a.argsort(-1)[:, :k].tolist(), b.argsort(-1)[:, :k].tolist()
    return torch.tensor([len(set(x) & set(y)) / k for x, y in zip(low_a, low_b, strict=True)])


# bf16 against fp32 (`fast`, 8 prompts of 12 to 48 tokens, hidden 128), on the samples whose prediction
# y is the same in both (a random tiny model's logits are nearly flat, so bf16 flips y for up to 1 of 8
# here; on those the two attribute different tokens). Measured over the eight families: Spearman of the
# per-layer score sums >= 0.999, of each sample's scores >= 0.998; the lowest 10% of the sums (12 nodes
# per layer) share >= 11 of 12 nodes.
BF16_MIN_SPEARMAN, BF16_MIN_OVERLAP = 0.99, 0.8


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_ranks_the_nodes_as_fp32_does(family):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(12, 48, (8,), generator=gen).tolist()
    batch = kva.Batch.left_pad(
        [[1, *torch.randint(6, 500, (n,), generator=gen).tolist()] for n in lengths], 0, CPU
    )
    model = build_model(family, seed=0, num_layers=3, hidden_size=128, intermediate_size=256, num_heads=4)
    model.requires_grad_(False)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        projections = down_projections(model)
        results[dtype] = (
            kva.clean_pass(model, projections, batch)[1],
            fast.fast_scores(model, projections, batch, 7, 10000),
        )
    (y32, fp32), (y16, bf16) = results[torch.float32], results[torch.bfloat16]
    same = y32 == y16
    assert same.sum() >= 6
    fp32, bf16 = fp32[same], bf16[same]
    assert _spearman(bf16, fp32).min() >= BF16_MIN_SPEARMAN
    assert _spearman(bf16.sum(0), fp32.sum(0)).min() >= BF16_MIN_SPEARMAN
    assert _bottom_overlap(bf16.sum(0), fp32.sum(0)).min() >= BF16_MIN_OVERLAP


def test_one_node_against_finite_differences():
    """score[l, j] = z_j/m * sum_k dP/dz_j at alpha_k z, by central differences in float64."""
    model = build_model("llama", seed=3, num_layers=3).double()
    projections = down_projections(model)
    prompts = _prompts(seed=1)
    packed = fast.fast_scores(model, projections, kva.Batch.left_pad(prompts, 0, CPU), steps=7, max_rows=64)
    sample, layer, steps, eps = 1, 1, 7, 1e-3  # RMSNorm computes in float32: no smaller eps
    ids = torch.tensor([prompts[sample]])
    captured = {}
    handle = projections[layer].register_forward_hook(lambda m, i, out: captured.setdefault("z", out[0, -1]))
    with torch.no_grad():
        target = model(ids).logits[0, -1].argmax()
    handle.remove()
    z = captured["z"].clone()

    def probability(value: torch.Tensor) -> float:
        def replace(_m, _i, out):
            out = out.clone()
            out[0, -1] = value
            return out

        handle = projections[layer].register_forward_hook(replace)
        with torch.no_grad():
            p = torch.softmax(model(ids).logits[0, -1], -1)[target].item()
        handle.remove()
        return p

    for node in (int(packed[sample, layer].abs().argmax()), 5):
        bump = torch.zeros_like(z)
        bump[node] = eps
        derivative_sum = sum(
            (probability(k / steps * z + bump) - probability(k / steps * z - bump)) / (2 * eps)
            for k in range(steps)
        )
        expected = z[node].item() / steps * derivative_sum
        assert packed[sample, layer, node].item() == pytest.approx(expected, rel=1e-4, abs=1e-12)


# ------------------------------------------------------------------------------------- through the CLI


NUM_SAMPLES = 27  # 7 batches of the default 4: 1 rank runs 7, 2 ranks 4 + 3, 3 ranks 3 + 2 + 2


@pytest.fixture(scope="module")
def attribution_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("attr")
    model = save_tiny(root / "model", "qwen2", seed=0, num_layers=3)
    data = write_mmlu(root / "mmlu", per_subject=NUM_SAMPLES // 3)  # questions of 1 to 40 words
    args = ["attribute", "--model", str(model), "--data", str(data), "--save-scores"]  # --batch-size 4
    single = root / "ws1.safetensors"
    run_cli([*args, "--output", str(single)])
    return root, args, single


@pytest.fixture(scope="module")
def two_rank_file(attribution_setup) -> Path:
    """The same attribution with 2 ranks (shared by the world-size, scale-law and resume tests); each
    rank's metering report lands in meter2/. The end moves 1000-byte pieces (not a multiple of any
    tensor's row), so every tensor of the file arrives in many pieces."""
    root, args, _ = attribution_setup
    path = root / "ws2.safetensors"
    env = {"LOKI_DIST_METER": str(root / "meter2"), "LOKI_DIST_TEST_CHUNK_BYTES": "1000"}
    run_cli([*args, "--output", str(path)], nproc=2, env=env)
    return path


def _assert_identical(a_path: Path, b_path: Path) -> None:
    """Every tensor equal to the bit, and the metadata but for the world size."""
    from loki_dist.attribution.stats import load_file as load_with_metadata

    (a, meta_a), (b, meta_b) = load_with_metadata(a_path), load_with_metadata(b_path)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    meta_a.pop("world_size"), meta_b.pop("world_size")
    assert meta_a == meta_b


def test_one_two_and_three_ranks_write_identical_files(attribution_setup, two_rank_file):
    """Batches are cut in data order before they are dealt, so every prompt is padded beside the same
    neighbours on any number of ranks: the files are equal to the bit, not within rounding."""
    root, args, single = attribution_setup
    ws1 = load_file(single)
    n = NUM_SAMPLES
    assert ws1["bottom_rank_hist"].shape == (3, 32, 100) and ws1["scores"].shape == (n, 3, 32)
    assert ws1["num_samples"].item() == n and ws1["bottom_rank_hist"].sum().item() == n * 3 * 32
    _assert_identical(single, two_rank_file)
    three = root / "ws3.safetensors"
    run_cli([*args, "--output", str(three)], nproc=3)
    _assert_identical(single, three)


ZERO3 = ["--ds-config", "ds_configs/zero3_infer.json"]


@pytest.fixture(scope="module")
def zero3_file(attribution_setup) -> tuple[Path, str]:
    """The attribution under ZeRO-3 over 2 ranks, uninterrupted, and its log."""
    root, args, _ = attribution_setup
    sharded = root / "ws2z3.safetensors"
    return sharded, run_cli([*args, "--output", str(sharded), *ZERO3], nproc=2).stderr


def test_zero3_gives_the_same_file_with_either_algorithm(attribution_setup, zero3_file):
    """ZeRO-3 over 2 ranks: `fast` on all samples (rank 1 runs a dummy batch to keep the lockstep);
    `reference` (its float64 output embedding gathered by ZeRO-3 in forward and backward) on the first
    3 samples, one batch that rank 1 runs only as a dummy."""
    root, args, single = attribution_setup
    ws1 = load_file(single)
    sharded, log = zero3_file
    got = load_file(sharded)
    assert got.keys() == ws1.keys()
    for name, tensor in ws1.items():
        if tensor.dtype.is_floating_point:
            _assert_relative(got[name], tensor)
        else:
            assert torch.equal(got[name], tensor), name
    held, total = zero3_rank0_share(log)
    assert 0.45 < held / total < 0.55  # each parameter split in two
    reference = root / "reference_z3.safetensors"
    few = [*args, "--per-subject", "1", "--algorithm", "reference", "--output", str(reference), *ZERO3]
    run_cli(few, nproc=2)
    _assert_relative(load_file(reference)["scores"], ws1["scores"][:3])


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ascending rank along the last dim, ties to the lower index, by counting (no sort)."""
    less = scores[..., None, :] < scores[..., :, None]
    index = torch.arange(scores.shape[-1])
    tied_before = (scores[..., None, :] == scores[..., :, None]) & (index[None, :] < index[:, None])
    return (less | tied_before).sum(-1)


def _histogram(ranks: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n] ranks -> [..., 100] counts over the samples (dim 0): bin b holds [b*n//100, (b+1)*n//100)."""
    hist = torch.zeros(*ranks.shape[1:], 100, dtype=torch.int64)
    for b in range(100):
        hist[..., b] = ((ranks >= b * n // 100) & (ranks < (b + 1) * n // 100)).sum(0)
    return hist


def test_two_rank_file_is_the_design_contract_in_data_order(attribution_setup, two_rank_file):
    """Streamed to rank 0 piece by piece, the file still holds docs/method.md's tensors, consistent with
    its own scores, and the scores are in data order across the uneven 16 + 11 split."""
    root, args, _ = attribution_setup
    from loki_dist.attribution.stats import load_file as load_with_metadata

    f, metadata = load_with_metadata(two_rank_file)
    n, layers, hidden = NUM_SAMPLES, 3, 32
    assert metadata["format"] == "loki_dist attribution v2"
    hist = (torch.int64, [layers, hidden, 100])
    assert {name: (t.dtype, list(t.shape)) for name, t in f.items()} == {
        "bottom_rank_hist": hist,
        "global_bottom_rank_hist": hist,
        "global_top_rank_hist": hist,
        "magnitude_bottom_rank_hist": hist,
        "global_magnitude_bottom_rank_hist": hist,
        "global_magnitude_top_rank_hist": hist,
        "score_sum": (torch.float64, [layers, hidden]),
        "abs_score_sum": (torch.float64, [layers, hidden]),
        "num_samples": (torch.int64, [1]),
        "scores": (torch.float32, [n, layers, hidden]),
    }
    scores = f["scores"]
    assert f["num_samples"].item() == n
    for prefix, values in (("", scores), ("magnitude_", scores.abs())):  # format v1's, then v2's
        exact = [
            [float(sum(map(Fraction, node))) for node in layer] for layer in values.permute(1, 2, 0).tolist()
        ]
        assert f["abs_score_sum" if prefix else "score_sum"].tolist() == exact  # correctly rounded sums
        assert torch.equal(f[f"{prefix}bottom_rank_hist"], _histogram(_ranks(values), hidden))
        flat = values.reshape(n, -1)
        for name, key in (
            (f"global_{prefix}bottom_rank_hist", flat),
            (f"global_{prefix}top_rank_hist", -flat),
        ):
            assert torch.equal(f[name], _histogram(_ranks(key), layers * hidden).view(layers, hidden, 100))
    # data order: samples on both sides of the rank boundary, each scored alone here
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.attribution import mmlu

    model_dir, data = args[args.index("--model") + 1], args[args.index("--data") + 1]
    questions, shots = mmlu.load_questions(data, 50, 0, None, "test", None)
    prompts = mmlu.build_prompts(AutoTokenizer.from_pretrained(model_dir), questions, shots).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i in (0, 15, 16, 26):
        alone = fast.fast_scores(
            model, down_projections(model), kva.Batch.left_pad([prompts[i]], 0, CPU), 7, 1000
        )
        torch.testing.assert_close(scores[i], alone[0].float(), rtol=0, atol=1e-4 * alone.abs().max().item())


def test_only_rank0_receives_and_only_the_other_ranks_share(attribution_setup, two_rank_file):
    """The scale law, from the metering reports: at the end rank 1 receives nothing (the sums go to
    rank 0 only, the scores point to point), rank 0 receives rank 1's scores plus one copy of the
    summed histograms and rank 1's score sum with its rounding error, not every rank's scores (the
    old all-gather) nor world x the histograms."""
    root = attribution_setup[0]
    reports = [json.loads((root / "meter2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    finish = [report["phases"]["attribute_finish"] for report in reports]
    layers, hidden, rank1_samples = 3, 32, 11  # 27 samples: ranks score 4 and 3 batches of 4
    rank1_scores = rank1_samples * layers * hidden * 4
    statistics = (
        6 * layers * hidden * 100 * 8 + 4 * layers * hidden * 8 + 8
    )  # hists, score and |score| sums + errors, count
    assert finish[1]["received"] == 0
    assert rank1_scores < finish[0]["received"] <= rank1_scores + statistics


def test_score_sums_do_not_depend_on_how_the_samples_are_grouped():
    """The file's score_sum on 1, 2 or 3 ranks: each rank adds its samples with stats.exact_add, rank 0
    adds the ranks' sums and errors (as output._exact_score_sum does). Scores of one node spanning
    1e-12 to 1e-2, where a plain float64 sum changes with the grouping."""
    from loki_dist.attribution.stats import exact_add

    gen = torch.Generator().manual_seed(0)
    magnitude = torch.pow(10.0, -torch.randint(2, 13, (200, 64), generator=gen).double())
    scores = (torch.randn(200, 64, generator=gen, dtype=torch.float64) * magnitude).float()

    def grouped(blocks: int) -> torch.Tensor:
        total, error = torch.zeros(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
        for block in scores.tensor_split(blocks):
            rank_total, rank_error = torch.zeros_like(total), torch.zeros_like(error)
            for sample in block:
                exact_add(rank_total, rank_error, sample.double())
            exact_add(total, error, rank_total)
            error += rank_error
        return total + error

    plain = [sum(sum(block.double()) for block in scores.tensor_split(n)) for n in (1, 2, 3)]  # the old way
    assert not torch.equal(plain[0], plain[1]) or not torch.equal(plain[0], plain[2])  # the data bites
    assert torch.equal(grouped(1), grouped(2)) and torch.equal(grouped(1), grouped(3))
    exact = [sum(map(Fraction, column)) for column in scores.double().T.tolist()]
    assert grouped(1).tolist() == [float(value) for value in exact]  # correctly rounded


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_run_resumes_to_the_identical_file(attribution_setup, two_rank_file, nproc):
    root, args, single = attribution_setup
    uninterrupted = single if nproc == 1 else two_rank_file
    output = root / f"resumed{nproc}.safetensors"
    partial = root / f"resumed{nproc}.safetensors.partial"
    resumable = [*args, "--output", str(output), "--checkpoint-every", "4"]  # every batch
    killed = run_cli(resumable, nproc, env={"LOKI_DIST_TEST_KILL_AFTER_CHECKPOINT": "2"}, check=False)
    assert killed.returncode != 0 and not output.exists()
    # after two checkpoints, one file per rank: the second step's
    assert sorted(p.name for p in partial.iterdir()) == [
        f"rank{r}-step000000002.safetensors" for r in range(nproc)
    ]
    checkpoint = load_file(partial / "rank0-step000000002.safetensors")
    assert checkpoint["num_samples"].item() == 8 and checkpoint["scores"].shape == (8, 3, 32)
    for name in HISTOGRAMS:  # the magnitude rule's too (progress format 3)
        # at most 27 samples per rank: one byte per bin, an eighth of the file's int64
        assert checkpoint[name].dtype == torch.uint8 and checkpoint[name].shape == (3, 32, 100)
        assert checkpoint[name].sum().item() == 8 * 3 * 32
    assert {"abs_score_sum", "abs_score_sum_error"} <= checkpoint.keys()
    assert (partial / "rank0-step000000002.safetensors").stat().st_size < 6 * 3 * 32 * 100 * 2
    # as if killed while writing step 3: a half-written temporary of a writer that is gone
    half = temporary_name(partial / "rank0-step000000003.safetensors")
    half = half.with_name(half.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-"))
    half.write_bytes(b"half a checkpoint")
    proc = run_cli([*resumable, "--resume"], nproc)
    assert "resuming after 2 batches" in proc.stderr
    # bit-identical tensors and metadata (safetensors writes the metadata map in hash order)
    from loki_dist.attribution.stats import load_file as load_with_metadata

    (resumed, meta_resumed), (whole, meta_whole) = (
        load_with_metadata(output),
        load_with_metadata(uninterrupted),
    )
    assert meta_resumed == meta_whole and resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)
    assert not partial.exists()


def _worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of the launcher's worker process whose environment says RANK=rank."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


def test_sigterm_to_one_rank_stops_all_after_one_batch_and_resumes_identical(attribution_setup, zero3_file):
    """torchrun, 2 ranks under ZeRO-3 (every rank must make the same forward calls), the progress saved
    by the clock alone (--checkpoint-every 0; a 70B run on 64 ranks never reaches 200 samples per rank).
    A SIGTERM to rank 1 only, after the first save: both ranks agree at the next batch boundary, save
    there, exit 75; --resume then writes the uninterrupted run's file to the bit."""
    from loki_dist.attribution.stats import load_file as load_with_metadata

    root, args, _ = attribution_setup
    output, log = root / "stopped.safetensors", root / "stopped.log"
    partial = root / "stopped.safetensors.partial"
    argv = [*args, "--output", str(output), *ZERO3, "--checkpoint-every", "0", "--checkpoint-minutes", "1e-9"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as handle:
        proc = subprocess.Popen(cli_command(argv, nproc=2), cwd=REPO, env=env, stdout=handle, stderr=handle)
    try:
        deadline = time.time() + 180
        while not list(partial.glob("rank1-step*.safetensors")):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        os.kill(_worker_of_rank(proc.pid, 1), signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert proc.returncode != 0 and text.count("exitcode  : 75") == 2, text[-3000:]  # torchrun says 1
    stopped = int(text.split("stopped by signal")[1].split("after ")[1].split(" of 4 batches")[0])
    assert 1 <= stopped < 4 and not output.exists()
    assert sorted(p.name for p in partial.iterdir()) == [
        f"rank{r}-step{stopped:09d}.safetensors" for r in (0, 1)
    ]
    resumed = run_cli([*argv, "--resume"], nproc=2)
    assert f"resuming after {stopped} batches" in resumed.stderr
    (got, meta_got), (whole, meta_whole) = load_with_metadata(output), load_with_metadata(zero3_file[0])
    assert meta_got == meta_whole and got.keys() == whole.keys()
    assert all(torch.equal(got[name], whole[name]) for name in whole)


def test_summary_and_metadata(attribution_setup):
    _, _, single = attribution_setup
    from safetensors import safe_open

    with safe_open(str(single), "pt") as handle:
        meta = handle.metadata()
    assert meta["model_type"] == "qwen2" and meta["steps"] == "7" and meta["world_size"] == "1"
    assert len(meta["data_fingerprint"]) == 64 and meta["chat_template"] == "True"


# -------------------------------------------------------------------------------------------- bad input


def test_bad_input_fails_in_one_line_before_work(tmp_path, capsys, tiny_llama):
    data = write_mmlu(tmp_path / "mmlu")
    out = str(tmp_path / "a.safetensors")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    base = ["attribute", "--output", out]
    assert_user_error([*base, "--model", str(bert), "--data", str(data)], capsys, "not supported")
    assert_user_error(
        [*base, "--model", str(tmp_path / "nope"), "--data", str(data)], capsys, "directory not found"
    )
    for change, needle in ((lambda r: r.pop("subject"), "lacks column(s) subject"),
                           (lambda r: r.update(answer=7), "`answer` must be 0-3"),
                           (lambda r: r.update(choices=["x", "y"]), "exactly 4 strings")):  # fmt: skip
        rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
        change(rows[0])
        bad = tmp_path / "bad.jsonl"
        bad.write_text("\n".join(json.dumps(r) for r in rows))
        assert_user_error([*base, "--model", str(tiny_llama), "--data", str(bad)], capsys, needle)
    assert_user_error(
        [*base, "--model", str(tiny_llama), "--data", str(data), "--steps", "0"], capsys, "--steps 0"
    )
    for memory in ("inf", "nan"):  # once a traceback when the chunks were sized, after the model loaded
        argv = [*base, "--model", str(tiny_llama), "--data", str(data), "--chunk-memory-gb", memory]
        assert_user_error(argv, capsys, f"--chunk-memory-gb {memory}: must be a positive finite number")
    missing_config = str(tmp_path / "x.json")
    argv = [*base, "--model", str(tiny_llama), "--data", str(data), "--ds-config", missing_config]
    assert_user_error(argv, capsys, "file not found")
    assert not (tmp_path / "a.safetensors").exists()
