"""`loki-dist evaluate`: equal to a direct per-question computation, and the same at any world size."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_user_error, run_cli
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


def test_multiple_choice_equals_direct_and_world_sizes_agree(opinionated_llama, tmp_path):
    data = write_mmlu(tmp_path / "mmlu", per_subject=7, dev_per_subject=1)
    common = ["evaluate", "--model", str(opinionated_llama), "--data", str(data), "--shots", "1"]
    common += ["--batch-size", "3", "--scores-per-subject"]
    run_cli([*common, "--output", str(tmp_path / "one.json")])
    run_cli([*common, "--output", str(tmp_path / "two.json")], nproc=2)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))

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
    assert (one.pop("world_size"), two.pop("world_size")) == (1, 2)
    assert one == two


def test_perplexity_equals_direct_and_world_sizes_agree(tiny_llama, tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog " * (i % 4 + 1) + str(i) for i in range(7)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    common = ["evaluate", "--model", str(tiny_llama), "--data", str(tmp_path / "docs.jsonl")]
    common += ["--task", "perplexity", "--text-field", "body", "--max-seq-len", "16", "--batch-size", "3"]
    run_cli([*common, "--output", str(tmp_path / "one.json"), "--name", "web"])
    run_cli([*common, "--output", str(tmp_path / "two.json"), "--name", "web"], nproc=2)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    nll, tokens = _direct_perplexity(tiny_llama, texts, 16)
    assert one["tokens"] == two["tokens"] == tokens
    assert one["nll_sum"] == pytest.approx(nll, rel=1e-6)
    assert two["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-6)
    assert one["scores"] == {"web": pytest.approx(math.exp(nll / tokens), rel=1e-6)}
    assert one["lower_is_better"] == ["web"]


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
