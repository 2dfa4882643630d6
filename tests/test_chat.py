"""`loki-dist chat`: greedy answers through the chat template, one conversation per run or per /reset."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, assert_user_error, run_cli

from loki_dist.demo.tiny import save_tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("chat") / "base", "llama", seed=3)


def _greedy(base, text: str, new_tokens: int) -> str:
    """The answer written out by hand: the template's prompt, then the most likely next token, again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)  # fmt: skip
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    answer = []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(torch.tensor([ids + answer])).logits[0, -1].argmax())
            if token in stop:
                break
            answer.append(token)
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


def test_chat_answers_greedily_through_the_template(base):
    proc = run_cli(["chat", "--model", str(base), "--prompt", "hello there", "--max-new-tokens", "6"])
    assert proc.stdout == _greedy(base, "hello there", 6) + "\n"


def test_several_prompts_one_load_each_its_own_conversation_with_separate(base):
    proc = run_cli(["chat", "--model", str(base), "--prompt", "hello there", "--prompt", "what is this?",
                    "--separate", "--max-new-tokens", "6"])  # fmt: skip
    assert proc.stdout.splitlines() == [_greedy(base, "hello there", 6), _greedy(base, "what is this?", 6)]


def test_typed_lines_are_one_conversation_until_reset(base):
    """stdin, as typed: /reset starts over, so the same first message gets the same answer again."""
    proc = subprocess.run(
        [sys.executable, "-m", "loki_dist", "chat", "--model", str(base), "--max-new-tokens", "6"],
        input="hello there\n/reset\nhello there\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = proc.stdout.split("model> ")[1:]
    expected = _greedy(base, "hello there", 6)
    assert [a.rstrip("\n") for a in answers] == [expected, expected]


def test_a_model_without_chat_template_is_one_line(base, tmp_path, capsys):
    plain = save_tiny(tmp_path / "plain", "llama", seed=3)
    (plain / "chat_template.jinja").unlink()
    capsys.readouterr()
    assert_user_error(["chat", "--model", str(plain), "--prompt", "hi"], capsys, "has no chat template")
