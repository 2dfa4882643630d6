"""`loki-dist evaluate`: equal to a direct per-question computation, and the same at any world size."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, assert_user_error, free_port, run_cli, zero3_rank0_share
from mmlu_fixture import write_mmlu


@pytest.fixture(scope="module")
def opinionated_llama(tmp_path_factory):
    """A tiny Llama with scaled-up layers, so that different prompts get different answers."""
    from loki_dist.demo.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("opinionated"), "llama", seed=3, sharp=True)


def _direct_letters(model_dir, data, shots: int) -> list[int]:
    """One unbatched forward per question, log-softmax over the vocabulary, best of A-D."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.attribution import mmlu

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    letters = [tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"]
    questions, shot_map = mmlu.load_questions(str(data), 10**6, shots)
    chosen = []
    with torch.no_grad():
        for q in questions:
            ids = mmlu.encode(tokenizer, q, shot_map[q.subject])
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            chosen.append(int(torch.log_softmax(logits, -1)[letters].argmax()))
    return chosen, questions


def _direct_perplexity(model_dir, texts, window: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = [], 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            for start in range(0, len(ids), window):
                piece = torch.tensor([ids[start : start + window]])
                if piece.shape[1] < 2:
                    continue
                logits = model(input_ids=piece).logits[0, :-1].double()
                nll.append(float(torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum")))
                count += piece.shape[1] - 1
    return math.fsum(nll), count


# 2 ranks with the model whole on each, and 2 ranks with it ZeRO-3-sharded over both. Under ZeRO-3 the
# ranks hold different numbers of batches in every case here, so the dummy forwards that keep them in step
# run (with batch shapes that differ between the ranks), and the results must still be the 1-rank ones.
ZERO3 = ["--ds-config", "ds_configs/zero3_infer.json"]
TWO_RANKS = {"whole": [], "zero3": ZERO3}  # how the model is held on 2 ranks


def _run(args: list[str], output, nproc: int = 1) -> tuple[dict, str]:
    proc = run_cli([*args, "--output", str(output)], nproc=nproc)
    return json.loads(output.read_text()), proc.stderr


def _assert_sharded_log(log: str) -> None:
    held, total = zero3_rank0_share(log)
    assert 0.45 < held / total < 0.55  # each parameter split in two


@pytest.fixture(scope="module")
def mc_one_rank(opinionated_llama, tmp_path_factory):
    """21 questions (11 and 10 per rank on 2 ranks), and their 1-rank results at batch size 3."""
    root = tmp_path_factory.mktemp("mc")
    data = write_mmlu(root / "mmlu", per_subject=7, dev_per_subject=1)
    args = ["evaluate", "--model", str(opinionated_llama), "--data", str(data), "--shots", "1"]
    args += ["--scores-per-subject"]
    one, _ = _run([*args, "--batch-size", "3"], root / "one.json")
    return root, data, args, one


def test_multiple_choice_equals_direct(opinionated_llama, mc_one_rank):
    _, data, _, one = mc_one_rank
    chosen, questions = _direct_letters(opinionated_llama, data, shots=1)
    assert len(set(chosen)) > 1, "the test model must not answer every question alike"
    assert one["predictions"] == chosen
    correct = sum(c == q.answer for c, q in zip(chosen, questions, strict=True))
    assert (one["correct"], one["total"]) == (correct, 21)
    assert one["scores"]["mmlu"] == pytest.approx(100 * correct / 21)
    for subject, entry in one["subjects"].items():
        mine = [c == q.answer for c, q in zip(chosen, questions, strict=True) if q.subject == subject]
        assert (entry["correct"], entry["total"]) == (sum(mine), len(mine))
        assert one["scores"][f"mmlu/{subject}"] == pytest.approx(100 * sum(mine) / len(mine))


@pytest.mark.parametrize("mode", TWO_RANKS)
def test_multiple_choice_two_ranks_agree(mc_one_rank, mode):
    """Batch size 2 on 2 ranks: 6 batches on rank 0 (11 questions), 5 and a dummy one on rank 1."""
    root, _, args, one = mc_one_rank
    two, log = _run([*args, "--batch-size", "2", *TWO_RANKS[mode]], root / f"two-{mode}.json", nproc=2)
    if mode == "zero3":
        _assert_sharded_log(log)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert {**two, "world_size": 1} == one


TEXTS = ["the quick brown fox jumps over the lazy dog " * (i % 4 + 1) + str(i) for i in range(7)]


@pytest.fixture(scope="module")
def ppl_one_rank(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    (root / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    args = ["evaluate", "--model", str(tiny_llama), "--data", str(root / "docs.jsonl"), "--name", "web"]
    args += ["--task", "perplexity", "--text-field", "body", "--max-seq-len", "16", "--batch-size", "3"]
    one, _ = _run(args, root / "one.json")
    return root, args, one


def test_perplexity_equals_direct(tiny_llama, ppl_one_rank):
    _, _, one = ppl_one_rank
    nll, tokens = _direct_perplexity(tiny_llama, TEXTS, 16)
    assert one["tokens"] == tokens
    assert one["nll_sum"] == pytest.approx(nll, rel=1e-6)
    assert one["scores"] == {"web": pytest.approx(math.exp(nll / tokens), rel=1e-6)}
    assert one["lower_is_better"] == ["web"]


def test_perplexity_two_ranks_whole_and_zero3_agree(tiny_llama, ppl_one_rank):
    from transformers import AutoTokenizer

    root, args, one = ppl_one_rank
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    windows = [math.ceil(len(tokenizer(t)["input_ids"]) / 16) for t in TEXTS]
    assert (sum(windows[:4]), sum(windows[4:])) == (8, 5)  # rank 0: 3 batches of 3, rank 1: 2
    whole, _ = _run(args, root / "two-whole.json", nproc=2)
    # a config with its own batch sizes, written for one GPU: inference trains nothing, so they are
    # --batch-size's (they once failed DeepSpeed's batch check once the model had loaded)
    config = json.loads((REPO / "ds_configs" / "zero3_infer.json").read_text())
    fixed = root / "zero3_fixed_batch.json"
    fixed.write_text(json.dumps({**config, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 1}))
    zero3, log = _run([*args, "--ds-config", str(fixed)], root / "two-zero3.json", nproc=2)
    _assert_sharded_log(log)
    assert (whole["tokens"], whole["world_size"]) == (one["tokens"], 2)
    # 1 and 2 ranks batch (and pad) the windows differently, so the float32 logits may differ in their
    # last bits: measured 8e-12 relative in nll_sum
    assert whole["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-9)
    assert zero3 == whole  # same batches: the sharded model computes exactly what the whole one does


def test_plain_text_file_is_one_document_per_line(tiny_llama, tmp_path):
    from loki_dist.cli import main

    (tmp_path / "a.txt").write_text("first line of text\n\nsecond line\n")
    main(["evaluate", "--model", str(tiny_llama), "--data", str(tmp_path / "a.txt"), "--task", "perplexity",
          "--output", str(tmp_path / "p.json")])  # fmt: skip
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["documents"] == 2 and result["perplexity"] > 1


def test_evaluate_user_errors(tiny_llama, tmp_path, capsys):
    data = write_mmlu(tmp_path / "mmlu")
    base = ["evaluate", "--model", str(tiny_llama), "--output", str(tmp_path / "r.json")]
    assert_user_error([*base, "--data", str(data), "--batch-size", "0"], capsys, "--batch-size 0")
    assert_user_error([*base, "--data", str(data), "--shots", "3"], capsys, "too few examples")
    (tmp_path / "t.jsonl").write_text('{"content": "x"}\n')
    argv = [*base, "--data", str(tmp_path / "t.jsonl"), "--task", "perplexity"]
    assert_user_error(argv, capsys, "no string column 'text'")
    argv = ["evaluate", "--model", str(tmp_path / "nope"), "--data", str(data), "--output", "r.json"]
    assert_user_error(argv, capsys, "directory not found")
    # a --ds-config that is not ZeRO-3 inference: one line, before anything is read or loaded
    argv = [*base, "--data", str(data), "--ds-config", "zero2"]
    assert_user_error(argv, capsys, "--ds-config zero2: inference shards with ZeRO stage 3, this has stage 2")
    (tmp_path / "opt.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {}}))
    argv = [*base, "--data", str(data), "--ds-config", str(tmp_path / "opt.json")]
    assert_user_error(argv, capsys, "must not define an optimizer")
    # values DeepSpeed cannot take: before the model loads, not a traceback from deepspeed.initialize
    for setting, needle in [
        ({"bf16": True}, 'bf16 true: expected an object such as {"enabled": "auto"}'),
        ({"train_micro_batch_size_per_gpu": 0}, 'train_micro_batch_size_per_gpu 0: expected a positive'),
        ({"bf16": {"enabled": True}}, 'bf16.enabled true contradicts --dtype float32: leave it "auto"'),
        ({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "many"}},
         'zero_optimization.stage3_max_live_parameters "many": Input should be a valid integer'),
    ]:  # fmt: skip
        (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, **setting}))
        argv = [*base, "--data", str(data), "--ds-config", str(tmp_path / "ds.json")]
        assert_user_error(argv, capsys, needle)
    assert not (tmp_path / "r.json").exists()


def _per_rank_run(argv: list[str], tmp_path) -> subprocess.CompletedProcess:
    """2 ranks under torchrun, each running `python -m loki_dist ARGV` with $LOCAL_RANK expanded by its
    own shell: inputs that differ between ranks, as node-local copies of a data set do."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--no-python"]  # fmt: skip
    script = f'exec "{sys.executable}" -m loki_dist {" ".join(argv)}'
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOKI_DIST_METER": str(tmp_path / "meter")}
    return subprocess.run(
        [*torchrun, "bash", "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=180
    )


@pytest.mark.parametrize("rank0_data", ["valid", "invalid"])
def test_a_mistake_on_some_ranks_reaches_stderr_with_those_ranks(tiny_llama, tmp_path, rank0_data):
    """Rank 1's copy of the data is missing (rank 0's is fine, or broken otherwise): every rank stops
    at the agreement after the checks, and each distinct mistake is one line naming its rank."""
    from test_train_errors import assert_clean_failure, error_lines

    rank0 = tmp_path / "0" / "docs.jsonl"
    rank0.parent.mkdir()
    rank0.write_text('{"text": "a document"}\n' if rank0_data == "valid" else "{not json\n")
    argv = ["evaluate", "--task", "perplexity", "--model", str(tiny_llama),
            "--data", f"{tmp_path}/$LOCAL_RANK/docs.jsonl", "--output", str(tmp_path / "r.json")]  # fmt: skip
    proc = _per_rank_run(argv, tmp_path)
    lines = error_lines(proc.stderr, "evaluate")
    missing = (
        f"loki-dist evaluate: error: rank 1: --data {tmp_path}/1/docs.jsonl: file or directory not found"
    )
    assert lines[-1] == missing, proc.stderr
    if rank0_data == "valid":
        assert len(lines) == 1, proc.stderr
    else:
        assert len(lines) == 2 and lines[0].startswith(
            f"loki-dist evaluate: error: rank 0: --data {rank0}: line 1 is not valid JSON"
        ), proc.stderr
    assert_clean_failure(proc, tmp_path / "meter")
    assert not (tmp_path / "r.json").exists()


def test_token_nll_in_chunks_equals_a_float64_log_softmax():
    """bf16-valued logits (as a GPU model returns them), several chunks of 3 positions."""
    from loki_dist.evaluation.scoring import token_nll

    torch.manual_seed(0)
    vocab = 5000
    for scale in (1.0, 5.0, 20.0):  # flat to peaked next-token distributions
        logits = (torch.randn(3, 17, vocab) * scale).to(torch.bfloat16)
        targets = torch.randint(0, vocab, (3, 17))
        expected = -torch.log_softmax(logits.double(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        chunked = token_nll(logits, targets, chunk_bytes=3 * vocab * 4 * 3)
        assert chunked.dtype == torch.float64
        # measured: at most 7e-10 relative per token, 1.5e-11 on the sum (a float32 log-softmax: 4e-6)
        assert float(((chunked - expected).abs() / expected).max()) < 5e-9
        assert float((chunked.sum() - expected.sum()).abs() / expected.sum()) < 1e-10
        assert torch.equal(token_nll(logits, targets), chunked)  # one chunk or six: the same numbers


def test_document_nll_equals_float64_cross_entropy_per_document(tiny_llama):
    """Windows of 16 tokens scored one per forward, the NLL in chunks of 5 positions, against a float64
    cross-entropy of the same model's logits written here, per document."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.evaluation.scoring import document_nll

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    documents = [tokenizer(text)["input_ids"] for text in [*TEXTS, "x"]]  # the last one: no target
    chunk_bytes = model.config.vocab_size * 4 * 5
    nll, count = document_nll(
        model, documents, max_seq_len=16, pad_id=0, batch_size=1, chunk_bytes=chunk_bytes
    )
    with torch.no_grad():
        for index, ids in enumerate(documents):
            pieces = [
                torch.tensor([ids[s : s + 16]]) for s in range(0, len(ids), 16) if len(ids[s : s + 16]) > 1
            ]
            expected = math.fsum(
                float(torch.nn.functional.cross_entropy(
                    model(input_ids=piece).logits[0, :-1].double(), piece[0, 1:], reduction="sum"
                ))
                for piece in pieces
            )  # fmt: skip
            assert int(count[index]) == sum(piece.shape[1] - 1 for piece in pieces)
            # measured: at most 7.3e-11 relative (float32 exponentials summed in float64)
            assert float(nll[index]) == pytest.approx(expected, rel=1e-9, abs=0)
    assert count[-1] == 0 and nll[-1] == 0


def test_a_template_that_fails_on_one_rank_stops_every_rank(tiny_llama, tmp_path):
    """Rank 1's copy of the model has a chat template that raises while the prompts are built: that
    rank's mistake (a template's error is one line naming the prompt and the template, issue 21); the
    agreement still stops rank 0, the line names rank 1, and both exit 2. (A crash, a fault loki_dist
    does not know, ends every rank with 1 and its traceback: test_scale injects one mid-export.)"""
    import shutil

    from test_train_errors import assert_clean_failure, error_lines

    for rank in (0, 1):
        shutil.copytree(tiny_llama, tmp_path / str(rank))
    (tmp_path / "1" / "chat_template.jinja").write_text("{{ raise_exception('a template that fails') }}")
    argv = ["evaluate", "--model", f"{tmp_path}/$LOCAL_RANK", "--data", str(write_mmlu(tmp_path / "mmlu")),
            "--output", str(tmp_path / "r.json")]  # fmt: skip
    proc = _per_rank_run(argv, tmp_path)
    lines = error_lines(proc.stderr, "evaluate")
    assert lines == [
        f"loki-dist evaluate: error: rank 1: --data: prompt 0: the chat template of {tmp_path}/1 refuses it "
        "(a template that fails)"
    ], proc.stderr
    assert_clean_failure(proc, tmp_path / "meter", status=2)
