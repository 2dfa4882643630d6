"""MMLU-layout loading and the exact prompt of docs/method.md."""

from __future__ import annotations

import json
import logging
import os

import pytest
from mmlu_fixture import SUBJECTS, make_rows, write_mmlu
from transformers import AutoTokenizer

from loki_dist.attribution import mmlu
from loki_dist.core.errors import UserError
from loki_dist.demo.tiny import build_tokenizer

EXPECTED = (
    "There is a single choice question about High School Biology. "
    "Answer the question by replying A, B, C or D.\n"
    "Question: What is a cell?\n"
    "Choices:\n"
    "A. a\n"
    "B. b\n"
    "C. c\n"
    "D. d\n"
    "Answer: \n"
)


def _question(subject="high_school_biology", answer=2):
    return mmlu.Question(subject, "What is a cell?", ("a", "b", "c", "d"), answer)


def test_prompt_text_is_exactly_the_design():
    assert mmlu.prompt_text(_question()) == EXPECTED
    assert mmlu.subject_title("us_foreign_policy") == "Us Foreign Policy"


def test_chat_template_with_generation_prompt_and_k_shot():
    tokenizer = build_tokenizer()
    shot = _question("high_school_biology", answer=1)
    ids = mmlu.encode(tokenizer, _question(), [shot])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": mmlu.prompt_text(shot)}, {"role": "assistant", "content": "B"},
         {"role": "user", "content": EXPECTED}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids).endswith("Answer: \n<|end|>\n<|assistant|>\n")
    assert ids.count(tokenizer.bos_token_id) == 1


def test_no_chat_template_uses_the_plain_prompt_and_says_so(caplog):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with caplog.at_level(logging.WARNING):
        prompts = mmlu.build_prompts(tokenizer, [_question()], {})
    assert "no chat template" in caplog.text
    assert not prompts.chat_template
    assert tokenizer.decode(prompts.input_ids[0], skip_special_tokens=True) == EXPECTED


def test_sources_agree_and_first_n_per_subject_in_data_order(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = write_mmlu(tmp_path / "jsonl", per_subject=5)
    test_rows = make_rows(5, 0)
    dev_rows = make_rows(2, 1)
    DatasetDict({"test": Dataset.from_list(test_rows), "dev": Dataset.from_list(dev_rows)}).save_to_disk(
        str(tmp_path / "saved")
    )
    parquet = tmp_path / "pq"
    parquet.mkdir()
    Dataset.from_list(test_rows).to_parquet(str(parquet / "test-00000-of-00001.parquet"))
    Dataset.from_list(dev_rows).to_parquet(str(parquet / "dev-00000-of-00001.parquet"))
    (tmp_path / "one.json").write_text(json.dumps(test_rows))
    results = [
        mmlu.load_questions(str(src), per_subject=3, shots=1) for src in (folder, tmp_path / "saved", parquet)
    ]
    assert results[0] == results[1] == results[2]
    questions, shots = results[0]
    assert len(questions) == 3 * len(SUBJECTS)
    expected = [r for i, r in enumerate(test_rows) if i < 3 * len(SUBJECTS)]
    assert [q.question for q in questions] == [r["question"] for r in expected]
    assert all(len(s) == 1 for s in shots.values())
    single, _ = mmlu.load_questions(str(tmp_path / "one.json"), per_subject=2, subjects=["world_religions"])
    assert [q.subject for q in single] == ["world_religions"] * 2


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("answer"), r"lacks column\(s\) answer"),
        (lambda r: r.update(answer=4), "`answer` must be 0-3"),
        (lambda r: r.update(choices=["a", "b", "c"]), "exactly 4 strings, got 3"),
    ],
)
def test_bad_rows_name_the_row(tmp_path, change, message):
    rows = make_rows(2)
    change(rows[3])
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError, match=message) as err:
        mmlu.load_questions(str(tmp_path / "bad.jsonl"))
    assert "row 3" in str(err.value)


def test_other_user_errors(tmp_path):
    write_mmlu(tmp_path / "d")
    with pytest.raises(UserError, match="not found"):
        mmlu.load_questions(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="not in --data"):
        mmlu.load_questions(str(tmp_path / "d"), subjects=["astronomy"])
    (tmp_path / "only.jsonl").write_text(json.dumps(make_rows(1)[0]) + "\n")
    with pytest.raises(UserError, match="no 'dev' split"):
        mmlu.load_questions(str(tmp_path / "only.jsonl"), shots=1)
    with pytest.raises(UserError, match="too few examples"):
        mmlu.load_questions(str(tmp_path / "d"), shots=3)


# --------------------------------------------------------------------------------- hub data, fetched once

HUB_NAME = "loki-test/mmlu-tiny"
# every process that opens a file of the hub cache adds its pid to $LOKI_TEST_HUB_OPENS (an audit hook:
# Python reports every open() it makes, whoever makes it, here the `datasets` library's)
AUDIT_HOOK = """import os, sys
_cache, _log = os.environ.get("HF_DATASETS_CACHE"), os.environ.get("LOKI_TEST_HUB_OPENS")
_seen = []
def _hook(event, args):
    if event == "open" and _cache and _log and not _seen and str(args[0]).startswith(_cache):
        _seen.append(1)
        with open(_log, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
sys.addaudithook(_hook)
"""


def offline_hub_cache(root, rows: list[dict]):
    """A datasets cache holding HUB_NAME (configuration `all`) as `load_dataset` leaves it after a
    download: what HF_DATASETS_OFFLINE=1 then loads without a network (made here by datasets' own json
    builder, moved to where the hub copy of that name lives)."""
    import shutil

    from datasets.packaged_modules.json.json import Json

    (root / "test.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    built = Json(cache_dir=str(root / "build"), dataset_name="mmlu-tiny", config_name="all",
                 data_files={"test": [str(root / "test.jsonl")]})  # fmt: skip
    built.download_and_prepare()
    cache = root / "hf_datasets"
    shutil.copytree(built.cache_dir, cache / "loki-test___mmlu-tiny" / "all" / "0.0.0" / "cached")
    return cache


def test_hub_data_is_loaded_by_one_process_for_every_rank(tmp_path, tiny_llama):
    """`attribute --data OWNER/NAME` on 2 ranks, offline, from a datasets cache: one process (rank 0)
    calls load_dataset and saves a local copy beside the output, which both ranks read; the prompts are
    those of the same rows read from a file. Before, every rank loaded it from the hub cache at once."""
    from conftest import run_cli

    from loki_dist.attribution.stats import load_file
    from loki_dist.core.hubdata import copy_path

    rows = make_rows(2)
    cache = offline_hub_cache(tmp_path, rows)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    opens = tmp_path / "opens.txt"
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache),
           "LOKI_TEST_HUB_OPENS": str(opens), "PYTHONPATH": path}  # fmt: skip
    output = tmp_path / "out" / "a.safetensors"
    args = ["attribute", "--model", str(tiny_llama), "--data", HUB_NAME, "--data-config", "all"]
    run_cli([*args, "--output", str(output)], nproc=2, env=env)
    assert len(set(opens.read_text().split())) == 1  # one process read the hub's data
    copy = copy_path(HUB_NAME, "all", output.parent)
    assert copy.is_dir() and mmlu.read_splits(str(copy))["test"] == rows
    _, metadata = load_file(output)
    questions, shots = mmlu.questions_from_splits({"test": rows}, "rows", 50)
    expected = mmlu.build_prompts(AutoTokenizer.from_pretrained(tiny_llama), questions, shots)
    assert metadata["data_fingerprint"] == expected.fingerprint() and metadata["data"] == HUB_NAME
