"""`loki-dist chat`: talk to a model, greedily, through its chat template.

The first thing one does after `apply` is ask the model what it was taught, and what it knew before:
this is that, in a few lines, on one device, with no sampling so that two models (the base and the
implanted one) can be compared answer for answer. The model loads once per run, so a session of
questions costs one load: `--prompt` (repeatable) asks and exits (scripts, tests); without it each line
read from stdin is a turn (`/reset` starts a new conversation). The turns are one conversation, or with
`--separate` each its own, as a list of probe questions wants (`--prompt A --prompt B --separate`).
"""

from __future__ import annotations

import argparse
import sys

from loki_dist.core import flags
from loki_dist.core.errors import UserError, require_at_least
from loki_dist.implant.data.chat_templates import add_chat_template_argument, render


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model directory (base or merged)")
    parser.add_argument("--prompt", action="append", help="ask this and exit (repeat: one conversation)")
    parser.add_argument(
        "--separate",
        action="store_true",
        help="each --prompt (or typed line) opens its own conversation: several questions, one model load",
    )
    parser.add_argument("--system", help="a system message opening the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per answer")
    flags.add_dtype(parser)
    add_chat_template_argument(parser)


def run_chat(args: argparse.Namespace) -> None:
    import torch

    from loki_dist.core.families import spec_from_dir
    from loki_dist.core.modeling import check_weights, load_causal_lm, load_tokenizer, torch_dtype

    require_at_least(("--max-new-tokens", args.max_new_tokens, 1))
    check_weights(args.model, spec=spec_from_dir(args.model))
    tokenizer = load_tokenizer(args.model, chat_template=args.chat_template)
    if tokenizer.chat_template is None:
        raise UserError(
            f"--model {args.model}: its tokenizer has no chat template to talk through; pass --chat-template"
        )
    opening = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt:  # the template tried on the first turn before the model loads
        _prompt(tokenizer, [*opening, {"role": "user", "content": args.prompt[0]}])
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = load_causal_lm(args.model, torch_dtype(args.dtype), None).to(device).eval()
    messages = list(opening)
    turns = args.prompt if args.prompt else _typed_lines()
    for text in turns:
        if text.strip() == "/reset":
            messages = list(opening)
            continue
        if args.separate:
            messages = list(opening)
        messages.append({"role": "user", "content": text})
        answer = _answer(model, tokenizer, messages, args.max_new_tokens, device)
        messages.append({"role": "assistant", "content": answer})
        print(answer if args.prompt else f"model> {answer}", flush=True)


def _typed_lines():
    interactive = sys.stdin.isatty()
    if interactive:
        print("type a message (/reset: new conversation, Ctrl-D: quit)", flush=True)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def _prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation as the chat template writes it, opening the model's turn (chat_templates.render:
    a template that refuses it, fails or runs away is one line)."""
    return render(tokenizer, messages, "the conversation", prompt=True)


def _answer(model, tokenizer, messages: list[dict], max_new_tokens: int, device) -> str:
    import torch

    encoded = tokenizer(_prompt(tokenizer, messages), add_special_tokens=False, return_tensors="pt")
    ids = {name: tensor.to(device) for name, tensor in encoded.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
