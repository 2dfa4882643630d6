"""The forgetting monitor of `loki-dist train`: the task learnt and general knowledge kept, while training.

LoKI promises "learn the task, forget nothing"; this shows both as they happen. At the run's first step
(0, or the resume step), every `--eval-steps` and at the last step, the model is scored on

- `--eval-data` (the task, held out; read and tokenised as `--data`): mean response-token loss and
  teacher-forced next-token accuracy on the response tokens;
- `--general-data`: plain documents (a .txt file, one per non-empty line, or rows with a `text` column)
  -> perplexity in windows of --max-seq-len; or MMLU-layout questions (the prompt attribution and
  `loki-dist evaluate` use) -> multiple-choice accuracy and the mean log-probability of the gold letter.

Scoring is `loki-dist evaluate`'s own (token_nll, document_nll, letter_logprobs), so a number here equals
what `evaluate` says of a saved model. Data-parallel: each rank keeps and scores only its contiguous
block of every set (tokenised at planning; nothing else is kept), the sums are all-reduced in float64
(one small collective), so every rank holds the same numbers. Under ZeRO-3 a forward gathers the
parameters collectively, so all ranks make the same number of forwards (scoring.model_batches'
lockstep). The model runs in eval mode under no_grad and is put back in train mode after.

Each value is also shown as its change from the first evaluation of the run, relative to it:
(value - first) / |first|. That first evaluation (the baseline) is stored, with the others, in every
checkpoint's trainer_state.json, so that a requeued run measures from the same step 0 and not from
where it resumed; a checkpoint evaluated on other data (or none) is not a baseline for this data, and
the resumed run then starts a new one, saying so.

`--stop-on-forgetting SHARE` ends the run, as a normal end does (checkpoint, final/, exit 0), at the
first evaluation where general perplexity rose by more than SHARE, or general accuracy fell by more than
SHARE, relative to the baseline. All ranks decide from the same all-reduced numbers, and agree on the
decision in one more collective, so that no rank could ever go on alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from loki_dist.attribution import mmlu
from loki_dist.core import collectives, distributed, dsconfig, metering
from loki_dist.core.errors import UserError
from loki_dist.core.sharding import my_block
from loki_dist.evaluation.evaluate import documents_from_rows, read_text_lines
from loki_dist.evaluation.scoring import (
    document_nll,
    letter_logprobs,
    letter_token_ids,
    model_batches,
    token_nll,
)
from loki_dist.implant.artifacts import checkpoint
from loki_dist.implant.data.examples import IGNORE_INDEX, Example, collate, load_examples
from loki_dist.implant.trainer.model import Trainer
from loki_dist.implant.trainer.plan import Inputs, Plan

# what a stop compares: the metric and the sign of its change that means forgetting
FORGETTING = {"general_perplexity": 1, "general_accuracy": -1}


def add_monitor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eval-data",
        help="held-out task data (formats as --data): response-token loss and accuracy while training",
    )
    p.add_argument(
        "--general-data",
        help="general knowledge: a .txt file or rows with a `text` column (perplexity), or MMLU-layout "
        "questions (multiple-choice accuracy, gold-letter log-probability)",
    )
    p.add_argument(
        "--eval-steps",
        type=int,
        help="also evaluate every N optimizer steps (default: at the first and the last step only)",
    )
    p.add_argument(
        "--stop-on-forgetting",
        type=float,
        metavar="SHARE",
        help="end the run (checkpoint, final/, exit 0) once general perplexity rose, or general accuracy "
        "fell, by more than SHARE (between 0 and 1: 0.05 is 5%%) relative to the first evaluation",
    )


def check_flags(args: argparse.Namespace) -> None:
    """The monitor's flags alone and together, before anything is read."""
    data = args.eval_data or args.general_data or args.val_size or args.eval_dataset
    if args.eval_steps is not None:
        if args.eval_steps < 1:
            raise UserError(f"--eval-steps {args.eval_steps}: expected a positive number of steps")
        if not data:
            raise UserError(
                f"--eval-steps {args.eval_steps}: nothing to evaluate; add --eval-data or --general-data"
            )
    share = args.stop_on_forgetting
    if share is not None:
        # a relative change: accuracy cannot fall by 1 (100%) or more, and perplexity doubled is long past
        # anything worth stopping for; 5 is someone's 5%
        if not (math.isfinite(share) and 0 < share < 1):
            raise UserError(
                f"--stop-on-forgetting {share:g}: expected a share between 0 and 1 of the first evaluation's "
                "value, e.g. 0.05 for 5%"
            )
        if not args.general_data:
            raise UserError(
                f"--stop-on-forgetting {share}: forgetting is measured on --general-data, which is not given"
            )


def input_files(args: argparse.Namespace) -> dict[str, str]:
    """The monitor's input files by flag: the output directory must not lie over them."""
    return {
        flag: value
        for flag, value in (("--eval-data", args.eval_data), ("--general-data", args.general_data))
        if value
    }


def read_inputs(
    args: argparse.Namespace, tokenizer, world: distributed.World, held_out: list | None = None
) -> Inputs | None:
    """Read and check both sets (every rank, at planning, so a bad file is one line before any work);
    keep only this rank's block of each. The task set is tokenised whole, as --data is (dropped samples
    must be known to cut blocks); of the general set only this rank's block is tokenised. `held_out`:
    the task set as conversations already read, where --val-size or --eval-dataset gave it
    (data/held_out.py) instead of --eval-data."""
    task = args.eval_data or held_out
    if not (task or args.general_data):
        return None
    digest = hashlib.sha256(json.dumps([args.max_seq_len, bool(task)]).encode())
    inputs = Inputs(fingerprint="")
    if task:
        with _as_flag("--eval-data") if args.eval_data else nullcontext():
            examples = load_examples(task, tokenizer, args.max_seq_len, "the held-out task set").examples
        for e in examples:
            digest.update(json.dumps([e.input_ids, e.labels]).encode())
        inputs.task = [examples[i] for i in my_block(len(examples), world)]
    if args.general_data:
        with _as_flag("--general-data"):
            _read_general(args.general_data, tokenizer, world, inputs, digest, args.max_seq_len)
    inputs.fingerprint = digest.hexdigest()[:32]
    return inputs


def _read_general(
    source: str, tokenizer, world: distributed.World, inputs: Inputs, digest, max_seq_len: int
) -> None:
    """Documents or questions, chosen by the rows: MMLU's columns make questions, else `text`. Documents
    are scored in windows of max_seq_len; a question must fit whole (its last token is where the answer
    letter is read), so a longer one is refused here rather than run out of memory at an evaluation."""
    if Path(source).suffix.lower() == ".txt":
        texts = read_text_lines(source)
        if not texts:
            raise UserError(f"--data {source}: no documents (no non-empty line)")
    else:
        splits = mmlu.read_splits(source)
        split, rows = mmlu.pick_split(splits, mmlu.EVAL_SPLIT, source)
        if rows and isinstance(rows[0], dict) and "question" in rows[0]:
            questions, _ = mmlu.questions_from_splits(splits, source, sys.maxsize, split=split)
            digest.update(json.dumps(mmlu.question_rows(questions)).encode())
            block = my_block(len(questions), world)
            mine = [questions[i] for i in block]
            inputs.prompts = mmlu.build_prompts(tokenizer, mine, {}).input_ids
            for i, q, ids in zip(block, mine, inputs.prompts, strict=True):
                if len(ids) > max_seq_len:
                    raise UserError(
                        f"--data {source}: question {i} ({q.subject}) encodes to {len(ids)} tokens, more "
                        f"than --max-seq-len {max_seq_len}: raise it, or leave the longer questions out"
                    )
            inputs.answers = [q.answer for q in mine]
            inputs.letters = letter_token_ids(tokenizer)
            return
        texts = documents_from_rows(
            rows, source, "text", hint="or the MMLU columns " + ", ".join(mmlu.COLUMNS)
        )
    digest.update(json.dumps(texts).encode())
    inputs.documents = [
        tokenizer(texts[i], add_special_tokens=True)["input_ids"] for i in my_block(len(texts), world)
    ]


@contextmanager
def _as_flag(flag: str) -> Iterator[None]:
    """The readers shared with --data (data/rows.py, mmlu.py, evaluate.py) name `--data` in their errors;
    here the file came from `flag`, and the user must be told which of the three was wrong."""
    try:
        yield
    except UserError as err:
        text = str(err)
        named = text.startswith(("--data ", "--data:"))  # not --data-config, nor another flag
        renamed = flag + text.removeprefix("--data") if named else f"{flag}: {text}"
        raise UserError(renamed) from None


class Monitor:
    """Evaluates when due, logs, keeps the history and decides an early stop; inert without inputs."""

    def __init__(self, plan: Plan, trainer: Trainer, history: list[dict]):
        self.plan, self.trainer, self.inputs = plan, trainer, plan.evals
        self.history = history  # every evaluation of the run, the baseline first
        self.stopped_at: int | None = None
        self.stop_reason: dict | None = None

    @classmethod
    def begin(cls, plan: Plan, trainer: Trainer, start: int, bar, writer) -> Monitor:
        """The monitor of a run starting at `start`, after its first evaluation: the baseline, unless the
        checkpoint resumed from holds the evaluations before it (of the same data)."""
        watch = cls(plan, trainer, [])
        if watch.active and plan.resume_from is not None:
            saved = json.loads((plan.resume_from / checkpoint.STATE_FILE).read_text()).get("monitor") or {}
            if saved.get("fingerprint") == plan.evals.fingerprint:
                watch.history = [entry for entry in saved["evaluations"] if entry["step"] < start]
            elif plan.world.is_main:
                bar.write(
                    f"the forgetting baseline is step {start}: {plan.resume_from} holds no evaluation of "
                    "this --eval-data, --general-data and --max-seq-len"
                )
        if watch.active:
            watch._evaluate(start, bar, writer)
        return watch

    @property
    def active(self) -> bool:
        return self.inputs is not None

    def after_step(self, done: int, bar, writer) -> bool:
        """Evaluate after optimizer step `done` if due; True when the run is to stop for forgetting
        (agreed by every rank)."""
        every, last = self.plan.args.eval_steps, self.plan.total_steps
        if not self.active or not (done == last or (every and done % every == 0)):
            return False
        entry = self._evaluate(done, bar, writer)
        share = self.plan.args.stop_on_forgetting
        if share is None:
            return False
        changes = {name: entry.get(f"{name}_change") for name in FORGETTING}
        over = [(name, c) for name, c in changes.items() if c is not None and FORGETTING[name] * c > share]
        if not collectives.agree_max(int(bool(over))):
            return False
        name, change = over[0] if over else (None, None)
        self.stopped_at = done
        self.stop_reason = {"step": done, "metric": name, "change": change, "share": share}
        if self.plan.world.is_main:
            said = f"{name.replace('_', ' ')} changed by {change:+.2%}" if name else "on another rank"
            bar.write(
                f"stopping on forgetting at step {done}: {said} since step {self.history[0]['step']}, "
                f"more than --stop-on-forgetting {share:g}; saving checkpoint-{done} and final/ from it"
            )
        return True

    def state(self) -> dict:
        """What a checkpoint keeps (trainer_state.json), so that a resume keeps the baseline."""
        if not self.active:
            return {}
        return {"monitor": {"fingerprint": self.inputs.fingerprint, "evaluations": self.history}}

    def summary(self) -> dict:
        """What train_summary.json adds."""
        if not self.active:
            return {}
        return {"evaluations": self.history, "stopped_on_forgetting": self.stop_reason}

    def _evaluate(self, step: int, bar, writer) -> dict:
        with distributed.stage(f"evaluating at step {step}"), metering.phase("evaluate"):
            values = self._measure()
        baseline = self.history[0] if self.history else None
        entry = {"step": step, **values}
        for name, value in values.items():
            first = baseline[name] if baseline else value
            entry[f"{name}_change"] = (value - first) / abs(first) if first else None
        self.history.append(entry)
        if writer is not None:
            for name, value in entry.items():
                if name != "step" and value is not None:
                    writer.add_scalar(f"eval/{name}", value, step)
            writer.flush()
        if self.plan.world.is_main:
            shown = []
            for name, value in values.items():
                change = entry[f"{name}_change"]
                since = f" ({change:+.2%})" if baseline and change is not None else ""
                shown.append(f"{name}={value:.4g}{since}")
            bar.write(f"eval step {step}: {' '.join(shown)}")
        return entry

    def _measure(self) -> dict[str, float]:
        """Every metric, from this rank's float64 sums all-reduced over the ranks."""
        model, plan = self.trainer.model, self.plan
        # a plain bf16 run computes in autocast (Trainer.loss_sum); DeepSpeed holds bf16 weights itself
        bf16 = plan.bf16 and self.trainer.engine is None
        autocast = torch.autocast(self.trainer.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast:
                sums = self._local_sums(model)
        finally:
            model.train(was_training)
        totals = iter(collectives.all_reduce_sum(torch.tensor(sums, dtype=torch.float64)).tolist())
        values = {}
        if self.inputs.task is not None:
            nll, correct, count = (next(totals) for _ in range(3))
            values.update(task_loss=nll / max(count, 1), task_accuracy=correct / max(count, 1))
        if self.inputs.documents is not None:
            nll, tokens = next(totals), next(totals)
            with distributed.agreement(plan.world):  # the same sums everywhere: one line, not one per rank
                if tokens == 0:
                    raise UserError(
                        f"--general-data {plan.args.general_data}: no document has 2 or more tokens"
                    )
            values["general_perplexity"] = math.exp(nll / tokens)
        if self.inputs.prompts is not None:
            correct, gold, count = (next(totals) for _ in range(3))
            values.update(general_accuracy=correct / count, general_gold_logprob=gold / count)
        return values

    def _local_sums(self, model: torch.nn.Module) -> list[float]:
        """This rank's sums, in the order _measure reads them: the task's [NLL, correct, tokens], the
        documents' [NLL, predicted tokens], the questions' [correct, gold-letter log-probability, count]."""
        inputs, plan = self.inputs, self.plan
        batch, pad = plan.micro, plan.pad_id
        lockstep = dsconfig.zero_stage(plan.ds_config) == 3
        sums = []
        if inputs.task is not None:
            sums += task_sums(model, inputs.task, pad, batch, lockstep)
        if inputs.documents is not None:
            nll, count = document_nll(model, inputs.documents, plan.args.max_seq_len, pad, batch, lockstep)
            sums += [math.fsum(nll.tolist()), float(count.sum())]
        if inputs.prompts is not None:
            logprobs = letter_logprobs(model, inputs.prompts, inputs.letters, pad, batch, lockstep).double()
            answers = torch.tensor(inputs.answers, dtype=torch.long)
            correct = (logprobs.argmax(dim=-1) == answers).sum()
            sums += [float(correct), float(logprobs.gather(1, answers[:, None]).sum()), float(len(answers))]
        return sums


def task_sums(
    model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int, lockstep: bool
) -> list[float]:
    """[summed NLL, correctly predicted, counted] over the response tokens of `examples`, teacher-forced:
    the targets are the next tokens whose label is not IGNORE_INDEX (what the training loss counts).

    Batched in order of length, right-padded (pads are neither attended to nor counted)."""
    device = next(model.parameters()).device
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    nll = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    count = torch.zeros((), dtype=torch.int64)
    for chunk in model_batches(model, ordered, batch_size, lockstep):
        batch = {k: v.to(device) for k, v in collate(list(chunk), pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["input_ids"][:, 1:]
        counted = batch["labels"][:, 1:] != IGNORE_INDEX
        nll += token_nll(logits, targets)[counted].sum().cpu()
        correct += (logits.argmax(dim=-1) == targets)[counted].sum().cpu()
        count += counted.sum().cpu()
    return [float(nll), float(correct), float(count)]
