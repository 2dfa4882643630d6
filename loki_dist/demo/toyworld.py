"""A synthetic body of "general knowledge" with shared structure, and a new task, for the offline demo.

LoKI's promise is about knowledge a model already has, so the demo first teaches a tiny model some. Pure
random facts share nothing (every fact lives in its own weights), which is unlike a real model's
knowledge, so here part of it is compositional: people belong to clans, a clan fixes its members' home
and trade (learned once per clan, used for every member), and each person also has a colour of their
own (memorised). The new task is a relation the model has never seen about the same people: their pet,
which, like home and trade, their clan decides. Learning it builds on what the model knows (who is in
which clan is in the question; what the clan's members share is not) and touches the same
representations that the general knowledge uses.

Everything is four-way multiple choice in the MMLU layout, asked with docs/method.md's prompt (mmlu.py), so
the real `attribute` stage and `evaluate`'s scoring apply to it unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loki_dist.attribution.mmlu import Question, prompt_text

_SYLLABLES = ["ka", "lo", "mi", "ru", "te", "sa", "vo", "ni", "be", "zu", "ra", "po", "di", "fe"]
CLANS = ["Brask", "Olvin", "Tessar", "Murn", "Kelda", "Yorve", "Anthe", "Gilm"]
OPTIONS = {
    "home": ("Esk", "Mardo", "Ultha", "Brin"),
    "trade": ("smith", "baker", "scribe", "pilot"),
    "colour": ("red", "blue", "green", "amber"),
    "pet": ("cat", "owl", "hound", "toad"),
}
GENERAL_RELATIONS = ("home", "trade", "colour")
TASK_RELATION = "pet"


@dataclass(frozen=True)
class ToyWorld:
    general: list[Question]
    task: list[Question]

    def corpus(self) -> tuple[str, ...]:
        """Every prompt text: what the demo's tokenizer learns its merges from."""
        return tuple(prompt_text(q) for q in (*self.general, *self.task))


def build_world(people: int, seed: int) -> ToyWorld:
    """`people` invented people: 3 general questions each (home, trade, colour) and 1 task question."""
    rng = random.Random(seed)
    clan_answer = {
        (clan, rel): rng.randrange(4) for clan in CLANS for rel in ("home", "trade", TASK_RELATION)
    }
    names: list[str] = []
    while len(names) < people:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(3)).title()
        if name not in names:
            names.append(name)
    general, task = [], []
    for name in names:
        clan = rng.choice(CLANS)
        who = f"{name} of clan {clan}"
        answers = {**{rel: clan_answer[clan, rel] for rel in ("home", "trade")}, "colour": rng.randrange(4)}
        for relation in GENERAL_RELATIONS:
            general.append(_question(relation, who, answers[relation]))
        task.append(_question(TASK_RELATION, who, clan_answer[clan, TASK_RELATION]))
    return ToyWorld(general, task)


def _question(relation: str, who: str, answer: int) -> Question:
    return Question(f"invented_{relation}s", f"What is the {relation} of {who}?", OPTIONS[relation], answer)
