"""The trained rows of a down_proj as their own parameter (`train --row-params split`).

Masking keeps a whole [D, F] weight trainable and throws most of its gradient away; at q = 10% autograd
still computes the full dW = dY^T X, and Adam keeps fp32 state for every element. Splitting the weight
instead makes only the selected rows a parameter, [k, F]:

    y = x W^T  with columns S replaced by  x R^T,   R = W[S] (trainable), W frozen

so autograd computes dR = dY[:, S]^T X only (k/D of the weight-gradient work), the input gradient still
flows through all of W, and the optimizer (and DeepSpeed's fp32 master) holds state for k*F elements
instead of D*F. W itself never changes, so every unselected row is bit-identical by construction.
Checkpoints, exports and implants are the same as with masking: they only ever hold the rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowSplitLinear(nn.Module):
    """A Linear whose rows `rows` come from the trainable `trained` [k, in] instead of `weight`."""

    def __init__(self, base: nn.Linear, rows: list[int], trained: torch.Tensor):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the frozen base parameters, shared
        self.__dict__["base"] = base  # not a submodule: merge_rows puts it back, state_dict skips it
        index = torch.tensor(rows, dtype=torch.long, device=trained.device)
        self.register_buffer("rows", index, persistent=False)
        self.trained = nn.Parameter(trained)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias[self.rows]
        return out.index_copy(-1, self.rows, F.linear(x, self.trained, bias))


def selected_rows(linear: nn.Linear, rows: list[int]) -> torch.Tensor:
    """A copy of linear.weight[rows], gathering the weight first if ZeRO-3 has partitioned it."""
    index = torch.tensor(rows, dtype=torch.long)
    if not hasattr(linear.weight, "ds_id"):
        return linear.weight.data[index.to(linear.weight.device)].clone()
    import deepspeed

    with deepspeed.zero.GatheredParameters([linear.weight], modifier_rank=None):
        return linear.weight.data[index.to(linear.weight.device)].clone()


def split(parent: nn.Module, attribute: str, rows: list[int]) -> nn.Parameter:
    """Replace parent.<attribute> (a Linear) by a RowSplitLinear; returns the new trainable parameter."""
    base = getattr(parent, attribute)
    module = RowSplitLinear(base, rows, selected_rows(base, rows))
    if hasattr(base.weight, "ds_id"):
        _partition_like(module, base.weight)
    setattr(parent, attribute, module)
    return module.trained


def _partition_like(module: RowSplitLinear, weight: nn.Parameter) -> None:
    """ZeRO-3: partition the new row parameter at once, where the weight's partition lives. Left whole,
    every rank would hold every layer's rows until deepspeed.initialize (3.8 GB at 70B, q = 10, bf16)."""
    import deepspeed

    held = weight.ds_tensor
    offloaded = held.device.type == "cpu" and module.trained.device.type != "cpu"
    deepspeed.zero.Init(
        module=module,
        remote_device="cpu" if offloaded else None,
        pin_memory=offloaded and held.is_pinned(),
        dtype=module.trained.dtype,
    )
