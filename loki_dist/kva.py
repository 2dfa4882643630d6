"""The attribution scores (KVA) of DESIGN.md, two ways: `reference` (as written) and `fast` (same numbers).

For one prompt with last position t, model prediction y and layer-l down_proj output z_l at t:

    score[l, j] = z_l[j] / m * sum_{k<m} dP_k / dz_l[j],   P_k = softmax(logits_t)[y] with z_l -> (k/m) z_l

`reference` runs, per layer, m copies of the whole prompt with position t of that layer replaced.
`fast` uses causality: replacing position t changes nothing at positions < t, so the KV cache of the
prefix is computed once and every (layer, step) pair becomes one row of a single-token forward over
that cache. Both differentiate with `torch.autograd.grad` with respect to the replaced activation
itself (never `loss.backward()`, which a DeepSpeed inference engine refuses), so the same code runs on a
plain model and on a ZeRO-3 engine.

Prompts of different lengths are batched with *left* padding, masked out of attention, and given the
position ids they would have alone, so that t is the last column for every sample and no pad position
is ever attributed; the tests check that batching changes no score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

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


def _capture_last(store: dict[int, torch.Tensor]) -> Callable[[int], Callable]:
    def hook_for(layer: int) -> Callable:
        def hook(_module, _inputs, output):
            store[layer] = output[:, -1].detach()

        return hook

    return hook_for


def _stack_layers(store: dict[int, torch.Tensor], num_layers: int) -> torch.Tensor:
    return torch.stack([store[layer] for layer in range(num_layers)], dim=1)  # [B, L, D]


def _target_probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over rows of P(y_row) at the last position; rows are independent, so one grad serves all."""
    probs = torch.softmax(logits[:, -1].float(), dim=-1)
    return probs.gather(1, targets[:, None]).sum()


def _finish(z: torch.Tensor, grad_sum: torch.Tensor, steps: int) -> torch.Tensor:
    """score = z/m * sum_k grad_k, in float64."""
    return z.double() / steps * grad_sum


# -------------------------------------------------------------------------------------------- reference


@torch.no_grad()
def clean_pass(forward: Forward, projections: Sequence[nn.Module], batch: Batch):
    """z [B, L, D] at t for every layer, and y [B], the model's own prediction at t."""
    store: dict[int, torch.Tensor] = {}
    with hooked(projections, _capture_last(store)):
        out = forward(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=1,
        )
    return _stack_layers(store, len(projections)), out.logits[:, -1].argmax(-1)


def reference_scores(forward: Forward, projections: Sequence[nn.Module], batch: Batch, steps: int):
    """Scores [B, L, D] float64, as the method is written: per layer, m full-prompt copies."""
    z, y = clean_pass(forward, projections, batch)
    num_layers = len(projections)
    k_of_row = torch.arange(steps, device=z.device).repeat(len(batch))  # rows (b, k)
    b_of_row = torch.arange(len(batch), device=z.device).repeat_interleave(steps)
    scale = alphas(steps, z.dtype, z.device)[k_of_row, None]
    repeat = {
        name: getattr(batch, name).repeat_interleave(steps, dim=0)
        for name in ("input_ids", "attention_mask", "position_ids")
    }
    grad_sum = torch.zeros(z.shape, dtype=torch.float64, device=z.device)
    for layer in range(num_layers):
        value = (scale * z[b_of_row, layer]).requires_grad_(True)

        def replace_last(_module, _inputs, output, value=value):
            return torch.cat([output[:, :-1], value[:, None].to(output.dtype)], dim=1)

        with torch.enable_grad():
            handle = projections[layer].register_forward_hook(replace_last)
            try:
                out = forward(**repeat, use_cache=False, logits_to_keep=1)
            finally:
                handle.remove()
            (grad,) = torch.autograd.grad(_target_probability(out.logits, y[b_of_row]), value)
        grad_sum[:, layer].index_add_(0, b_of_row, grad.double())
    return _finish(z, grad_sum, steps)


# ------------------------------------------------------------------------------------------------- fast


def _cache_argument(forward: Forward) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache`; accept both."""
    import inspect

    module = getattr(forward, "module", forward)  # a DeepSpeed engine wraps the model
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _cache(keys_values: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor):
    """A fresh full-length DynamicCache holding the prefix cache of sample rows[r] in row r."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in keys_values])


def _prefix_cache(forward: Forward, batch: Batch, cache_arg: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Key/value tensors of positions < t for every layer (the part no replacement at t can change).

    The cache is a plain full-length one even for sliding-window layers (Gemma-2/3): a sliding cache
    trims the prefix, and transformers then misaligns a left-padding mask with it (measured: 1% off).
    The model still applies its sliding window through the attention mask.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    forward(
        input_ids=batch.input_ids[:, :-1],
        attention_mask=batch.attention_mask[:, :-1],
        position_ids=batch.position_ids[:, :-1],
        use_cache=True,
        logits_to_keep=1,
        **{cache_arg: cache},
    )
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_bytes_per_row(config, prefix_len: int, dtype: torch.dtype) -> int:
    """Memory of one row's repeated prefix KV cache: what bounds the rows of one chunk."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * max(prefix_len, 1) * kv_heads * head_dim * element


def fast_scores(
    forward: Forward,
    projections: Sequence[nn.Module],
    batch: Batch,
    steps: int,
    max_rows: int,
) -> torch.Tensor:
    """Scores [B, L, D] float64 from one prefix forward and single-token forwards over m*L*B rows.

    Row r = (b, l, k) in that order; a chunk holds at most `max_rows` rows, so the number of chunks
    depends only on B, L, m and max_rows, never on the data (ZeRO-3 needs every rank to make the same
    forward calls).
    """
    num_layers, device = len(projections), batch.input_ids.device
    token_inputs = dict(
        input_ids=batch.input_ids[:, -1:],
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids[:, -1:],
    )
    store: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        cache_arg = _cache_argument(forward)
        keys_values = _prefix_cache(forward, batch, cache_arg)
        everyone = torch.arange(len(batch), device=device)
        with hooked(projections, _capture_last(store)):
            cache = {cache_arg: _cache(keys_values, everyone)}
            out = forward(**token_inputs, **cache, use_cache=True)
    z, y = _stack_layers(store, num_layers), out.logits[:, -1].argmax(-1)
    scale = alphas(steps, z.dtype, device)
    grad_sum = torch.zeros(z.shape, dtype=torch.float64, device=device)
    total = len(batch) * num_layers * steps
    for start in range(0, total, max_rows):
        row = torch.arange(start, min(start + max_rows, total), device=device)
        b_of, l_of, k_of = row // (num_layers * steps), (row // steps) % num_layers, row % steps
        value = (scale[k_of, None] * z[b_of, l_of]).requires_grad_(True)

        def hook_for(layer: int, value=value, l_of=l_of) -> Callable:
            mine = (l_of == layer)[:, None, None]
            return lambda _m, _i, output: torch.where(mine, value[:, None].to(output.dtype), output)

        with torch.enable_grad(), hooked(projections, hook_for):
            out = forward(
                input_ids=token_inputs["input_ids"][b_of],
                attention_mask=token_inputs["attention_mask"][b_of],
                position_ids=token_inputs["position_ids"][b_of],
                use_cache=True,
                **{cache_arg: _cache(keys_values, b_of)},
            )
            (grad,) = torch.autograd.grad(_target_probability(out.logits, y[b_of]), value)
        grad_sum.index_put_((b_of, l_of), grad.double(), accumulate=True)
    return _finish(z, grad_sum, steps)
