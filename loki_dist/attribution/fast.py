"""`fast` attribution: the scores of kva.py's formula from one forward of the prompts and a few of rows.

Replacing position t changes nothing at positions < t (attention is causal), and in layers below l
nothing at t either. So one forward of the whole prompts gives the model's prediction y, each layer's
down_proj output z_l at t, each decoder layer's input h_l at t, and the keys and values of positions < t;
then every (layer, step) pair (l, k) becomes one query row at position t, packed after that shared prefix
cache with a mask that lets it see the prefix and itself only (the cache is never copied per row).

A sample's m*L rows are ordered layer by layer (row r = (r // m, r % m)) and cut into chunks
(chunks.py). A chunk's forward starts at its lowest layer a, with the layers below skipped: the rows of
layer l join the others at layer l's input, as h_l (a pre-hook appends them, and narrows the mask, the
position ids and the rotary embedding to the rows present), their down_proj output there is replaced
by alpha_k * z_l, and from there on every row runs to the logits. So a row computes only the layers
its replacement can change, and under ZeRO-3 a chunk gathers layers a..L-1 and the head (forward and
backward) instead of the whole model. The backward stops at the replaced activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from loki_dist.attribution.chunks import uniform_chunks
from loki_dist.attribution.kva import (
    Batch,
    Forward,
    alphas,
    capture_last,
    finish,
    hooked,
    stack_layers,
)
from loki_dist.core import metering
from loki_dist.core.families import decoder_layers


def _cache_argument(forward: Forward) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache`; accept both."""
    import inspect

    module = getattr(forward, "module", forward)  # a DeepSpeed engine wraps the model
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _layers(forward: Forward) -> nn.ModuleList:
    return decoder_layers(getattr(forward, "module", forward))


@torch.no_grad()
def prompt_pass(forward: Forward, projections: Sequence[nn.Module], batch: Batch, cache_arg: str):
    """One forward of the whole prompts: (z [B, L, D] at t, y [B] the model's own prediction at t, h
    [B, L, D] each decoder layer's input at t, the key/value tensors of positions < t for every layer).

    The cache is a plain full-length one even for sliding-window layers (Gemma-2/3): a sliding cache
    trims the prefix, and transformers then misaligns a left-padding mask with it (measured: 1% off).
    The model still applies its sliding window through the attention mask. Position t's own keys and
    values are dropped from it: each row brings its own.
    """
    from transformers import DynamicCache

    cache, outputs, inputs = DynamicCache(), {}, {}

    def keep_input(layer: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[layer] = hidden[:, -1].detach()

        return hook

    handles = [
        layer.register_forward_pre_hook(keep_input(i), with_kwargs=True)
        for i, layer in enumerate(_layers(forward))
    ]
    try:
        with hooked(projections, capture_last(outputs)):
            out = forward(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: cache},
            )
    finally:
        for handle in handles:
            handle.remove()
    prefix = [(layer.keys[:, :, :-1], layer.values[:, :, :-1]) for layer in cache.layers]
    num_layers = len(projections)
    return (
        stack_layers(outputs, num_layers),
        out.logits[:, -1].argmax(-1),
        stack_layers(inputs, num_layers),
        prefix,
    )


class _PassThrough(nn.Module):
    """Stands in for a decoder layer below a chunk's lowest: hands its hidden state on untouched."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextmanager
def _layers_from(forward: Forward, first: int) -> Iterator[None]:
    """Within: the decoder layers below `first` pass their input through and do nothing (no compute,
    and under ZeRO-3 no gather of their weights, forward or backward)."""
    layers = _layers(forward)
    kept = [layers[i] for i in range(first)]
    try:
        for i in range(first):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, layer in enumerate(kept):
            layers[i] = layer


def _narrowed(value, rows: int, prefix: int):
    """A row-wide keyword argument of a decoder layer cut to the first `rows` rows."""
    if isinstance(value, tuple):  # the rotary embedding: (cos, sin), [B, R, ...] each
        return tuple(_narrowed(part, rows, prefix) for part in value)
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 4:  # the attention mask [B, 1, R, prefix + R]
        return value[:, :, :rows, : prefix + rows]
    return value[:, :rows]  # position ids [B, R], cos/sin [B, R, head_dim]


_ROW_WIDE = ("attention_mask", "position_ids", "position_embeddings")


@contextmanager
def _rows_join(
    forward: Forward, hidden: torch.Tensor, layers: range, begins: dict, ends: dict, prefix: int
) -> Iterator[None]:
    """Within: at each layer j of `layers`, the rows of layer j (chunk rows [begins[j], ends[j])) join
    the ones already running, entering as h_j; the layer sees only the ends[j] rows present."""

    def join(j: int) -> Callable:
        def hook(_module, args, kwargs):
            running = args[0] if args else kwargs.pop("hidden_states")
            if j != layers.start:  # the lowest layer's rows are the forward's inputs_embeds
                new = hidden[:, j, None].expand(-1, ends[j] - begins[j], -1).to(running.dtype)
                running = torch.cat([running, new], dim=1)
            kwargs = {k: _narrowed(v, ends[j], prefix) if k in _ROW_WIDE else v for k, v in kwargs.items()}
            return (running, *args[1:]), kwargs

        return hook

    all_layers = _layers(forward)
    handles = [all_layers[j].register_forward_pre_hook(join(j), with_kwargs=True) for j in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _row_masks(config, prefix_mask: torch.Tensor, rows: int, dtype: torch.dtype):
    """Additive 4-D masks [B, 1, R, T-1+R]: row r sees the real prefix tokens and itself, nothing else.

    transformers uses a 4-D mask as it is, so the model's sliding window (if any) is applied here too:
    a prefix key at padded index i is visible from t (index T-1) when i > T-1-W. Families that mix full
    and sliding layers (`layer_types`) take a dict of both masks.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    batch, prefix = prefix_mask.shape
    blocked = torch.finfo(dtype).min
    eye = torch.eye(rows, dtype=torch.bool, device=prefix_mask.device).expand(batch, rows, rows)

    def build(window: int | None) -> torch.Tensor:
        visible = prefix_mask.bool()
        if window is not None:
            visible = visible & (torch.arange(prefix, device=prefix_mask.device) > prefix - window)
        allowed = torch.cat([visible[:, None, :].expand(batch, rows, prefix), eye], dim=2)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=prefix_mask.device)
        return mask.masked_fill_(~allowed, blocked)[:, None]

    window = getattr(text, "sliding_window", None)
    if getattr(text, "layer_types", None) is not None:
        full = build(None)
        return {"full_attention": full, "sliding_attention": build(window) if window else full}
    return build(window)


def fast_scores(
    forward: Forward,
    projections: Sequence[nn.Module],
    batch: Batch,
    steps: int,
    max_rows: int = 0,
    chunks: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Scores [B, L, D] float64 (see the top). `chunks` gives the chunks as [start, end) row ranges per
    sample (chunks.plan_chunks), or `max_rows` the most rows per chunk over the whole batch (0: one
    chunk); either way they depend only on B, L, m and the plan, never on the data (ZeRO-3 needs every
    rank to make the same forward calls)."""
    from transformers import DynamicCache

    num_layers, device = len(projections), batch.input_ids.device
    cache_arg = _cache_argument(forward)
    with metering.phase("attribute_prefix"):
        z, y, hidden, keys_values = prompt_pass(forward, projections, batch, cache_arg)
    scale = alphas(steps, z.dtype, device)
    grad_sum = torch.zeros(z.shape, dtype=torch.float64, device=device)
    config = getattr(forward, "module", forward).config
    prefix_mask = batch.attention_mask[:, :-1]
    for start, end in (
        chunks if chunks is not None else uniform_chunks(num_layers * steps, len(batch), max_rows)
    ):
        row = torch.arange(start, end, device=device)
        l_of, k_of = row // steps, row % steps
        first, last = start // steps, (end - 1) // steps
        # the chunk's rows of layer j are [begins[j], ends[j]); rows of layers <= j run at layer j
        ends = {j: min(end, (j + 1) * steps) - start for j in range(first, last + 1)}
        begins = {j: max(start, j * steps) - start for j in range(first, last + 1)}
        value = (scale[k_of, None] * z[:, l_of]).requires_grad_(True)  # [B, R, D]

        def replace(j: int, value=value, begins=begins, ends=ends) -> Callable:
            def hook(_module, _inputs, output):  # the layer's own rows are the last ones present
                return torch.cat([output[:, : begins[j]], value[:, begins[j] : ends[j]].to(output.dtype)], 1)

            return hook

        with (
            torch.enable_grad(),
            _layers_from(forward, first),
            _rows_join(forward, hidden, range(first, last + 1), begins, ends, prefix_mask.shape[1]),
            hooked(projections[first : last + 1], lambda i, first=first: replace(first + i)),
            metering.phase("attribute_chunk"),
        ):
            out = forward(
                inputs_embeds=hidden[:, first, None].expand(-1, ends[first], -1),
                attention_mask=_row_masks(config, prefix_mask, len(row), z.dtype),
                position_ids=batch.position_ids[:, -1:].expand(-1, len(row)),
                use_cache=True,
                **{cache_arg: DynamicCache(ddp_cache_data=keys_values)},
            )
            probs = torch.softmax(out.logits.float(), dim=-1)  # [B, R, V]
            chosen = probs.gather(2, y[:, None, None].expand(-1, len(row), 1)).sum()
            (grad,) = torch.autograd.grad(chosen, value)
        grad_sum.index_add_(1, l_of, grad.double())
    return finish(z, grad_sum, steps)
