"""A LLaMA-Factory training YAML read by `loki-dist train --config`.

The LoKI reference trains through LLaMA-Factory (`llamafactory-cli train toolace.yaml`), so the people
who would use loki_dist already hold such a file. Its keys are translated where they have a loki_dist
meaning, and refused in one line where the value asks for something loki_dist does not do (fp16,
packing, another training stage): running on regardless would train something else than the file
says. Values are read as Hugging Face's TrainingArguments read them: `save_steps: 0.99999` is a share of
the run's steps, `num_train_epochs: 2.5` ends half-way through the third pass, `warmup_steps` replaces
`warmup_ratio` where above 0; `val_size` and `eval_dataset` are the task's held-out set, which the
forgetting monitor scores (held_out.py); `plot_loss` draws training_loss.png. A key with no loki_dist
meaning (logging backends, worker counts, LoRA settings) is named on one line with the reason it changes
nothing, and the run goes on. loki_dist's own flag names
may stand beside the LLaMA-Factory keys; the one LoKI-specific key, `positions`, is one of them.
`lora_rank` is both: LoRA's rank where `finetuning_type` is lora (LLaMA-Factory's default), which is
LoKI*'s rank here (LoRA inside the selected rows, `--lora-rank`); beside another finetuning_type
LLaMA-Factory ignores it, and so does loki_dist, saying so.

Data: `dataset` (names, a string with commas or a list) and `dataset_dir` (default `data`, relative to
the current directory as in LLaMA-Factory) read dataset_info.json (dataset_info.py); `interleave_probs`
with `mix_strategy: interleave_under` mixes them; `template` picks a built-in chat template
(chat_templates.py) where one corresponds to LLaMA-Factory's of that name.
"""

from __future__ import annotations

from pathlib import Path

from loki_dist.core.errors import UserError, preview

# LLaMA-Factory key -> loki_dist flag name (without dashes), where only the name differs
RENAMED = {
    "model_name_or_path": "model",
    "deepspeed": "ds_config",
    "cutoff_len": "max_seq_len",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "interleave_probs": "mix_ratios",
    "overwrite_output_dir": "overwrite",
}
SCHEDULERS = {
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant",
    "constant_with_warmup": "constant",
}
_BOARD = "the loss goes to TensorBoard in output_dir/runs"
_EVAL = (
    "the held-out set (val_size, eval_dataset, eval_data) and general_data are scored at the first and "
    "last step, and every eval_steps"
)
_EVALUATED = ("eval_data", "general_data", "val_size", "eval_dataset")
# an ignored LLaMA-Factory key that is also a loki_dist flag: the flag, where the file sets what it needs
SAME_NAME = {"eval_steps": _EVALUATED}
# keys with no loki_dist meaning, and why
IGNORED = {
    "do_train": "loki-dist train always trains",
    "finetuning_type": "loki_dist trains the rows in --positions",
    "trust_remote_code": "loki_dist loads its supported families with transformers' own code",
    "report_to": _BOARD,
    "logging_dir": _BOARD,
    "run_name": _BOARD,
    "overwrite_cache": "loki_dist keeps no preprocessing cache (it tokenizes at every start)",
    "preprocessing_num_workers": "the data are tokenized in the training process",
    "dataloader_num_workers": "batches are built in the training process",
    "ddp_timeout": "the process group's timeout is LOKI_DIST_TIMEOUT_MINUTES",
    "flash_attn": "the model's configured attention implementation is used",
    "do_eval": _EVAL,
    "per_device_eval_batch_size": "the held-out sets are scored --micro-batch-size sequences at a time",
    "eval_strategy": _EVAL,
    "evaluation_strategy": _EVAL,
    "eval_steps": _EVAL,
    "save_only_model": "a checkpoint holds the trained rows and their optimizer state, a few MB",
    "save_strategy": "a checkpoint is saved every save_steps optimizer steps and at the end",
    "include_num_input_tokens_seen": "tokens per second are logged",
    "optim": "loki_dist trains with torch's AdamW",
    "tf32": "matmul precision is torch's default",
    "ddp_find_unused_parameters": "DeepSpeed or one process: no DDP",
    "use_fast_tokenizer": "the model directory's tokenizer is loaded as it is",
    "disable_tqdm": "rank 0 shows one progress bar",
    "log_level": "loki_dist logs on rank 0",
}
# adapter families' settings: nothing to do with rows
ADAPTER_PREFIXES = ("lora_", "pissa_", "freeze_", "galore_", "apollo_", "badam_", "dora", "oft_")
# keys whose value must be this one, since loki_dist does only that (the other values would be ignored)
ONLY = {
    "stage": ("sft", "loki_dist trains supervised (sft) only"),
    "fp16": (False, "loki_dist trains in bf16 or fp32: set bf16 true (or false for fp32)"),
    "mask_history": (False, "loki_dist trains every assistant turn"),
    "train_on_prompt": (False, "loki_dist trains on the assistant turns only"),
    "packing": (False, "loki_dist does not pack samples"),
    "neat_packing": (False, "loki_dist does not pack samples"),
    "streaming": (False, "loki_dist reads the data sets whole"),
    "quantization_bit": (None, "loki_dist trains an unquantized base"),
}


def translate(settings: dict, path: str) -> tuple[dict, list[str]]:
    """(loki_dist settings, one line per ignored key) from a YAML that may hold LLaMA-Factory keys."""
    where = f"--config {path}"
    out, notes = {}, []

    def put(name: str, value: object, key: str) -> None:
        name = name.replace("-", "_")
        if name in out:
            raise UserError(f"{where}: `{out[name][1]}` and `{key}` both set --{name.replace('_', '-')}")
        out[name] = (value, key)

    strategy = settings.get("mix_strategy", "concat")
    for key, value in settings.items():
        if key in RENAMED:
            put(RENAMED[key], value, key)
        elif key in IGNORED and not set(SAME_NAME.get(key, ())) & set(settings):
            if key == "do_train" and value is False:
                raise UserError(f"{where}: do_train false: loki-dist train always trains")
            notes.append(f"ignoring {key}: {IGNORED[key]}")
        elif key == "lora_rank":
            method = settings.get("finetuning_type", "lora")
            if method == "lora":
                put(key, value, key)
            else:
                notes.append(f"ignoring lora_rank: finetuning_type is {method} (LoKI* takes it with lora)")
        elif key.startswith(ADAPTER_PREFIXES):
            notes.append(f"ignoring {key}: an adapter setting; loki_dist trains the rows in --positions")
        elif key in ONLY:
            wanted, why = ONLY[key]
            if value not in (wanted, None):
                raise UserError(f"{where}: {key} {preview(value)}: {why}")
        elif key == "num_train_epochs":
            put("epochs", value, key)
        elif key == "lr_scheduler_type":
            put("lr_scheduler", _scheduler(value, where), key)
        elif key == "bf16":
            if value is not None:
                put("precision", "bf16" if _switch(value, key, where) else "fp32", key)
        elif key == "template":
            put("chat_template", _template(value, where), key)
        elif key == "resume_from_checkpoint":
            put("resume", {True: "auto", False: "never"}[value] if isinstance(value, bool) else value, key)
        elif key == "mix_strategy":
            _strategy(value, where)
        else:  # loki_dist's own flags; unknown keys are refused by runconfig.to_flags
            put(key, value, key)
    if strategy == "concat" and "interleave_probs" in settings:
        out.pop("mix_ratios")
        notes.append("ignoring interleave_probs: mix_strategy is concat (set interleave_under to mix)")
    if strategy == "interleave_under" and "mix_ratios" not in out:
        raise UserError(f"{where}: mix_strategy interleave_under: give interleave_probs, one per data set")
    return {name: value for name, (value, _) in out.items()}, notes


def _switch(value: object, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}: `{key}`: expected true or false, got {preview(value)}")
    return value


def _scheduler(value: object, where: str) -> str:
    if not isinstance(value, str) or value not in SCHEDULERS:
        expected = ", ".join(SCHEDULERS)
        raise UserError(f"{where}: lr_scheduler_type {preview(value)}: expected one of {expected}")
    return SCHEDULERS[value]


def _template(value: object, where: str) -> object:
    """LLaMA-Factory's template name -> a built-in one; a file path stays as it is."""
    from loki_dist.implant.data.chat_templates import ALIASES, BUILTIN, names

    if not isinstance(value, str) or value in BUILTIN or value in ALIASES or Path(value).is_file():
        return value
    raise UserError(
        f"{where}: template {preview(value)}: no built-in loki_dist template corresponds ({names()}); "
        "give a Jinja file, or leave template out to use the tokenizer's own"
    )


def _strategy(value: object, where: str) -> None:
    if value not in ("concat", "interleave_under"):
        raise UserError(
            f"{where}: mix_strategy {preview(value)}: expected concat or interleave_under (loki_dist mixes "
            "until the first data set runs out, and repeats no row)"
        )
