"""transformers.Trainer training LoKI rows through loki_dist's Python API, under ZeRO-3 (run by torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/hf_trainer_rows.py SETTINGS.json

SETTINGS: base, positions, data, out, steps, micro, accum, learning_rate, weight_decay, warmup_steps,
seed, and rank (optional: LoKI*'s, implant_rows(rank=), B drawn from seed as the CLI's). What is aligned
with `loki-dist train` to make the two comparable: the same tokenised samples
(loki_dist.implant.data.examples), fed in the CLI's documented order (a seeded permutation cut into
global batches), laid out so that accelerate's per-rank sharding hands rank r the micro-batches the CLI
gives it), the same schedule (warm-up from 0 then cosine to 0), AdamW with HF's defaults (betas, eps: the
CLI's), no clipping. Everything else is HF's own: its loss (summed over the global batch's response
tokens, divided by their count, averaged across devices), its optimizer with decoupled decay, its
DeepSpeed engine.
Writes OUT/implant.safetensors (save_implant) and OUT/merged (merge_rows, then Trainer.save_model).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import loki_dist
from loki_dist.core import distributed
from loki_dist.core.modeling import load_tokenizer
from loki_dist.implant.data.examples import collate, load_examples


class InOrder(Dataset):
    def __init__(self, examples: list) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.examples[index]


class SequentialTrainer(Trainer):
    """HF's Trainer with the samples in the dataset's order (the CLI's order, laid out by the caller)."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main(settings: dict) -> None:
    world = distributed.world_from_env()
    if not torch.cuda.is_available():  # on GPUs HF's accelerate does this; its CPU path leaves DeepSpeed out
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    zero3 = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }  # fmt: skip
    out = Path(settings["out"])
    args = TrainingArguments(
        output_dir=str(out / "hf"),
        deepspeed=zero3,  # before from_pretrained: HF then loads the model into zero.Init shards
        per_device_train_batch_size=settings["micro"],
        gradient_accumulation_steps=settings["accum"],
        max_steps=settings["steps"],
        learning_rate=settings["learning_rate"],
        weight_decay=settings["weight_decay"],
        lr_scheduler_type="cosine",
        warmup_steps=settings["warmup_steps"],
        max_grad_norm=0.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        # accelerate forms a gloo group for DeepSpeed only as a CPU run (its DeepSpeed path wants a GPU)
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() else None,
        seed=settings["seed"],
        dataloader_drop_last=True,
        remove_unused_columns=False,
    )
    model = AutoModelForCausalLM.from_pretrained(settings["base"], dtype=torch.float32)
    model = loki_dist.implant_rows(
        model, settings["positions"], rank=settings.get("rank", 0), seed=settings["seed"]
    )
    for name, param in model.named_parameters():  # each rank holds its share of the rows from the start
        if param.requires_grad:
            assert param.ds_tensor.numel() == -(-param.ds_numel // world.size), name
    tokenizer = load_tokenizer(settings["base"])
    examples = load_examples(settings["data"], tokenizer, 2048).examples
    # the CLI's documented order within epoch 0: a permutation seeded by the seed, cut into global batches
    global_batch = settings["micro"] * settings["accum"] * world.size
    assert settings["steps"] * global_batch <= len(examples), "the comparison stays within epoch 0"
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(settings["seed"]))
    ordered = [examples[i] for i in order[: settings["steps"] * global_batch].tolist()]
    trainer = SequentialTrainer(
        model=model,
        args=args,
        train_dataset=InOrder(ordered),
        data_collator=lambda batch: collate(batch, pad_id=tokenizer.pad_token_id or 0),
    )
    # importing loki_dist silenced DeepSpeed's deprecated-collective warnings, and only those: this one
    # (the script's own, as a user's code may warn) must still be shown
    warnings.warn("the training script's own FutureWarning", FutureWarning, stacklevel=1)
    trainer.train()
    loki_dist.save_implant(model, out / "implant.safetensors", base=settings["base"])
    loki_dist.merge_rows(model)
    trainer.save_model(str(out / "merged"))
    if world.is_main:
        tokenizer.save_pretrained(str(out / "merged"))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        (out / "losses.json").write_text(json.dumps(losses))
    distributed.shutdown()  # leave the group together: a rank exiting first sometimes aborts (SIGABRT)


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
