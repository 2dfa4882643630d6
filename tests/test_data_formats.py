"""LLaMA-Factory's data layout (dataset_info.json, alpaca and sharegpt with their column and tag mappings,
tools), mixing with ratios, and --chat-template, on real files; labels checked against text rendered here
by hand, and every bad input one line, exit 2, before any work."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml
from conftest import assert_user_error, run_cli
from mmlu_fixture import write_mmlu
from test_train_errors import snapshot

from loki_dist.core.errors import UserError
from loki_dist.core.modeling import load_tokenizer
from loki_dist.demo.tiny import build_tokenizer, save_tiny
from loki_dist.implant.data import dataset_info
from loki_dist.implant.data.examples import IGNORE_INDEX, load_examples

# a template that renders `tools` (as tool-calling models' templates do), in the tiny tokenizer's format
TOOLS_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\nfunctions: {{ tools | tojson }}<|end|>\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WEATHER = [{"name": "get_weather", "description": "today's weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]  # fmt: skip


def layout(root: Path, entries: dict, files: dict[str, list]) -> Path:
    """DIR/dataset_info.json and the data files it names (JSONL for *.jsonl, else a JSON list)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_info.json").write_text(json.dumps(entries))
    for name, rows in files.items():
        text = "\n".join(map(json.dumps, rows)) if name.endswith(".jsonl") else json.dumps(rows)
        (root / name).write_text(text)
    return root


def flags(root: Path, names: str, ratios: str | None = None, seed: int = 0) -> argparse.Namespace:
    return argparse.Namespace(
        dataset=names, dataset_dir=str(root), mix_ratios=ratios, max_samples=None, seed=seed
    )


def by_hand(messages: list[dict], tools: list | None = None) -> tuple[str, str]:
    """(the whole text, the text that must carry labels) in the tiny format, written out here."""
    text = "<|bos|>" + (f"<|system|>\nfunctions: {json.dumps(tools)}<|end|>\n" if tools else "")
    trained = ""
    for m in messages:
        text += f"<|{m['role']}|>\n{m['content']}<|end|>\n"
        trained += f"{m['content']}<|end|>\n" if m["role"] == "assistant" else ""
    return text, trained


def assert_labelled(tokenizer, conversations, expected: list[tuple[str, str]]) -> None:
    examples = load_examples(conversations, tokenizer, 4096, "test").examples
    assert len(examples) == len(expected)
    for example, (text, trained) in zip(examples, expected, strict=True):
        assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        kept = [
            t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX
        ]
        assert all(
            label in (IGNORE_INDEX, t) for t, label in zip(example.input_ids, example.labels, strict=True)
        )
        assert tokenizer.decode(kept) == trained


def test_alpaca_columns_system_and_history(tmp_path):
    columns = {"prompt": "question", "query": "context", "response": "answer", "system": "persona",
               "history": "earlier"}  # fmt: skip
    entry = {"file_name": "qa.jsonl", "columns": columns}
    rows = [
        {"question": "Add", "context": "2 and 3", "answer": "5", "persona": "You count.",
         "earlier": [["1+1?", "2"], ["2+2?", "4"]]},
        {"question": "Name a colour", "answer": "red"},
    ]  # fmt: skip
    root = layout(tmp_path, {"qa": entry}, {"qa.jsonl": rows})
    got = dataset_info.conversations(flags(root, "qa"))
    want = [
        [{"role": "system", "content": "You count."}, {"role": "user", "content": "1+1?"},
         {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "Add\n2 and 3"},
         {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "red"}],
    ]  # fmt: skip
    assert [c.messages for c in got] == want and got[0].where == "--dataset qa: row 0"
    assert_labelled(build_tokenizer(), got, [by_hand(m) for m in want])


def test_sharegpt_tags_system_tools_function_calls_and_observations(tmp_path):
    entry = {"file_name": "calls.json", "formatting": "sharegpt",
             "columns": {"messages": "turns", "system": "sys", "tools": "functions"},
             "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "person",
                      "assistant_tag": "bot", "observation_tag": "result", "function_tag": "call",
                      "system_tag": "sys_turn"}}  # fmt: skip
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    rows = [
        {"sys": "Use the tools.", "functions": json.dumps(WEATHER), "turns": [
            {"speaker": "person", "text": "Weather in Paris?"}, {"speaker": "call", "text": call},
            {"speaker": "result", "text": '{"temp": 21}'}, {"speaker": "bot", "text": "It is 21 degrees."}]},
        {"turns": [{"speaker": "sys_turn", "text": "Be short."}, {"speaker": "person", "text": "Hi"},
                   {"speaker": "bot", "text": "Hello"}]},
    ]  # fmt: skip
    root = layout(tmp_path, {"calls": entry}, {"calls.json": rows})
    got = dataset_info.conversations(flags(root, "calls"))
    first = [{"role": "system", "content": "Use the tools."},
             {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": call},
             {"role": "tool", "content": '{"temp": 21}'},
             {"role": "assistant", "content": "It is 21 degrees."}]  # fmt: skip
    second = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}]  # fmt: skip
    assert [c.messages for c in got] == [first, second]
    assert got[0].tools == WEATHER and got[1].tools is None
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    assert_labelled(tokenizer, got, [by_hand(first, WEATHER), by_hand(second)])
    # the tiny tokenizer's own template has no use for tools: they would vanish, so they are refused
    with pytest.raises(
        UserError, match=r"--dataset calls: row 0 has tools, but the chat template renders nothing"
    ):
        load_examples(got, build_tokenizer(), 4096, "test")


def test_mixing_follows_the_ratios_until_one_runs_out_and_repeats_with_the_seed(tmp_path):
    def rows(tag: str, n: int) -> list[dict]:
        return [{"instruction": f"{tag}{i}", "output": "x"} for i in range(n)]

    entries = {"a": {"file_name": "a.json"}, "b": {"file_name": "b.jsonl"}}
    root = layout(tmp_path, entries, {"a.json": rows("a", 300), "b.jsonl": rows("b", 300)})
    mixed = dataset_info.conversations(flags(root, "a,b", "0.7,0.3", seed=5))
    prompts = [c.messages[0]["content"] for c in mixed]
    from_a = [p for p in prompts if p.startswith("a")]
    from_b = [p for p in prompts if p.startswith("b")]
    assert from_a == [f"a{i}" for i in range(300)] and prompts[-1] == "a299"  # a ran out first, in order
    assert from_b == [f"b{i}" for i in range(len(from_b))]
    assert abs(len(from_b) / len(prompts) - 0.3) < 0.05, len(from_b)
    again = dataset_info.conversations(flags(root, "a,b", "7,3", seed=5))  # ratios need not sum to 1
    assert [c.messages for c in again] == [c.messages for c in mixed]
    other = dataset_info.conversations(flags(root, "a,b", "0.7,0.3", seed=6))
    assert [c.messages for c in other] != [c.messages for c in mixed]
    together = dataset_info.conversations(flags(root, "b,a"))  # no ratios: one after the other
    assert [c.messages[0]["content"] for c in together] == [f"b{i}" for i in range(300)] + from_a


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory) -> Path:
    """A tiny base model whose tokenizer has no chat template."""
    base = save_tiny(tmp_path_factory.mktemp("plain") / "base", "llama", seed=0)
    (base / "chat_template.jinja").unlink()
    assert load_tokenizer(base).chat_template is None
    return base


def test_chat_template_by_name_or_file_on_a_base_without_one(plain_base, tmp_path, capsys):
    from loki_dist.cli import main
    from loki_dist.implant.data.chat_templates import BUILTIN

    assert load_tokenizer(plain_base, chat_template="qwen").chat_template == BUILTIN["chatml"]
    template = tmp_path / "mine.jinja"
    template.write_text(TOOLS_TEMPLATE)
    assert load_tokenizer(plain_base, chat_template=str(template)).chat_template == TOOLS_TEMPLATE
    positions = tmp_path / "p.json"
    positions.write_text("[[0], [1]]")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Say hi", "output": "hi"}] * 2))
    argv = ["train", "--model", str(plain_base), "--positions", str(positions), "--data", str(data),
            "--ds-config", "none", "--max-steps", "1", "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert_user_error(argv, capsys, "the tokenizer has no chat template: pass --chat-template")
    run_cli([*argv, "--chat-template", "llama3"])
    assert (tmp_path / "out" / "final" / "implant.safetensors").is_file()
    main(["chat", "--model", str(plain_base), "--chat-template", str(template), "--prompt", "hi",
          "--max-new-tokens", "2"])  # fmt: skip
    assert capsys.readouterr().out.strip()
    mmlu = write_mmlu(tmp_path / "mmlu", per_subject=1)
    for template_flag, used in ((["--chat-template", "gemma"], True), ([], False)):
        out = tmp_path / f"eval{used}.json"
        main(
            [
                "evaluate",
                "--model",
                str(plain_base),
                "--data",
                str(mmlu),
                "--output",
                str(out),
                *template_flag,
            ]
        )
        assert json.loads(out.read_text())["chat_template"] is used


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    positions = root / "p.json"
    positions.write_text("[[0], [1]]")
    return {"root": root, "base": save_tiny(root / "base", "llama", seed=0), "positions": positions}


GOOD_ROW = {"instruction": "Say hi", "output": "hi"}
BAD = {
    "neither --data nor --dataset": ({"drop": "--dataset"}, "give one of --data FILE and --dataset NAME"),
    "both --data and --dataset": ({"add": ["--data", "x.json"]}, "give one of them, not both"),
    "no dataset_info.json": ({"add": ["--dataset-dir", "/nonexistent"]}, "no dataset_info.json there"),
    "an unknown name": ({"names": "nope"}, "--dataset nope: not in "),
    "a hub-only entry": ({"entry": {"hf_hub_url": "Team-ACE/ToolACE"}},
                         "only hf_hub_url 'Team-ACE/ToolACE', and loki_dist reads local files only (no hub"),
    "a ranking entry": ({"entry": {"file_name": "t.json", "ranking": True}}, "a ranking (preference) data"),
    "an unknown formatting": ({"entry": {"file_name": "t.json", "formatting": "xml"}}, "formatting 'xml'"),
    "an image column": ({"entry": {"file_name": "t.json", "columns": {"images": "img"}}},
                        "columns 'images' is not supported; expected prompt, query"),
    "a missing file": ({"entry": {"file_name": "gone.json"}}, "gone.json: file or directory not found"),
    "a row without its response": ({"rows": [{"instruction": "x"}]}, "row 0: column `output` must be a"),
    "a turn with an unknown role": (
        {"entry": {"file_name": "t.json", "formatting": "sharegpt"},
         "rows": [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}]},
        "row 0, turn 1: from 'bot' is none of the tags"),
    "tools that are not JSON": (
        {"entry": {"file_name": "t.json", "columns": {"tools": "tools"}},
         "rows": [{**GOOD_ROW, "tools": "[{"}]},
        "row 0: column `tools`: not valid JSON"),
    "one ratio for two data sets": ({"names": "t,t", "add": ["--mix-ratios", "0.5"]}, "1 ratios for 2 data"),
    "a negative ratio": ({"names": "t,t", "add": ["--mix-ratios", "1,-1"]}, "expected positive finite"),
    "a ratio that is not a number": ({"names": "t,t", "add": ["--mix-ratios", "1,nan"]}, "positive finite"),
    "ratios for one data set": ({"add": ["--mix-ratios", "1"]}, "mixes several --dataset names, got 1"),
    "ratios whose sum overflows": ({"names": "t,t", "add": ["--mix-ratios", "1e308,1e308"]},
                                   "--mix-ratios 1e308,1e308: their sum overflows; only the proportions"),
    "no samples": ({"add": ["--max-samples", "0"]}, "--max-samples 0: expected a positive integer"),
    "an unknown template name": ({"add": ["--chat-template", "vicuna"]}, "neither a file nor a built-in"),
    "a template that is not Jinja": ({"template": "{% for %}"}, "not a valid Jinja template"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_input_is_one_line_before_any_work(case, job, tmp_path, capsys):
    change, expected = BAD[case]
    entry = change.get("entry", {"file_name": "t.json"})
    root = layout(tmp_path / "data", {"t": entry}, {"t.json": change.get("rows", [GOOD_ROW] * 2)})
    extra = list(change.get("add", []))
    if "template" in change:
        (tmp_path / "bad.jinja").write_text(change["template"])
        extra += ["--chat-template", str(tmp_path / "bad.jinja")]
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user file")
    argv = ["train", "--model", str(job["base"]), "--positions", str(job["positions"]),
            "--output-dir", str(out), "--ds-config", "none", "--max-steps", "1",
            "--dataset", change.get("names", "t"),
            "--dataset-dir", str(root), *extra]  # fmt: skip
    if change.get("drop"):
        at = argv.index(change["drop"])
        del argv[at : at + 2]
    assert_user_error(argv, capsys, expected)
    assert snapshot(out) == {"precious.txt": snapshot(out)["precious.txt"]}


def test_pipeline_passes_the_data_flags_on_and_checks_them_first(job, tmp_path, capsys):
    from loki_dist.pipeline.stages import build_stages, load_config, validate

    root = layout(tmp_path / "data", {"t": {"file_name": "t.json"}}, {"t.json": [GOOD_ROW] * 4})
    train = {"dataset": ["t", "t"], "dataset_dir": str(root), "mix_ratios": [1, 1], "chat_template": "chatml",
             "max_samples": 3, "ds_config": "none"}  # fmt: skip
    mmlu = write_mmlu(tmp_path / "mmlu", per_subject=1)
    config = {"output_dir": str(tmp_path / "run"), "model": str(job["base"]),
              "attribute": {"data": str(mmlu)}, "select": {"quota": 25}, "train": train}  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    stages = build_stages(load_config(str(path)))
    argv = stages[2].argv
    for flag, value in train.items():  # each key as its flag, followed by its value
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        assert argv[argv.index("--" + flag.replace("_", "-")) + 1] == text
    validate(str(path), config, stages)
    path.write_text(yaml.safe_dump({**config, "train": {**train, "mix_ratios": [1]}}))
    assert_user_error(["pipeline", "--config", str(path)], capsys, "`train`: --mix-ratios 1: 1 ratios for 2")
    assert not (tmp_path / "run" / "attribution.safetensors").exists()
