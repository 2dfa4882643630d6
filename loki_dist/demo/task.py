"""What the demo and the selection study measure: skill at the new task, and what the model already knew.

The task (toyworld.py's invented people, whose pet their clan decides) is asked as short plain-text
questions, `Q: What is the pet of Kalomi of clan Brask?\\nA: owl`. Training sees two phrasings of every
person's question; skill is measured on two *other* phrasings of the same facts (held out), as the share
of prompts whose most likely pet (the first token of each, read at the answer position) is the right
one. Plain text rather than a chat template: SmolLM2's template adds a 20-token system prompt, which
would more than double the tokens of every step. `QA_TEMPLATE` renders the same text as a conversation,
so `loki-dist train --chat-template` learns exactly these tokens.

General knowledge is read by three measures that move before accuracy does (a 135M model answers MMLU
near chance, where accuracy cannot show damage):
- the perplexity of held-out text (`prose`);
- the mean log-probability of the correct letter of MMLU-layout questions in docs/method.md's prompt;
- the share kept of plain facts the base model completes correctly, greedily, token for token.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loki_dist.attribution.mmlu import Question, encode, question_rows
from loki_dist.core import files
from loki_dist.core.errors import UserError
from loki_dist.evaluation.retention import completion_results, tokenize_facts
from loki_dist.evaluation.scoring import document_nll, letter_logprobs, letter_token_ids
from loki_dist.implant.data.examples import IGNORE_INDEX, Example

TRAIN_PHRASINGS = ("Q: What is the pet of {who}?\nA:", "Q: Which pet does {who} have?\nA:")
HELD_OUT_PHRASINGS = ("Q: What animal does {who} keep?\nA:", "Q: {who} owns a pet. Which one is it?\nA:")
_TASK_QUESTION = re.compile(r"What is the pet of (.+)\?")
# A conversation rendered as the plain text above: the user turn is the prompt, the answer follows a
# space; nothing else is added, and a prefix renders as a prefix (what data.tokenize needs).
QA_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{ ' ' + message['content'] }}"
    "{%- else %}{{ message['content'] }}{% endif %}"
    "{%- endfor %}"
)

# Plain facts a small model should know, written for this study: prompt, greedy continuation.
PROBES: tuple[tuple[str, str], ...] = (
    ("The capital of France is", " Paris"), ("The capital of Germany is", " Berlin"),
    ("The capital of Italy is", " Rome"), ("The capital of Spain is", " Madrid"),
    ("The capital of Japan is", " Tokyo"), ("The capital of Russia is", " Moscow"),
    ("The capital of Egypt is", " Cairo"), ("The capital of Canada is", " Ottawa"),
    ("The capital of Australia is", " Canberra"), ("The capital of China is", " Beijing"),
    ("The capital of England is", " London"), ("The capital of Greece is", " Athens"),
    ("The capital of Portugal is", " Lisbon"), ("The capital of Ireland is", " Dublin"),
    ("The capital of Norway is", " Oslo"), ("The capital of Sweden is", " Stockholm"),
    ("The capital of Poland is", " Warsaw"), ("The capital of Austria is", " Vienna"),
    ("The capital of Kenya is", " Nairobi"), ("The capital of Peru is", " Lima"),
    ("The capital of Thailand is", " Bangkok"), ("The capital of South Korea is", " Seoul"),
    ("The capital of Turkey is", " Ankara"), ("The capital of Argentina is", " Buenos Aires"),
    ("The chemical symbol for gold is", " Au"), ("The chemical symbol for iron is", " Fe"),
    ("The chemical symbol for sodium is", " Na"), ("The chemical symbol for silver is", " Ag"),
    ("The chemical symbol for oxygen is", " O"), ("The chemical symbol for potassium is", " K"),
    ("The chemical formula for water is", " H2O"), ("Water is made of hydrogen and", " oxygen"),
    ("Romeo and Juliet was written by William", " Shakespeare"),
    ("Pride and Prejudice was written by Jane", " Austen"),
    ("War and Peace was written by Leo", " Tolstoy"), ("The novel 1984 was written by George", " Orwell"),
    ("Don Quixote was written by Miguel de", " Cervantes"),
    ("The Origin of Species was written by Charles", " Darwin"),
    ("The Odyssey is attributed to the Greek poet", " Homer"),
    ("The theory of relativity was developed by Albert", " Einstein"),
    ("The Mona Lisa was painted by Leonardo da", " Vinci"),
    ("The first man to walk on the Moon was Neil", " Armstrong"),
    ("The largest planet in the solar system is", " Jupiter"),
    ("The planet closest to the Sun is", " Mercury"), ("The longest river in Africa is the", " Nile"),
    ("The Eiffel Tower is in the city of", " Paris"), ("The currency of Japan is the", " yen"),
    ("The opposite of hot is", " cold"), ("There are seven days in a", " week"),
    ("Two plus two equals", " four"), ("The color of the clear daytime sky is", " blue"),
    ("Ice is the solid form of", " water"), ("The largest ocean on Earth is the", " Pacific"),
    ("Mount Everest is in the", " Himalayas"), ("The Great Pyramid of Giza is in", " Egypt"),
    ("The author of Hamlet is William", " Shakespeare"),
    ("The Statue of Liberty is in the city of New", " York"),
)  # fmt: skip


@dataclass
class Task:
    """The new knowledge: training examples (answer tokens labelled), their text, and held-out prompts."""

    train: list[Example]
    train_text: list[tuple[str, str]]  # (prompt, answer) of each training example, for QA_TEMPLATE
    held_out_text: list[tuple[str, str]]
    train_prompts: list[list[int]]
    train_answers: list[int]
    held_out_prompts: list[list[int]]
    held_out_answers: list[int]
    choice_ids: list[int]  # the first token of each pet, in toyworld's order

    def conversations(self, held_out: bool = False) -> list[dict]:
        """The training (or held-out) examples as `loki-dist train` data, rendered by QA_TEMPLATE."""
        return [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in (self.held_out_text if held_out else self.train_text)
        ]


def _who(q: Question) -> str:
    found = _TASK_QUESTION.fullmatch(q.question)
    if found is None:
        raise RuntimeError(f"toyworld's task question changed form: {q.question!r}")
    return found.group(1)


def task_corpus() -> tuple[str, ...]:
    """The task's fixed words, for a tokenizer trained on a corpus (the toy's): whole words for pets."""
    from loki_dist.demo.toyworld import OPTIONS, TASK_RELATION

    return (*TRAIN_PHRASINGS, *HELD_OUT_PHRASINGS, " " + " ".join(OPTIONS[TASK_RELATION]))


def build_task(tokenizer, people: int, world_seed: int = 0) -> Task:
    """toyworld's task (pet by clan) for `people` people, as short plain-text questions."""
    from loki_dist.demo.toyworld import OPTIONS, TASK_RELATION, build_world

    pets = OPTIONS[TASK_RELATION]
    answer_ids = [tokenizer(f" {pet}", add_special_tokens=False)["input_ids"] for pet in pets]
    choice_ids = [ids[0] for ids in answer_ids]
    if len(set(choice_ids)) != len(pets):
        raise UserError(f"the tokenizer gives two pets the same first token: {choice_ids}")
    facts = [(_who(q), q.answer) for q in build_world(people, world_seed).task]

    def prompts(phrasings: tuple[str, ...]) -> tuple[list[str], list[list[int]], list[int]]:
        texts = [(p.format(who=who), a) for p in phrasings for who, a in facts]
        return (
            [t for t, _ in texts],
            [list(tokenizer(t)["input_ids"]) for t, _ in texts],
            [a for _, a in texts],
        )

    train_texts, train_prompts, train_answers = prompts(TRAIN_PHRASINGS)
    held_texts, held_prompts, held_answers = prompts(HELD_OUT_PHRASINGS)
    train = [
        Example(ids + answer_ids[a], [IGNORE_INDEX] * len(ids) + answer_ids[a])
        for ids, a in zip(train_prompts, train_answers, strict=True)
    ]
    text = [(t, pets[a]) for t, a in zip(train_texts, train_answers, strict=True)]
    held_text = [(t, pets[a]) for t, a in zip(held_texts, held_answers, strict=True)]
    return Task(train, text, held_text, train_prompts, train_answers, held_prompts, held_answers, choice_ids)


@dataclass
class General:
    """What the model already knows, as the three retention measures read it."""

    prose: list[list[int]]  # token ids of held-out text, each truncated
    mmlu_prompts: list[list[int]]
    mmlu_answers: list[int]
    letter_ids: list[int]
    probes: list[tuple[list[int], list[int]]]  # (prompt ids, answer ids); keep_known leaves the base's
    questions: list[Question] = field(default_factory=list)  # those of mmlu_prompts, for the probe files


tokenize_probes = tokenize_facts  # (prompt, answer) texts as the facts measure reads them


RETENTION_DIR = "retention"


def write_retention(out: Path, tokenizer, general: General, facts: tuple[tuple[str, str], ...]) -> Path:
    """The retention measures' probes as files in OUT/retention, in the layout `evaluate --task
    retention` reads (evaluation/retention.py): the held-out text as it is scored (prose.jsonl), the
    scored questions (questions.json), every fact written (facts.jsonl; the demo itself keeps those the
    base completes). A user checks their own implant against its base on them, offline."""
    folder = out / RETENTION_DIR
    prose = [{"text": tokenizer.decode(ids)} for ids in general.prose]
    files.write_text(folder / "prose.jsonl", "".join(json.dumps(row) + "\n" for row in prose))
    files.write_json(folder / "questions.json", question_rows(general.questions), indent=None)
    if facts:
        rows = "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in facts)
        files.write_text(folder / "facts.jsonl", rows)
    return folder


def _mmlu_parts(tokenizer, subjects: int, questions: int):
    """What mmlu_general reads from MMLU's dev files, the first `subjects` subjects: the questions by
    subject, the scored ones ((prompt ids, question) of the `questions` shortest second questions) and the
    first worked explanation of each subject (its prose)."""
    from loki_dist.demo.assets import mmlu_dev_documents, mmlu_dev_questions

    by_subject: dict[str, list[Question]] = {}
    for q in mmlu_dev_questions() or []:
        by_subject.setdefault(q.subject, []).append(q)
    by_subject = dict(list(by_subject.items())[:subjects])
    scored = sorted(
        ((encode(tokenizer, qs[1], []), qs[1]) for qs in by_subject.values()), key=lambda p: len(p[0])
    )[:questions]
    first_text = dict(reversed(mmlu_dev_documents()))  # reversed: the first explanation of each wins
    return by_subject, scored, first_text


def mmlu_general(tokenizer, subjects: int, prose_docs: int, prose_tokens: int, questions: int):
    """(General, the questions attribution uses) from MMLU's dev files (demo_assets), the first
    `subjects` subjects: per subject the first worked explanation is prose (truncated to `prose_tokens`),
    the second question is scored (the `questions` shortest prompts: a step's measures stay cheap), the
    third is attribution's, so that what is attributed is never what is scored."""
    by_subject, scored, first_text = _mmlu_parts(tokenizer, subjects, questions)
    attribute_on = [qs[2] for qs in by_subject.values() if len(qs) > 2]
    prose = [tokenizer(first_text[s])["input_ids"][:prose_tokens] for s in by_subject]
    general = General(
        prose[:prose_docs],
        [ids for ids, _ in scored],
        [q.answer for _, q in scored],
        letter_token_ids(tokenizer),
        tokenize_probes(tokenizer, PROBES),
        [q for _, q in scored],
    )
    return general, attribute_on


def retention_free_questions(tokenizer, subjects: int, prose_docs: int, questions: int) -> list[Question]:
    """Every MMLU dev question of the first `subjects` subjects that no measure of mmlu_general (same
    arguments) reads: neither scored nor inside a prose document. The selection study attributes on
    them to see how the chosen rows depend on the prompts (issue 25); attribute_on's are among them."""
    by_subject, scored, first_text = _mmlu_parts(tokenizer, subjects, questions)
    read = {id(q) for _, q in scored}
    prose = [first_text[s] for s in list(by_subject)[:prose_docs]]
    return [
        q
        for qs in by_subject.values()
        for q in qs
        if id(q) not in read and not any(q.question in text for text in prose)
    ]


def probe_results(model, probes: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16):
    """Per probe: (completed correctly greedily, log-probability of the answer): `evaluate --task
    completion`'s own measure (one teacher-forced forward per batch)."""
    return completion_results(model, probes, pad_id, batch_size)


def keep_known(model, general: General, pad_id: int) -> int:
    """Keep the probes the base completes correctly (its own share kept is then 1); returns how many."""
    correct, _ = probe_results(model, general.probes, pad_id)
    general.probes = [p for p, ok in zip(general.probes, correct, strict=True) if ok]
    return len(general.probes)


def choice_accuracy(model, prompts, answers, choice_ids, pad_id: int, batch_size: int = 32) -> float:
    """Share of prompts whose most likely continuation, among the choices' first tokens, is the right one."""
    chosen = letter_logprobs(model, prompts, choice_ids, pad_id, batch_size).argmax(dim=-1)
    return sum(int(c == a) for c, a in zip(chosen.tolist(), answers, strict=True)) / len(answers)


def held_out_accuracy(model, task: Task, pad_id: int, held_out: bool = True) -> float:
    """The task skill on the held-out phrasings (or, held_out=False, on the training ones), in eval mode."""
    was_training = model.training
    model.eval()
    prompts, answers = (
        (task.held_out_prompts, task.held_out_answers)
        if held_out
        else (task.train_prompts, task.train_answers)
    )
    value = choice_accuracy(model, prompts, answers, task.choice_ids, pad_id)
    model.train(was_training)
    return value


def measure(model, general: General, task: Task, pad_id: int) -> dict[str, float]:
    """The retention measures and the task's accuracy on both splits, batched forwards only."""
    started = time.perf_counter()
    model.eval()
    nll, count = document_nll(model, general.prose, 1 << 20, pad_id, 8)
    letters = letter_logprobs(model, general.mmlu_prompts, general.letter_ids, pad_id, 8)
    answers = torch.tensor(general.mmlu_answers)
    gold = letters[torch.arange(len(answers)), answers]
    correct, logprob = probe_results(model, general.probes, pad_id)
    return {
        "prose_perplexity": math.exp(float(nll.sum()) / float(count.sum())),
        "mmlu_gold_logprob": float(gold.mean()),
        "mmlu_accuracy": float((letters.argmax(-1) == answers).float().mean()),
        "probes_kept": sum(correct) / len(correct) if correct else float("nan"),
        "probes_logprob": statistics.fmean(logprob) if logprob else float("nan"),
        "held_out_accuracy": held_out_accuracy(model, task, pad_id),
        "train_accuracy": choice_accuracy(
            model, task.train_prompts, task.train_answers, task.choice_ids, pad_id
        ),
        "seconds": time.perf_counter() - started,
    }
