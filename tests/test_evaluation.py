"""`loki-dist evaluate`: equal to a direct per-question computation, and the same at any world size."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_user_error, run_cli, zero3_rank0_share
from mmlu_fixture import write_mmlu


@pytest.fixture(scope="module")
def opinionated_llama(tmp_path_factory):
    """A tiny Llama with scaled-up layers, so that different prompts get different answers."""
    from loki_dist.tiny import build_model, build_tokenizer

    out = tmp_path_factory.mktemp("opinionated")
    model = build_model("llama", seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layers" in name and "norm" not in name:
                param.mul_(3)
        model.lm_head.weight.mul_(40)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    return out


def _direct_letters(model_dir, data, shots: int) -> list[int]:
    """One unbatched forward per question, log-softmax over the vocabulary, best of A-D."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist import mmlu

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
    zero3, log = _run(args + ZERO3, root / "two-zero3.json", nproc=2)
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
    assert not (tmp_path / "r.json").exists()
