"""The warnings loki_dist silences: DeepSpeed's calls of collectives that torch deprecates, and nothing else.

DeepSpeed 0.19 calls `torch.distributed.all_gather_into_tensor` and `reduce_scatter_tensor` on every
ZeRO step, and torch 2.13 warns (FutureWarning) about each call: hundreds of lines per run, through the
progress bar, about DeepSpeed's code, not the user's, and nothing the user can change. The filter is
installed when loki_dist is imported (so a `transformers.Trainer` run through the Python API is as quiet
as `loki-dist train`) and again where the CLI starts DeepSpeed (a library may have reset the filters in
between). It matches those two messages only: every other warning, a FutureWarning of the user's own
code too, is shown as Python shows it.
"""

from __future__ import annotations

import warnings

DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def deprecated_collectives() -> None:
    """Ignore torch's FutureWarning about the two collectives DeepSpeed calls (see the top)."""
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)
