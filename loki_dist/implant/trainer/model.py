"""The row trainer of `loki-dist train`, for DeepSpeed (ZeRO-3, ZeRO-1/2) and plain runs alike.

It freezes everything, then makes the selected rows trainable: as their own parameter (`--row-params
split`, rowsplit.py), as LoKI*'s low-rank update W_S0 + A B of them (`--lora-rank R`, lowrank.py), or as
the whole down_proj weight whose other rows' gradients are masked. At each update (masked layout) it
zeroes the gradients of unselected rows on this rank's partition, applies decoupled weight decay to
what trains only (the selected rows; LoKI*'s A and B), and lets the optimizer step.

Why frozen rows cannot move: split and LoKI*, they are not parameters at all. Masked, their gradients are
exactly zero from the first step, so Adam's moments stay zero and its update 0/(sqrt(0)+eps) is zero;
clipping only rescales (zeros stay zero); the optimizer's own weight decay is off and ours touches
selected rows only; the bf16 copy of an unmoved fp32 master is the original bf16 value.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from loki_dist.core import dsconfig, metering, positions
from loki_dist.core.families import down_projections
from loki_dist.core.modeling import load_causal_lm, zero3_share
from loki_dist.implant import api
from loki_dist.implant.trainer import rowstate
from loki_dist.implant.trainer.plan import Plan


@dataclass
class TrainableRows:
    layer: int
    param: torch.nn.Parameter  # the down_proj weight (masked), its selected rows (split) or a LoKI* factor
    selected: torch.Tensor  # bool over the parameter's rows: which of them train
    rows: list[int]  # the down_proj rows those are (or that the factor updates)
    row_len: int  # the length of one of the parameter's rows: F, r for LoKI*'s A, 1 for bias entries
    part: str = ""  # "A" or "B" for LoKI*'s factors, "bias" for the rows' bias entries


class Trainer:
    """The model, its optimizer and the row states, behind one interface for DeepSpeed and plain runs."""

    def __init__(self, plan: Plan, device: torch.device):
        self.plan, self.device = plan, device
        stage = dsconfig.zero_stage(plan.ds_config)
        dtype = torch.bfloat16 if plan.bf16 and stage is not None else torch.float32
        model = load_causal_lm(plan.args.model, dtype, plan.ds_config)
        model.config.use_cache = False
        model.train()  # from_pretrained gives eval mode; dropout and gradient checkpointing follow this
        if plan.args.gradient_checkpointing:
            # non-reentrant: the reentrant variant drops gradients when a block's inputs need none
            # (frozen embeddings), and it is the variant tested with ZeRO-3 and frozen parameters here
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model, trainable = self.make_trainable(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=plan.args.learning_rate, weight_decay=0.0)
        # fp32 ZeRO-0 steps the client optimizer itself, and DeepSpeed then keeps no gradient norm
        self.engine_measures_norm = stage != 0 or plan.bf16
        if stage is None:
            self.model, self.engine, self.inner = model.to(device), None, optimizer
        else:
            import deepspeed

            with metering.phase("ds_initialize"):
                self.engine, _, _, _ = deepspeed.initialize(
                    model=model, optimizer=optimizer, config=plan.ds_config
                )
            self.model = self.engine
            rowstate.check_deepspeed_internals(self.engine)
            self.inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
            if stage == 3 and plan.world.is_main:
                held, total = zero3_share(model)
                print(f"ZeRO-3: rank 0 holds {held:,} of {total:,} parameter elements", flush=True)
        self.states = []
        for t in trainable:
            w = plan.world
            state = rowstate.build(
                t.layer, t.param, t.selected, t.row_len, w.rank, self.inner, t.rows, t.part
            )
            if state.needs_mask and state.masks_by_hook:
                t.param.register_hook(lambda g, keep=t.selected: g.masked_fill(~keep.unsqueeze(1), 0))
            self.states.append(state)

    def make_trainable(self, model: torch.nn.Module) -> tuple[torch.nn.Module, list[TrainableRows]]:
        """Unfreeze what LoKI trains: the selected rows as their own parameter per layer (split), or
        LoKI*'s factors A and B of their update (--lora-rank), both through the Python API's implant_rows
        (B drawn from --seed, the same on every rank), or the whole down_proj weight of each layer with
        positions, its other rows' gradients masked. Subclasses may train something else (the
        benchmark's full fine-tuning and LoRA baselines) and return no rows."""
        args, rows_by_layer = self.plan.args, self.plan.positions
        if args.row_params == "split":
            # under ZeRO-3 the new parameters are partitioned by the run's own config (offload, ZeRO++)
            zero3 = self.plan.ds_config if dsconfig.zero_stage(self.plan.ds_config) == 3 else None
            api.implant_rows(
                model,
                rows_by_layer,
                rank=args.lora_rank,
                seed=args.seed,
                ds_config=zero3,
                bias=args.train_bias,
            )
            return model, [
                TrainableRows(layer, param, self._all_rows(shape[0]), module.rows.tolist(), row_len, part)
                for layer, module in api.implanted_layers(model)
                for part, param in module.parts().items()
                for shape in [getattr(param, "ds_shape", param.shape)]  # ZeRO-3 empties param.data
                for row_len in [shape[1] if len(shape) > 1 else 1]  # a bias entry is a row of one
            ]
        trainable, F = [], self.plan.spec.intermediate_size
        for layer, (linear, rows) in enumerate(zip(down_projections(model), rows_by_layer, strict=True)):
            if rows:
                selected = positions.row_mask(rows, self.plan.spec.hidden_size, self.device)
                trainable.append(TrainableRows(layer, linear.weight.requires_grad_(True), selected, rows, F))
        return model, trainable

    def _all_rows(self, count: int) -> torch.Tensor:
        return torch.ones(count, dtype=torch.bool, device=self.device)

    def prepare_optimizer(self, step: int) -> None:
        """Create Adam's state as after `step` updates, ready to receive a checkpoint's moments."""
        zero_optimizer = self.engine.optimizer if self.engine else None
        holders = rowstate.optimizer_state_holders(self.inner, zero_optimizer)
        rowstate.ensure_adam_state(self.inner, step, holders)
        link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 map their fragments onto the state only after a first step
            link()

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token loss over response tokens (normalised by the caller, globally)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        autocast = self.plan.bf16 and self.engine is None
        metered = metering.phase("forward") if torch.is_grad_enabled() else contextlib.nullcontext()
        with metered, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )

    def backward(self, loss: torch.Tensor, lr: float, boundary: bool) -> float | None:
        """Backward of one micro-batch; at the accumulation boundary also the update (mask, decay, step).

        DeepSpeed counts micro-steps itself and wants engine.step() after every backward; it only
        updates at its boundary, which the caller's `boundary` matches. Returns the gradient norm there.
        """
        if self.engine is not None:  # it averages over ranks; the loss's normalisation covers accumulation
            with metering.phase("backward"):
                self.engine.backward(loss, scale_wrt_gas=False)
            if not boundary:
                self.engine.step()
                return None
            self._prepare_update(lr)
            # where the engine keeps no norm, the gradients are whole and already all-reduced on every
            # rank: measure them before the step consumes them (no communication)
            own = None if self.engine_measures_norm else _grad_norm(self.params)
            with metering.phase("optimizer_step"):
                self.engine.step()
            norm = self.engine.get_global_grad_norm() if own is None else own
            return None if norm is None else float(norm)
        with metering.phase("backward"):
            loss.backward()
        if not boundary:
            return None
        self._prepare_update(lr)
        clip = self.plan.max_grad_norm if self.plan.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        with metering.phase("optimizer_step"):
            self.inner.step()
        self.inner.zero_grad(set_to_none=True)
        return float(norm)

    def _prepare_update(self, lr: float) -> None:
        """Set the learning rate, zero unselected rows' gradients, decay what trains only: the selected
        rows, or LoKI*'s A and B, never W_S0 (each rank on its own slice: nothing here communicates).
        Trained bias entries are not decayed, as Hugging Face's Trainer decays no bias."""
        for group in self.inner.param_groups:
            group["lr"] = lr
        decay = 1.0 - lr * self.plan.args.weight_decay
        with metering.phase("update"):
            for state in self.states:
                if state.needs_mask and not state.masks_by_hook:
                    with state.grad().edit() as grad:
                        state.partition.zero_unselected_(grad)
                if decay != 1.0 and state.part != "bias":
                    with state.master().edit() as master:
                        state.partition.scale_selected_(master, decay)


def _grad_norm(params: list[torch.nn.Parameter]) -> float:
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
