"""Reaching a trainable down_proj weight's gradient, fp32 master copy and Adam state, however it is held.

Three layouts exist, and the trainer should not care which one it runs on:
- ZeRO-3: each rank holds a padded slice of every tensor; DeepSpeed's local API reads and writes it.
  Its results may be copies (in bf16 an in-place edit is silently lost), so every edit is read, change,
  write back.
- ZeRO-1/2 (and bf16 at stage 0): parameters are whole, the fp32 master and optimizer state are flat
  fragments reached through DeepSpeed's full-parameter API.
- Plain (one process without DeepSpeed, or ZeRO-0 in fp32): the parameter is its own master and
  `optimizer.state[param]` holds the Adam moments.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from loki_dist.partition import RowPartition

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


class RowState:
    """One layer's trainable weight on this rank: its RowPartition and get/set for each quantity.

    Quantities: "grad", "master" (fp32 weights the optimizer updates), "exp_avg", "exp_avg_sq" and
    "model" (the weight the forward pass uses, possibly bf16).
    """

    #: gradients of this layout are masked by a tensor hook rather than edited after backward
    masks_by_hook = False

    def __init__(self, layer: int, param: torch.nn.Parameter, partition: RowPartition):
        self.layer, self.param, self.partition = layer, param, partition
        #: the down_proj rows the selected elements belong to, in order (set by build)
        self.rows = partition.selected.nonzero().view(-1).cpu()

    @property
    def needs_mask(self) -> bool:
        """False when every row of the parameter trains (the split layout): nothing to mask."""
        return not bool(self.partition.selected.all())

    def _get(self, what: str) -> torch.Tensor:
        raise NotImplementedError

    def _set(self, what: str, value: torch.Tensor) -> None:
        raise NotImplementedError

    def read(self, what: str) -> torch.Tensor:
        return self._get(what)[: self.partition.length]

    @contextmanager
    def edit(self, what: str) -> Iterator[torch.Tensor]:
        with torch.no_grad():  # masters are leaf tensors that require grad in some layouts
            local = self._get(what)
            yield local[: self.partition.length]
            self._set(what, local)

    def gather(self, what: str) -> torch.Tensor:
        """The selected rows of a quantity, flattened [k*F] in row order, on every rank (collective)."""
        return self.partition.take(self.read(what))

    def scatter(self, what: str, selected: torch.Tensor) -> None:
        """Inverse of gather: write the [k*F] selected values into this rank's part."""
        with self.edit(what) as local:
            self.partition.put_(local, selected.to(local.device))


class PlainRowState(RowState):
    def __init__(self, layer, param, partition, optimizer: torch.optim.Optimizer):
        super().__init__(layer, param, partition)
        self.optimizer = optimizer

    def _get(self, what: str) -> torch.Tensor:
        if what == "grad":
            return self.param.grad.view(-1)
        if what in ("master", "model"):
            return self.param.data.view(-1)
        return self.optimizer.state[self.param][what].view(-1)

    def _set(self, what: str, value: torch.Tensor) -> None:
        pass  # every _get above is a view: edits already landed


class Zero3RowState(RowState):
    def __init__(self, layer, param, partition, world_size: int):
        super().__init__(layer, param, partition)
        self.world_size = world_size

    def gather(self, what: str) -> torch.Tensor:
        from loki_dist.distributed import all_gather_varlen

        p = self.partition
        per_rank = self.param.ds_tensor.ds_numel
        sizes = [
            RowPartition.of_rank(p.selected, p.row_len, r, per_rank).num_selected
            for r in range(self.world_size)
        ]
        return all_gather_varlen(p.take(self.read(what)), sizes)

    def scatter(self, what: str, selected: torch.Tensor) -> None:
        first = self.partition.selected_before(self.partition.start)
        super().scatter(what, selected[first : first + self.partition.num_selected])

    def _get(self, what: str) -> torch.Tensor:
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_grad,
            safe_get_local_optimizer_state,
        )

        if what == "grad":
            return safe_get_local_grad(self.param)
        if what == "master":
            return safe_get_local_fp32_param(self.param)
        if what == "model":
            return self.param.ds_tensor.data.view(-1)
        return safe_get_local_optimizer_state(self.param, what)

    def _set(self, what: str, value: torch.Tensor) -> None:
        from deepspeed.utils import (
            safe_set_local_fp32_param,
            safe_set_local_grad,
            safe_set_local_optimizer_state,
        )

        if what == "grad":
            safe_set_local_grad(self.param, value)
        elif what == "master":
            safe_set_local_fp32_param(self.param, value)
        elif what != "model":
            safe_set_local_optimizer_state(self.param, value, what)


class FullApiRowState(RowState):
    masks_by_hook = True

    def _get(self, what: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if what == "master":
            return safe_get_full_fp32_param(self.param).view(-1)
        if what == "model":
            return self.param.data.view(-1)
        if what == "grad":
            raise RuntimeError("ZeRO-1/2 gradients are masked by a tensor hook, not edited")
        return safe_get_full_optimizer_state(self.param, what).view(-1)

    def _set(self, what: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if what == "master":
            safe_set_full_fp32_param(self.param, value.view(self.param.shape))
        elif what != "model":
            safe_set_full_optimizer_state(self.param, value.view(self.param.shape), what)


def build(
    layer: int,
    param: torch.nn.Parameter,
    selected: torch.Tensor,
    row_len: int,
    rank: int,
    world_size: int,
    optimizer: torch.optim.Optimizer,
    rows: list[int] | None = None,
) -> RowState:
    """Pick the layout from the parameter itself (ZeRO-3 params carry ds_id, ZeRO-1/2 _hp_mapping).

    `selected` marks the parameter's rows that train; `rows` names the down_proj rows they are, when the
    parameter is not the whole down_proj weight (the split layout: all of its rows train).
    """
    if hasattr(param, "ds_id"):
        partition = RowPartition.of_rank(selected, row_len, rank, param.ds_tensor.ds_numel)
        state: RowState = Zero3RowState(layer, param, partition, world_size)
    else:
        partition = RowPartition.whole(selected, row_len)
        if hasattr(param, "_hp_mapping"):  # None on ranks whose partition misses this param, but present
            state = FullApiRowState(layer, param, partition)
        else:
            state = PlainRowState(layer, param, partition, optimizer)
    if rows is not None:
        state.rows = torch.tensor(rows, dtype=torch.long)
    return state


def ensure_adam_state(optimizer: torch.optim.Optimizer, step: int, holders: list[torch.Tensor]) -> None:
    """Create (or overwrite the step of) torch Adam's lazily created state, so a resume can fill it.

    torch.optim.Adam/AdamW create `step`, `exp_avg`, `exp_avg_sq` at the first step(); a resumed run
    must write its saved moments before that, and Adam's bias correction must see the saved step.
    `holders` are the tensors the state is keyed by: the parameters, or DeepSpeed's flat fp32 partitions
    (ZeRO-3 hands them to the optimizer only inside step()).
    """
    for p in holders:
        state = optimizer.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        old = state.get("step")
        device = old.device if isinstance(old, torch.Tensor) else torch.device("cpu")
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)


def optimizer_state_holders(
    optimizer: torch.optim.Optimizer, zero_optimizer: object | None
) -> list[torch.Tensor]:
    """The tensors Adam's state is keyed by, for each layout (see ensure_adam_state)."""
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        if zero_optimizer is not None and hasattr(zero_optimizer, name):
            return list(getattr(zero_optimizer, name))
    return [p for group in optimizer.param_groups for p in group["params"]]
