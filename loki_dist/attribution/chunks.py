"""How `fast` attribution cuts a batch's packed rows into chunks: what one chunk costs, and the plan.

A sample's m*L (layer, step) rows are ordered layer by layer, so a chunk of R consecutive rows per
sample spans a few consecutive layers; its rows enter at the input of its lowest layer a, and its forward
and backward run through layers a..L-1 only (fast.fast_scores). So a chunk's memory grows with the rows
and with the layers they pass through, and under ZeRO-3 what it gathers is layers a..L-1 and the head,
twice (forward and backward), instead of the whole model.

What a chunk holds at its peak, for B samples of prefix T, R rows each of which r_j run in layer j
(those of layers <= j; all R above the chunk's own layers), hidden D, intermediate F, attention width
Q (heads x head_dim), vocabulary V, activations of e bytes (`chunk_bytes`):

    e*B*sum_j (r_j*(c_d*D + c_f*F) + c_q*(T+r_j)*Q) + c_v*B*R*V + c_0

the per-row activations autograd keeps in every layer (hidden-wide and MLP-wide), the keys and values of
the prefix plus the rows that each layer concatenates and repeats for every query head, the logits with
their float32 softmax, and a fixed part. Attention's probabilities do not appear: the fused attention
kernels (the CPU's flash attention, a GPU's memory-efficient one) do not keep them. The constants were
fitted to measured peaks on the CPU in float32 (bench/bench_attribution.py --memory, which checks the fit
at other shapes, vocabularies of 32k and 50k among them, within 25%).

The plan (`plan_chunks`) is greedy from row 0: each chunk takes as many rows as fit the budget for the
layers they pass through, so the chunks of the upper layers are longer. It depends only on the model's
shape, B, m, the longest prompt of the whole data set and the budget, so every rank makes the same
forward calls, which ZeRO-3 needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Fitted constants of chunk_bytes (see the docstring): elements per row and layer (c_d, c_f), per prefix
# position and layer (c_q), bytes per row and vocabulary entry (c_v), and bytes per chunk (c_0).
C_HIDDEN, C_MLP, C_QUERY_WIDTH, C_VOCAB, C_FIXED = 3.48, 2.69, 2.83, 16.6, int(1.74 * 2**20)


@dataclass(frozen=True)
class Shape:
    """What decides a chunk's memory: the model's widths and the batch's prefix length."""

    num_layers: int
    hidden: int
    intermediate: int
    query_width: int  # num_attention_heads * head_dim
    vocab: int
    element: int  # bytes per activation
    prefix: int  # longest prompt of the data set, less its last token

    @classmethod
    def of(cls, config, prefix: int, dtype: torch.dtype) -> Shape:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        return cls(
            num_layers=int(text.num_hidden_layers),
            hidden=int(text.hidden_size),
            intermediate=int(text.intermediate_size),
            query_width=heads * head_dim,
            vocab=int(text.vocab_size),
            element=torch.empty((), dtype=dtype).element_size(),
            prefix=max(prefix, 1),
        )


def rows_per_layer(shape: Shape, start: int, end: int, steps: int) -> list[int]:
    """The rows of chunk [start, end) running in each layer from its lowest up: those of the layers at
    or below it (fast.py: a row joins at its own layer)."""
    return [min(end, (j + 1) * steps) - start for j in range(start // steps, shape.num_layers)]


def chunk_bytes(shape: Shape, batch: int, start: int, end: int, steps: int) -> int:
    """Peak memory of one chunk: rows [start, end) of each of `batch` samples."""
    s, running = shape, rows_per_layer(shape, start, end, steps)
    activations = sum(r * (C_HIDDEN * s.hidden + C_MLP * s.intermediate) for r in running)
    keys = sum(C_QUERY_WIDTH * (s.prefix + r) * s.query_width for r in running)
    return int(s.element * batch * (activations + keys) + C_VOCAB * batch * (end - start) * s.vocab + C_FIXED)


def copy_bytes(shape: Shape, length: int) -> int:
    """Memory one full-prompt copy of `reference` adds: `length` tokens through every layer, attending
    to each other, and one position's logits in float64."""
    s = shape
    per_layer = length * (C_HIDDEN * s.hidden + C_MLP * s.intermediate + C_QUERY_WIDTH * s.query_width)
    return int(s.element * s.num_layers * per_layer + 2 * C_VOCAB * s.vocab + C_FIXED)


def plan_chunks(shape: Shape, batch: int, steps: int, budget: int) -> list[tuple[int, int]]:
    """[start, end) row ranges per sample covering all m*L rows, each within `budget` bytes (a chunk of
    one row when even that does not fit: the work must still be done)."""
    total, chunks, start = shape.num_layers * steps, [], 0
    while start < total:
        low, high = start + 1, total  # the largest end that fits: chunk_bytes grows with the rows
        while low < high:
            middle = (low + high + 1) // 2
            if chunk_bytes(shape, batch, start, middle, steps) <= budget:
                low = middle
            else:
                high = middle - 1
        chunks.append((start, low))
        start = low
    return chunks


def uniform_chunks(total: int, batch: int, max_rows: int) -> list[tuple[int, int]]:
    """At most `max_rows` rows over the whole batch per chunk (`attribute --max-rows`)."""
    per_chunk = max(1, max_rows // batch) if max_rows else total
    return [(start, min(start + per_chunk, total)) for start in range(0, total, per_chunk)]


def gathered_elements(layer_params: int, head_params: int, total_params: int, chunks, steps: int, L: int):
    """Parameter elements a ZeRO-3 rank gathers for one batch: the prompt pass (the whole model), then
    per chunk its layers and the head (with the final norm), forward and backward."""
    per_chunk = (2 * ((L - start // steps) * layer_params + head_params) for start, _ in chunks)
    return total_params + sum(per_chunk)
