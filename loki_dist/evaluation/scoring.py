"""The forwards that score a model: each answer letter's log-probability right after a prompt, each
document's NLL, and the batches that keep ZeRO-3 ranks calling the model in lockstep (evaluate.py's
top says why they must).

Apart from the `evaluate` command because every reader of a model's scores uses them: evaluate's tasks,
its retention probes (retention.py), the forgetting monitor while training and the demo. They import
this, never a command.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from loki_dist.core.errors import UserError


def letter_token_ids(tokenizer) -> list[int]:
    """The token of each answer letter as the model would write it: one token per letter, or refuse."""
    from loki_dist.attribution.mmlu import LETTERS

    ids = []
    for letter in LETTERS:
        encoded = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise UserError(f"--model: the tokenizer splits the answer letter {letter!r} into {encoded}")
        ids.append(encoded[0])
    return ids


def model_batches(model: Callable, items: Sequence, batch_size: int, lockstep: bool) -> Iterator[Sequence]:
    """Consecutive slices of batch_size items. With lockstep (ZeRO-3), as many as the rank with the most
    batches has: once this rank's items run out it calls the model on one dummy token per missing batch,
    so that every rank gathers the sharded parameters equally often; those outputs are discarded."""
    device = next(model.parameters()).device
    count = math.ceil(len(items) / batch_size)
    if lockstep:
        from loki_dist.core.collectives import agree_max

        count = agree_max(count)
    for first in range(0, count * batch_size, batch_size):
        if first < len(items):
            yield items[first : first + batch_size]
        else:
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))


@torch.no_grad()
def letter_logprobs(
    model: Callable,
    prompts: Sequence[Sequence[int]],
    letter_ids: Sequence[int],
    pad_id: int,
    batch_size: int,
    lockstep: bool = False,
) -> torch.Tensor:
    """[N, 4] float32 log-probability (over the whole vocabulary) of each answer letter right after each
    prompt, on the CPU; left-padded batches. Its argmax is the chosen letter (ties: the earlier one).

    Prompts are batched in order of length (rows come back in the given order): MMLU prompts range
    from under 100 to over 600 tokens, and padding every batch to its longest cost about 30% (measured).
    lockstep: the model is ZeRO-3-sharded, so every rank must make the same number of calls
    (model_batches).
    """
    from loki_dist.attribution.kva import Batch

    device = next(model.parameters()).device
    letters = torch.tensor(list(letter_ids), device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    scored = []
    for prompt_batch in model_batches(model, [prompts[i] for i in order], batch_size, lockstep):
        batch = Batch.left_pad(prompt_batch, pad_id, device)
        logits = model(  # only the last position's logits: a [B, T, vocab] tensor can be gigabytes
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=1,
        ).logits[:, -1]
        scored.append(torch.log_softmax(logits.float(), dim=-1)[:, letters].cpu())
    out = torch.zeros((len(prompts), len(letter_ids)), dtype=torch.float32)
    if scored:
        out[order] = torch.cat(scored)
    return out


# float32 values of one chunk of positions' logits: what bounds the perplexity NLL's own memory to a few
# chunk-sized temporaries (a [B, T, V] float64 copy was 8.4 GB at B=4, T=2048, V=128k, where a chunk
# is 32 positions)
NLL_CHUNK_BYTES = 64 * 2**20


def token_nll(
    logits: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = NLL_CHUNK_BYTES
) -> torch.Tensor:
    """float64 -log softmax(logits)[target] at each position of [B, T, V] logits, T in chunks.

    Per position: m - x_target + log(sum exp(x - m)), m the largest logit. m - x_target is exact in
    float64 and the exponentials are float32 summed in float64, so no [B, T, V] float64 tensor exists
    and the result is within about 1e-9 relative of a float64 log-softmax (measured 1e-10 per token on
    bf16-valued logits; a float32 cross-entropy is off by up to 4e-6 and biased).
    """
    rows, width, vocab = logits.shape
    step = max(1, chunk_bytes // (rows * vocab * 4))
    out = torch.empty((rows, width), dtype=torch.float64, device=logits.device)
    for start in range(0, width, step):
        piece = logits[:, start : start + step].float()
        top = piece.amax(dim=-1, keepdim=True)
        chosen = piece.gather(-1, targets[:, start : start + step].unsqueeze(-1))
        sums = torch.exp(piece - top).sum(dim=-1, dtype=torch.float64)
        out[:, start : start + step] = (top.double() - chosen.double()).squeeze(-1) + torch.log(sums)
    return out


@torch.no_grad()
def document_nll(
    model: Callable,
    documents: Sequence[Sequence[int]],
    max_seq_len: int,
    pad_id: int,
    batch_size: int,
    lockstep: bool = False,
    chunk_bytes: int = NLL_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 NLL sum, predicted-token count) of each document, in non-overlapping windows.

    lockstep: as for letter_logprobs; ranks may hold different numbers of windows. Beyond the model's own
    logits, a batch holds one chunk of float32 log-probabilities (token_nll).
    """
    device = next(model.parameters()).device
    windows = [
        (doc_index, ids[start : start + max_seq_len])
        for doc_index, ids in enumerate(documents)
        for start in range(0, len(ids), max_seq_len)
    ]
    windows = [(i, w) for i, w in windows if len(w) >= 2]
    nll = torch.zeros(len(documents), dtype=torch.float64)
    count = torch.zeros(len(documents), dtype=torch.int64)
    for chunk in model_batches(model, windows, batch_size, lockstep):
        width = max(len(w) for _, w in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, w) in enumerate(chunk):
            ids[row, : len(w)] = torch.tensor(list(w))
            mask[row, : len(w)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        per_token = token_nll(logits[:, :-1], ids[:, 1:], chunk_bytes) * mask[:, 1:]
        del logits
        for (doc_index, w), total in zip(chunk, per_token.sum(dim=1).cpu(), strict=True):
            nll[doc_index] += total
            count[doc_index] += len(w) - 1
    return nll, count
