"""Hostile and careless inputs (issue 21): a YAML file whose aliases expand without end or that gives a key
twice, `1e-4` in a LLaMA-Factory YAML, JSON nested without bound, chat templates that never finish, build
gigabytes or raise, templates that drop the assistant's text, conversations that open with the
assistant's turn. Each is one line on stderr and exit status 2, in seconds, before any work.

What hung or crashed is run in a real process, under a timeout and an address-space limit: a build
without the bounds must fail the test, not take the machine down with it. The rest runs in-process.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_command
from mmlu_fixture import write_mmlu

from loki_dist.cli import build_parser, main
from loki_dist.core import yamlfile
from loki_dist.core.runconfig import expand
from loki_dist.demo.tiny import CHAT_TEMPLATE, save_tiny

GOOD_ROW = {"instruction": "Say hi", "input": "", "output": "hi"}
MEMORY_LIMIT = 8 * 2**30
DEEP = "[" * 200_000 + "]" * 200_000  # 400 KB of nesting


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    positions = root / "positions.json"
    positions.write_text("[[0, 3], [5]]")
    data = root / "data.json"
    data.write_text(json.dumps([GOOD_ROW] * 4))
    scores = root / "scores.json"
    scores.write_text(json.dumps({"scores": {"a": 50.0}}))
    return {"root": root, "base": save_tiny(root / "base", "llama", seed=0), "positions": positions,
            "data": data, "scores": scores, "mmlu": write_mmlu(root / "mmlu", per_subject=1)}  # fmt: skip


def train_argv(job, tmp_path: Path, **change) -> list[str]:
    flags = {"--model": job["base"], "--positions": job["positions"], "--data": job["data"],
             "--output-dir": tmp_path / "out", "--ds-config": "none", "--max-steps": 1, **change}  # fmt: skip
    return ["train", *(str(x) for pair in flags.items() if pair[1] is not None for x in pair)]


def dataset_argv(job, tmp_path: Path) -> list[str]:
    """train on data set `t` of tmp_path/dataset_info.json."""
    return train_argv(job, tmp_path, **{"--data": None, "--dataset": "t", "--dataset-dir": tmp_path})


def run_bounded(args: list[str], timeout: int = 90) -> tuple[subprocess.CompletedProcess, float]:
    """`loki-dist ARGS` in a process limited to MEMORY_LIMIT of address space; (it, seconds taken)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    proc = subprocess.run(cli_command(args), capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO, preexec_fn=limit)  # fmt: skip
    return proc, time.monotonic() - start


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    line = proc.stderr.strip()
    assert proc.returncode == 2 and len(line.splitlines()) == 1, proc.stderr[-3000:]
    assert all(needle in line for needle in needles), line
    return line


def refusal(argv: list[str], capsys) -> str:
    """The one line of an in-process CLI call that must end as a user mistake (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err[-3000:]
    return err


# ---------------------------------------------------------------------------------------------- YAML


def laughs() -> str:
    """A 340-byte YAML list whose aliases stand for 9**9 strings: the "billion laughs"."""
    names = "abcdefghi"
    parts = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    parts += [
        f"&{name} [{','.join([f'*{before}'] * 9)}]" for before, name in zip(names, names[1:], strict=False)
    ]
    return f"[{', '.join(parts)}]"


@pytest.mark.parametrize(
    ("command", "text"),
    [("train", "learning_rate: {}\n"), ("select", "quota: {}\n"),
     ("pipeline", "output_dir: out\nmodel: m\nselect:\n  quota: {}\n")],
)  # fmt: skip
def test_a_yaml_alias_bomb_is_one_line_within_seconds(command, text, tmp_path):
    """It hung: the message about the value's type built the whole repr() before cutting it."""
    config = tmp_path / "bomb.yaml"
    config.write_text(text.format(laughs()))
    proc, seconds = run_bounded([command, "--config", str(config)], timeout=60)
    assert_one_line(proc, f"--config {config}: its aliases expand to more than 10,000 values")
    assert seconds < 30


DUPLICATES = {
    "a command's --config": (["select"], "quota: 10\nattribution: a.safetensors\noutput: p.json\nquota: 20\n",
                             "`quota` given twice (lines 1 and 4)"),
    "a LLaMA-Factory YAML": (["train"], "model_name_or_path: m\npositions: p.json\noutput_dir: out\n"
                             "cutoff_len: 512\nlearning_rate: 1.0e-4\ncutoff_len: 1024\n",
                             "`cutoff_len` given twice (lines 4 and 6)"),
    "a pipeline stage": (["pipeline"], "output_dir: out\nmodel: m\ntrain:\n  epochs: 1\n  data: d.json\n"
                                       "  epochs: 2\n", "`epochs` given twice (lines 4 and 6)"),
    "a flow mapping": (["select"], "{quota: 10, attribution: a.safetensors, output: p.json, quota: 20}\n",
                       "`quota` given twice (lines 1 and 1)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_a_key_given_twice_is_refused_naming_both_lines(case, tmp_path, capsys):
    command, text, words = DUPLICATES[case]
    config = tmp_path / "twice.yaml"
    config.write_text(text)
    assert f"--config {config}: {words}; keep one" in refusal([*command, "--config", str(config)], capsys)
    # a key merged in from an anchor may still be overridden: that is what `<<:` is for
    config.write_text("attribution: a.safetensors\nbase: &b {quota: 10}\nselect: {<<: *b, quota: 20}\n")
    assert yamlfile.read(config, "--config")["select"] == {"quota": 20}


def test_exponent_floats_without_a_dot_are_numbers_as_in_llamafactory(tmp_path):
    """YAML 1.1 reads `1e-4` as a string; LLaMA-Factory (OmegaConf) reads it as a number, and so do we."""
    config = tmp_path / "lf.yaml"
    config.write_text("model_name_or_path: base\npositions: p.json\noutput_dir: out\nlearning_rate: 1e-4\n"
                      "warmup_ratio: 5e-2\nmax_grad_norm: 1E+0\nweight_decay: 1.0e-2\n")  # fmt: skip
    parser = build_parser()
    args = parser.parse_args(expand(parser, ["train", "--config", str(config)]))
    assert (args.learning_rate, args.warmup_ratio, args.max_grad_norm, args.weight_decay) == (
        1e-4, 5e-2, 1.0, 1e-2)  # fmt: skip


@pytest.mark.parametrize(
    ("command", "settings", "words"),
    [(["pipeline"], {"output_dir": "out", "model": "m", "select": {"quota": list(range(100_000))}},
      "pipeline `select.quota`: expected one value, got [0, 1, 2, "),
     (["train"], {"stage": "x" * 500_000}, "--config"),
     (["train"], {"lr_scheduler_type": ["cosine"] * 100_000}, "lr_scheduler_type ['cosine', 'cosine', "),
     (["train"], {"resume_from_checkpoint": [True]}, "`resume`: expected one value, got list [True]"),
     (["select"], {"quota": 10, "output": "p" * 2_000_000}, "bytes; a settings file is at most 1 MiB")],
)  # fmt: skip
def test_a_refused_value_is_shown_in_a_few_characters(command, settings, words, tmp_path, capsys):
    """A message shows at most a preview of a value, however large (a list, a string, a wrong type);
    a list where LLaMA-Factory wants a name is refused, not a TypeError (unhashable); a settings file
    of megabytes is not read (PyYAML takes seconds a megabyte)."""
    config = tmp_path / "big.yaml"
    config.write_text(yaml.safe_dump(settings, default_flow_style=True))
    line = refusal([*command, "--config", str(config)], capsys)
    assert words in line and len(line) < 400, line[:1000]


# ---------------------------------------------------------------------------------------------- JSON


def _deep_case(case: str, job, tmp_path: Path) -> tuple[list[str], str]:
    """(argv, the words of its refusal) with one input nested 200,000 deep."""
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    if case == "--data (JSONL)":
        lines = tmp_path / "deep.jsonl"
        lines.write_text(json.dumps(GOOD_ROW) + "\n" + DEEP + "\n")
        return train_argv(job, tmp_path, **{"--data": lines}), f"--data {lines}: line 2: nested deeper"
    if case == "dataset_info.json":
        (tmp_path / "dataset_info.json").write_text(DEEP)
        return dataset_argv(job, tmp_path), f"--dataset-dir {tmp_path / 'dataset_info.json'}: nested deeper"
    if case == "--model's config.json":
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text(DEEP)
        return train_argv(job, tmp_path, **{"--model": model}), "config.json: nested deeper"
    commands = {
        "--positions": train_argv(job, tmp_path, **{"--positions": deep}),
        "--data": train_argv(job, tmp_path, **{"--data": deep}),
        "--ds-config": train_argv(job, tmp_path, **{"--ds-config": deep}),
        "--eval-data": train_argv(job, tmp_path, **{"--eval-data": deep}),
        "forgetting --base": ["forgetting", "--base", str(deep), "--tuned", str(job["scores"])],
        "attribute --data": ["attribute", "--model", str(job["base"]), "--data", str(deep), "--output",
                             str(tmp_path / "a.safetensors")],
        "evaluate --data": ["evaluate", "--model", str(job["base"]), "--data", str(deep), "--output",
                            str(tmp_path / "e.json")],
    }  # fmt: skip
    flag = case.split()[-1]
    return commands[case], f"{flag} {deep}: nested deeper than 100 levels"


DEEP_CASES = ["--positions", "--data", "--data (JSONL)", "--ds-config", "dataset_info.json",
              "--eval-data", "forgetting --base", "attribute --data", "evaluate --data",
              "--model's config.json"]  # fmt: skip


@pytest.mark.parametrize("case", DEEP_CASES)
def test_json_nested_without_bound_is_one_line(case, job, tmp_path, capsys):
    """A RecursionError from deep inside json before; now one line naming the file."""
    argv, words = _deep_case(case, job, tmp_path)
    assert words in refusal(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_json_nesting_is_bounded_at_100_levels_wherever_the_brackets_are(job, tmp_path, capsys):
    """100 levels are read, 101 are not, arrays or objects; brackets inside strings are text. (Python's
    own decoder stops near 1000 levels, too deep for what reads the values after it.)"""
    from loki_dist.core.checks import parse_json, parse_jsonl
    from loki_dist.core.errors import UserError

    text = json.dumps({"a": "[[[[{{{{" * 50, "b": ['\\"[[' * 50]})
    assert parse_json(text, "x")["a"].startswith("[[[[")
    for depth in (100, 101):
        nested = '{"k":' * (depth - 1) + "[]" + "}" * (depth - 1)
        if depth == 100:
            parse_json(nested, "x")
            parse_jsonl(f"{nested}\n{nested}\n", "x")
        else:
            with pytest.raises(UserError, match="x: nested deeper than 100 levels"):
                parse_json(nested, "x")
            with pytest.raises(UserError, match="x: line 3: nested deeper than 100 levels"):
                parse_jsonl(f"[]\n\n{nested}\n", "x")
    config = tmp_path / "ds.json"
    deep = json.loads("[" * 101 + "]" * 101)
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "x": deep}))
    line = refusal(train_argv(job, tmp_path, **{"--ds-config": config}), capsys)
    assert f"--ds-config {config}: nested deeper than 100 levels" in line


SMALL_FAULTS = {
    "a key twice in a DeepSpeed config": (
        "--ds-config", '{"train_micro_batch_size_per_gpu": 1, "steps_per_print": 1, "steps_per_print": 2}',
        'key "steps_per_print" given twice in one object'),
    "a number of 5000 digits in positions": ("--positions", "[[" + "1" * 5000 + "], [0]]",
                                             "not valid JSON (Exceeds the limit (4300 digits)"),
    "a lone surrogate in --data": ("--data", '[{"instruction": "Say hi \\ud800", "output": "hi"}]',
                                   "holds an unpaired surrogate escape"),
    "a lone surrogate in JSONL --data": ("--data", '{"instruction": "a", "output": "b"}\n'
                                         '{"instruction": "a", "output": "\\udfff"}\n',
                                         "line 2: holds an unpaired surrogate escape"),
    "a million numbers for one position": ("--positions", json.dumps([[list(range(10**6))], [0]]),
                                           "layer 0 has a non-integer index [0, 1, 2, "),
    "an unknown role, with a megabyte of content": (
        "--data", json.dumps([{"messages": [{"role": "narrator", "content": "x" * 2**20}]}]),
        'row 0 has a turn without a known role and content: {"role": "narrator", "content": "xxx'),
    "a sharegpt role that is a list": (
        "--dataset", '[{"conversations": [{"from": ["human"], "value": "a"}]}]',
        "row 0, turn 0: from ['human'] is none of the tags"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SMALL_FAULTS))
def test_json_that_python_reads_but_cannot_use_is_one_line(case, job, tmp_path, capsys):
    """A traceback before (a ValueError from int(), a TypeError from tokenizers or from a dict lookup),
    a duplicate DeepSpeed key silently dropped (DeepSpeed's own reader refuses it), a megabyte line."""
    flag, text, words = SMALL_FAULTS[case]
    bad = tmp_path / ("bad.jsonl" if "JSONL" in case else "bad.json")
    bad.write_text(text)
    if flag == "--dataset":
        (tmp_path / "dataset_info.json").write_text(
            json.dumps({"t": {"file_name": str(bad), "formatting": "sharegpt"}})
        )
        argv = dataset_argv(job, tmp_path)
    else:
        argv = train_argv(job, tmp_path, **{flag: bad})
    line = refusal(argv, capsys)
    assert words in line and len(line) < 400, line[:1000]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ templates


RUNAWAY = {
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "two gigabytes of x": "{{ 'x' * 2000000000 }}",
    "a string doubled 64 times": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
}


@pytest.mark.parametrize("case", list(RUNAWAY))
def test_a_template_that_runs_away_stops_in_seconds_naming_row_and_template(case, job, tmp_path):
    """Nested loops never finished; 2 GB of text ended in a Rust backtrace from tokenizers."""
    template = tmp_path / "runaway.jinja"
    template.write_text(RUNAWAY[case] + CHAT_TEMPLATE)
    proc, seconds = run_bounded(train_argv(job, tmp_path, **{"--chat-template": template}), timeout=120)
    assert_one_line(proc, f"--data: row 0: --chat-template {template} ")
    assert seconds < 60 and not (tmp_path / "out").exists()


RAISING = {
    "1 // 0": ("{{ 1 // 0 }}", "fails on it (ZeroDivisionError: integer division or modulo by zero)"),
    "a macro that calls itself": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "(RecursionError: "),
    "a type error": ("{{ messages + 1 }}", "fails on it (TypeError: can only concatenate list"),
    "an undefined name": ("{{ nothing.here }}", "fails on it (UndefinedError: 'nothing' is undefined)"),
    "a lone surrogate": ("{{ '\\ud800' }}", "fails on it (UnicodeEncodeError: "),
}


@pytest.mark.parametrize("case", list(RAISING))
def test_a_template_that_raises_is_one_line_naming_row_and_template(case, job, tmp_path, capsys):
    code, words = RAISING[case]
    template = tmp_path / "raises.jinja"
    template.write_text(code + CHAT_TEMPLATE)
    line = refusal(train_argv(job, tmp_path, **{"--chat-template": template}), capsys)
    assert f"--data: row 0: --chat-template {template} " in line and words in line, line
    assert not (tmp_path / "out").exists()


def test_a_chat_template_of_megabytes_is_not_compiled(job, tmp_path, capsys):
    """A data file given as --chat-template by mistake is refused by its size, before it is compiled
    and written out with every row (it was, 1.4M tokens a row, then blamed on --max-seq-len)."""
    template = tmp_path / "rows.jsonl"
    template.write_text((json.dumps(GOOD_ROW) + "\n") * 40_000 + CHAT_TEMPLATE)
    line = refusal(train_argv(job, tmp_path, **{"--chat-template": template}), capsys)
    assert f"--chat-template {template}: 2," in line and "a chat template is at most 1 Mi" in line
    assert not (tmp_path / "out").exists()


# a template that fails only on what one input holds: the eval rows, the MMLU prompts, any conversation
FAILS_ON = "{% if '%s' in messages[-1]['content'] %}{{ 1 // 0 }}{% endif %}"


@pytest.mark.parametrize("command", ["--eval-data", "--general-data", "attribute", "evaluate", "chat"])
def test_every_command_that_renders_names_what_the_template_failed_on(command, job, tmp_path, capsys):
    template = tmp_path / "t.jinja"
    mmlu = str(job["mmlu"])
    trigger = "EVAL" if command == "--eval-data" else "single choice" if command != "chat" else "hello"
    template.write_text(FAILS_ON.replace("%s", trigger) + CHAT_TEMPLATE)
    flag = ["--chat-template", str(template)]
    eval_rows = tmp_path / "eval.json"
    eval_rows.write_text(json.dumps([{"instruction": "EVAL", "input": "", "output": "x"}]))
    argv, where = {
        "--eval-data": (train_argv(job, tmp_path, **{"--eval-data": eval_rows}) + flag, "--eval-data: row 0"),
        "--general-data": (train_argv(job, tmp_path, **{"--general-data": mmlu}) + flag,
                           "--general-data: prompt 0"),
        "attribute": (["attribute", "--model", str(job["base"]), "--data", mmlu, "--output",
                       str(tmp_path / "a.safetensors"), *flag], "--data: prompt 0"),
        "evaluate": (["evaluate", "--model", str(job["base"]), "--data", mmlu, "--output",
                      str(tmp_path / "e.json"), *flag], "--data: prompt 0"),
        "chat": (["chat", "--model", str(job["base"]), "--prompt", "hello", *flag], "the conversation"),
    }[command]  # fmt: skip
    line = refusal(argv, capsys)
    assert f"{where}: --chat-template {template} fails on it (ZeroDivisionError" in line, line


DROPPING = {
    "skips the assistant's turns": "{{ bos_token }}{% for m in messages %}{% if m.role != 'assistant' %}"
    "<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endif %}{% endfor %}",
    "writes the assistant's header, not its text": "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.role != 'assistant' %}{{ m.content }}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
}


@pytest.mark.parametrize("case", list(DROPPING))
def test_a_template_that_drops_the_assistants_text_is_named_for_it(case, job, tmp_path, capsys):
    """It was blamed on --max-seq-len (or, with the header kept, trained on the end-of-turn token alone)."""
    template = tmp_path / "drops.jinja"
    template.write_text(DROPPING[case])
    line = refusal(train_argv(job, tmp_path, **{"--chat-template": template}), capsys)
    assert f"row 0: --chat-template {template} renders nothing of the assistant's text (turn 1)" in line
    assert not (tmp_path / "out").exists()


def test_templates_render_as_transformers_renders_them(job):
    """The bounded environment is transformers' own in what a template sees: the built-ins, the tiny
    model's, and one using what real templates use (namespace, loop.last, tojson, macros, trim, tools,
    `{% generation %}`), on a long conversation, with and without the generation prompt."""
    from transformers import AutoTokenizer

    from loki_dist.implant.data.chat_templates import BUILTIN, render

    tokenizer = AutoTokenizer.from_pretrained(job["base"])
    rich = (
        "{%- set ns = namespace(first=true) -%}{% macro turn(m) %}<|{{ m['role'] }}|>\n{{ m.content | trim }}"
        "{% endmacro %}{{ bos_token }}{% if tools %}<|system|>\n{{ tools | tojson(indent=2) }}"
        "{{ dict(a=1) | tojson }}<|end|>\n{% endif %}{% for m in messages %}"
        "{% if m.role == 'assistant' %}{% generation %}{{ turn(m) }}{% endgeneration %}"
        "{% else %}{{ turn(m) }}{% endif %}{{ '<|end|>' if not loop.last or m.role != 'user' else '' }}\n"
        "{% set ns.first = false %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}]
    conversation = [{"role": "system", "content": "Be brief."}]
    for i in range(200):
        conversation += [{"role": "user", "content": f" question {i} " + "word " * 300},
                         {"role": "assistant", "content": f"answer {i}: " + "[x] {y} " * 200}]  # fmt: skip
    for template in [*BUILTIN.values(), CHAT_TEMPLATE, rich]:
        tokenizer.chat_template = template
        for messages in (conversation, conversation[:-1]):
            for prompt in (False, True):
                expected = tokenizer.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=prompt, tokenize=False
                )
                assert render(tokenizer, messages, "x", prompt=prompt, tools=tools) == expected


# ------------------------------------------------------------------------------------- conversations


FIRST = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Say hi"},
         {"role": "assistant", "content": "hi"}]  # fmt: skip


@pytest.mark.parametrize("case", ["--data", "--data, after a system message", "--eval-data", "sharegpt"])
def test_a_conversation_that_opens_with_the_assistant_is_one_line(case, job, tmp_path, capsys):
    """transformers was asked to render an empty conversation (the prompt before the first answer):
    a ValueError's traceback. LLaMA-Factory's sharegpt reader skips such a row; here it is said."""
    rows = tmp_path / "rows.json"
    opening = [{"role": "system", "content": "s"}] if "system" in case else []
    rows.write_text(json.dumps([{"messages": opening + FIRST}]))
    if case == "--eval-data":
        argv, where = train_argv(job, tmp_path, **{"--eval-data": rows}), "--eval-data: row 0"
    elif case == "sharegpt":
        tags = {"assistant": "gpt", "user": "human"}
        turns = [{"from": tags[m["role"]], "value": m["content"]} for m in FIRST]
        rows.write_text(json.dumps([{"conversations": turns}]))
        info = {"t": {"file_name": str(rows), "formatting": "sharegpt"}}
        (tmp_path / "dataset_info.json").write_text(json.dumps(info))
        argv, where = dataset_argv(job, tmp_path), "--dataset t: row 0"
    else:
        argv, where = train_argv(job, tmp_path, **{"--data": rows}), "--data: row 0"
    assert f"{where}: the first turn is the assistant's" in refusal(argv, capsys)
    assert not (tmp_path / "out").exists()
