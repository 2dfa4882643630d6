"""The attribution scores (KVA) of DESIGN.md, two ways: `reference` (as written, here) and `fast` (fast.py).

For one prompt with last position t, model prediction y and layer-l down_proj output z_l at t:

    score[l, j] = z_l[j] / m * sum_{k<m} dP_k / dz_l[j],   P_k = softmax(logits_t)[y] with z_l -> (k/m) z_l

`reference` runs, per layer, m copies of the whole prompt with position t of that layer replaced, a
few copies per forward, with the output embedding in float64: it is the oracle, slow and exact (4e-6
of the float64 formula on SmolLM2-135M, where any float32 head is 1e-4 off). `fast` (fast.py) uses
causality to compute the same formula with far less work. Both differentiate with
`torch.autograd.grad` with respect to the replaced activation itself (never `loss.backward()`, which a
DeepSpeed inference engine refuses), so the same code runs on a plain model and on a ZeRO-3 engine.
This module holds what both share: the batch, the Riemann steps, hooks, and the end of the formula.

Prompts of different lengths are batched with *left* padding, masked out of attention, and given the
position ids they would have alone, so that t is the last column for every sample and no pad position
is ever attributed; the tests check that batching changes no score.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from loki_dist.core import metering

Forward = Callable[..., object]  # a model or a DeepSpeed engine: forward(**inputs) -> output with .logits


@dataclass
class Batch:
    """Left-padded prompts: column -1 is the attributed position t of every row."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 0 on pads
    position_ids: torch.Tensor  # [B, T], as if each prompt were alone

    @classmethod
    def left_pad(cls, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Batch:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return cls(ids.to(device), mask.to(device), positions.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def alphas(steps: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Left Riemann sum from the zero baseline: alpha_k = k/m, k = 0..m-1."""
    return torch.arange(steps, dtype=torch.float64, device=device).div(steps).to(dtype)


@contextmanager
def hooked(modules: Sequence[nn.Module], hook_for: Callable[[int], Callable]) -> Iterator[None]:
    """Register `hook_for(layer)` as a forward hook on each down_proj; always removed afterwards."""
    handles = [module.register_forward_hook(hook_for(layer)) for layer, module in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_last(store: dict[int, torch.Tensor]) -> Callable[[int], Callable]:
    def hook_for(layer: int) -> Callable:
        def hook(_module, _inputs, output):
            store[layer] = output[:, -1].detach()

        return hook

    return hook_for


def stack_layers(store: dict[int, torch.Tensor], num_layers: int) -> torch.Tensor:
    return torch.stack([store[layer] for layer in range(num_layers)], dim=1)  # [B, L, D]


def _target_probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over rows of P(y_row) at the last position; rows are independent, so one grad serves all.
    In float64, as the logits of `reference` come (float64_head)."""
    probs = torch.softmax(logits[:, -1].double(), dim=-1)
    return probs.gather(1, targets[:, None]).sum()


def finish(z: torch.Tensor, grad_sum: torch.Tensor, steps: int) -> torch.Tensor:
    """score = z/m * sum_k grad_k, in float64."""
    return z.double() / steps * grad_sum


# -------------------------------------------------------------------------------------------- reference


@torch.no_grad()
def clean_pass(forward: Forward, projections: Sequence[nn.Module], batch: Batch):
    """z [B, L, D] at t for every layer, and y [B], the model's own prediction at t."""
    store: dict[int, torch.Tensor] = {}
    with hooked(projections, capture_last(store)):
        out = forward(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=1,
        )
    return stack_layers(store, len(projections)), out.logits[:, -1].argmax(-1)


class _Float64Head(torch.autograd.Function):
    """The output embedding in float64, forward and backward, a slice of the vocabulary at a time.

    The head is where float32 loses the formula: each logit, and each hidden unit's gradient, is a sum
    over a wide dimension (the gradient over the whole vocabulary: 49152 terms for SmolLM2, 128256
    for Llama 3), and P's gradient then cancels most of it. Measured on SmolLM2-135M at the last layer:
    float32 logits put the scores 9e-5 off the float64 formula, and with frozen weights autograd hands
    each one-position copy to BLAS as a matrix-vector product that adds the vocabulary in sequence
    (2e-4 off); in float64 the head leaves 4e-6.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
        ctx.head, ctx.dtype = head, hidden.dtype
        weight, bias, wide = head.weight, head.bias, hidden.double()
        logits = torch.cat([wide @ rows.double().T for rows in _vocabulary_slices(weight)], dim=-1)
        return logits if bias is None else logits + bias.double()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.head.weight  # read now: ZeRO-3 gathers it again for the module's backward
        total, start = 0, 0
        for rows in _vocabulary_slices(weight):
            total = total + grad[..., start : start + len(rows)].double() @ rows.double()
            start += len(rows)
        return total.to(ctx.dtype), None


HEAD_SLICE_BYTES = 64 << 20  # the float64 copy of output-embedding rows that _Float64Head holds at a time


def _vocabulary_slices(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return weight.split(max(1, HEAD_SLICE_BYTES // (8 * weight.shape[1])))


@contextmanager
def float64_head(forward: Forward) -> Iterator[None]:
    """Within: the model's logits come from _Float64Head (float64) instead of its output embedding.

    The hook runs first among the module's forward hooks, so under ZeRO-3 it sees the weight gathered,
    and its output is the one ZeRO-3 arms to gather the weight again for the backward.
    """
    head = getattr(forward, "module", forward).get_output_embeddings()
    handle = head.register_forward_hook(
        lambda module, inputs, _: _Float64Head.apply(inputs[0], module), prepend=True
    )
    try:
        yield
    finally:
        handle.remove()


def reference_scores(
    forward: Forward, projections: Sequence[nn.Module], batch: Batch, steps: int, max_copies: int = 0
) -> torch.Tensor:
    """Scores [B, L, D] float64, as the method is written: per layer, m full-prompt copies per sample.

    The B*m copies (sample b, step k) of one layer run `max_copies` at a time (0: all at once), so
    memory is bounded by a few copies whatever the batch; the number of forwards depends only on B, L,
    m and max_copies, never on the data (ZeRO-3 needs every rank to make the same calls).
    """
    with metering.phase("attribute_prefix"):
        z, y = clean_pass(forward, projections, batch)
    num_layers, copies = len(projections), len(batch) * steps
    per_forward = max_copies or copies
    scale = alphas(steps, z.dtype, z.device)
    grad_sum = torch.zeros(z.shape, dtype=torch.float64, device=z.device)
    for layer, start in itertools.product(range(num_layers), range(0, copies, per_forward)):
        copy = torch.arange(start, min(start + per_forward, copies), device=z.device)
        b_of, k_of = copy // steps, copy % steps
        value = (scale[k_of, None] * z[b_of, layer]).requires_grad_(True)

        def replace_last(_module, _inputs, output, value=value):
            return torch.cat([output[:, :-1], value[:, None].to(output.dtype)], dim=1)

        inputs = {
            name: getattr(batch, name)[b_of] for name in ("input_ids", "attention_mask", "position_ids")
        }
        with torch.enable_grad(), float64_head(forward), metering.phase("attribute_chunk"):
            handle = projections[layer].register_forward_hook(replace_last)
            try:
                out = forward(**inputs, use_cache=False, logits_to_keep=1)
            finally:
                handle.remove()
            (grad,) = torch.autograd.grad(_target_probability(out.logits, y[b_of]), value)
        grad_sum[:, layer].index_add_(0, b_of, grad.double())
    return finish(z, grad_sum, steps)
