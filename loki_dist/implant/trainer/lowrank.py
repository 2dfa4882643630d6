"""LoKI* (the paper's eq. 11): the selected rows of a down_proj trained as a low-rank update.

    W_S = W_S0 + A B,   A [k, r] and B [r, F] learnable,   W_S0 = W[S] frozen

LoRA inside the chosen rows (`train --lora-rank R`, `implant_rows(model, positions, rank=R)`). It trains
r*(k + F) numbers per layer instead of k*F: on Llama-3.1-8B at q = 30 and r = 32, 15.9M instead of 563M
(`estimate-memory`). The layer computes

    y = x W^T + (x B^T) U^T,   U [D, r] zero but for rows S, which are A

so W_S0 is never copied: the frozen weight already computes x W_S0^T, and only A and B are parameters
(and hold gradients, DeepSpeed's fp32 master and Adam's moments). W never changes, so every base tensor,
the selected rows' W_S0 included, stays bit-identical until the rows are merged. U is built from A in
each forward (D*r numbers): adding the update into columns S with index_add instead would keep its
[tokens, k] source for backward, k more numbers per token and layer than the r of x B^T that autograd
needs anyway (537 MB at 70B, q = 10, 4096 tokens, bf16).

Initialisation, as PEFT's LoRA: the factor that reads the layer's input, B [r, F] (PEFT's lora_A, of the
same shape [r, in_features]), is drawn by kaiming_uniform_(a=sqrt(5)), i.e. uniform in +-1/sqrt(F); the
factor that writes the output, A [k, r] (PEFT's lora_B), starts at zero. So A B is exactly zero at step 0
(the model is the base model, bit for bit) and gradients flow at once: dL/dA = G B^T is not zero, while
B's gradient A^T G stays zero until A has moved. (Issue 27's "B = 0" names LoRA's B, which sits where the
paper's A does.) There is no alpha/r factor: the update is A B, as the paper writes it. B is drawn from a
CPU torch.Generator seeded with `seed`, one trained layer after another, whatever torch's global
generator holds: every rank and device draws the same values, and a test can draw them again.

Weight decay: A and B are the only parameters, so any optimizer's decoupled decay (and `loki-dist
train`'s) shrinks A and B, i.e. the update, and never W_S0. Merging computes W_S0 + A B in float64 and
rounds once to the base weight's dtype (`merge`): exports, implant files, `save_implant` and
`merge_rows` all go through it, so a LoKI* implant file holds plain rows and `apply` reads it as any.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loki_dist.core.errors import UserError
from loki_dist.implant.trainer.rowsplit import RowLinear, install


class RowLowRankLinear(RowLinear):
    """A Linear whose rows `rows` are W[rows] + A B, with A [k, r] and B [r, in] the trainable factors."""

    def __init__(self, base: nn.Linear, rows: list[int], a: torch.Tensor, b: torch.Tensor):
        super().__init__(base, rows, a.device)
        self.out_features = base.out_features
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.A.new_zeros(self.out_features, self.A.shape[1]).index_copy(0, self.rows, self.A)
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.B), up)

    def parts(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B}

    def inputs(self) -> list[nn.Parameter]:
        return [self.weight, self.A, self.B]

    def rows_value(self, dtype: torch.dtype) -> torch.Tensor:
        base_rows = self.weight.data[self.rows.to(self.weight.device)]
        return merge(base_rows, self.A.data, self.B.data, dtype)


def check_rank(rank: int, positions: list[list[int]], intermediate_size: int, source: str) -> None:
    """A rank the update A B can use: it has rank at most min(k, F) in a layer of k rows, so a larger r
    only adds parameters (and at r = 2**40, an allocation no machine has)."""
    useful = min(max(len(rows) for rows in positions), intermediate_size)
    if rank > useful:
        raise UserError(
            f"{source} {rank}: above what A B can use (at most {useful}: the most rows a layer trains, "
            f"or the intermediate size)"
        )


def merge(base_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_S0 + A B, computed in float64 and rounded once to `dtype`: the nearest `dtype` values of the
    trained rows, whichever copy of A and B (the model's, a checkpoint's fp32 masters) they come from."""
    return (base_rows.double() + a.double() @ b.to(a.device).double()).to(dtype)


def initial_factors(rows: int, rank: int, in_features: int, generator: torch.Generator):
    """(A, B) in float32 on the CPU: A [rows, rank] zero, B [rank, in_features] kaiming-uniform as PEFT
    draws lora_A (module docstring)."""
    b = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=generator)
    return torch.zeros(rows, rank), b


def attach(
    parent: nn.Module,
    attribute: str,
    rows: list[int],
    rank: int,
    generator: torch.Generator,
    ds_config: dict | None = None,
):
    """Replace parent.<attribute> (a Linear) by a RowLowRankLinear of rank `rank`, which it returns; its
    factors take the base weight's dtype and device (partitioned at once under ZeRO-3, as rowsplit.install
    says, with `ds_config`)."""
    base = getattr(parent, attribute)
    a, b = initial_factors(len(rows), rank, base.in_features, generator)
    weight = base.weight
    a, b = (t.to(weight.device, weight.dtype) for t in (a, b))
    return install(parent, attribute, RowLowRankLinear(base, rows, a, b), ds_config)


def base_rows(shard: Path, name: str, rows: list[int]) -> torch.Tensor:
    """Rows `rows` of tensor `name` of a safetensors file, [k, F] in its dtype, read run by run of
    consecutive rows (never the whole weight)."""
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as handle:
        view = handle.get_slice(name)
        pieces, start = [], 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                pieces.append(view[rows[start] : rows[i - 1] + 1])
                start = i
    return torch.cat(pieces)
