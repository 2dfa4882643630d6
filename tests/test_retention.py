"""`evaluate --task completion` and `--task retention` (issue 24.3): a folder of retention probes scored in
one load, each part equal to its own task, and facts against a direct reading of "completed exactly"."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from mmlu_fixture import write_mmlu

from loki_dist.cli import main

PROMPTS = ["The capital of France is", "Water is made of hydrogen and", "Two plus two equals",
           "The largest planet is", "Ice is the solid form of"]  # fmt: skip


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    from loki_dist.demo.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("retention") / "model", "llama", seed=3, sharp=True)


def _greedy_facts(model_dir) -> list[tuple[str, str]]:
    """Each prompt with, as its answer, the model's own two greedy tokens (completed, where the answer
    tokenises back to them) and a word it does not write next (not completed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    facts = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            for _ in range(2):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            facts += [(prompt, tokenizer.decode(ids[-2:])), (prompt, " zebra")]
    return facts


def _completed(model_dir, facts) -> list[bool]:
    """Unbatched, by the definition: every answer token the argmax after the prompt and earlier ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    done = []
    with torch.no_grad():
        for prompt, answer in facts:
            head, tail = (
                tokenizer(prompt)["input_ids"],
                tokenizer(answer, add_special_tokens=False)["input_ids"],
            )
            logits = model(torch.tensor([head + tail])).logits[0]
            done.append(all(int(logits[len(head) - 1 + i].argmax()) == t for i, t in enumerate(tail)))
    return done


def _write_facts(path, facts) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in facts))


def test_completion_on_two_ranks_equals_the_definition(sharp, tmp_path):
    facts = _greedy_facts(sharp)
    expected = _completed(sharp, facts)
    assert any(expected) and not all(expected)
    data = tmp_path / "facts.jsonl"
    _write_facts(data, facts)
    out = tmp_path / "facts.json"
    run_cli(["evaluate", "--model", str(sharp), "--task", "completion", "--data", str(data), "--output",
             str(out), "--batch-size", "3"], nproc=2)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["predictions"] == expected  # in data order, whatever rank scored each
    assert result["scores"] == {"facts": 100 * sum(expected) / len(expected)}


def test_a_retention_folder_is_each_task_in_one_load(sharp, tmp_path, capsys):
    folder = tmp_path / "retention"
    folder.mkdir()
    facts = _greedy_facts(sharp)
    (folder / "facts.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in facts)
    )
    (folder / "prose.jsonl").write_text("".join(json.dumps({"text": p * 3}) + "\n" for p in PROMPTS))
    write_mmlu(tmp_path / "mmlu")
    questions = next(p for p in sorted((tmp_path / "mmlu").rglob("*")) if p.is_file() and "test" in p.name)
    (folder / "questions.json").write_text(questions.read_text())
    base = ["evaluate", "--model", str(sharp)]
    main([*base, "--task", "retention", "--data", str(folder), "--output", str(tmp_path / "all.json")])
    alone = {}
    for task, file in (("perplexity", "prose.jsonl"), ("multiple_choice", "questions.json"),
                       ("completion", "facts.jsonl")):  # fmt: skip
        main(
            [*base, "--task", task, "--data", str(folder / file), "--output", str(tmp_path / f"{task}.json")]
        )
        alone[task] = json.loads((tmp_path / f"{task}.json").read_text())["scores"]
    together = json.loads((tmp_path / "all.json").read_text())
    assert together["scores"] == {
        "prose_perplexity": alone["perplexity"]["perplexity"],
        "questions": alone["multiple_choice"]["mmlu"],
        "facts": alone["completion"]["facts"],
    }
    assert together["lower_is_better"] == ["prose_perplexity"]
    capsys.readouterr()
