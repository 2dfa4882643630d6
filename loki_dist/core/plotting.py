"""matplotlib, where a command draws a figure: one way to get it, and one way to save a figure.

matplotlib is optional (the `plot` extra): a command that is asked for a figure checks for it before any
work (`pyplot(flag)`: a missing matplotlib is one line naming the flag), and draws off-screen (Agg), so
that a cluster node without a display draws the same file. A figure is written as every output is:
atomically, through files.py.
"""

from __future__ import annotations

from pathlib import Path

from loki_dist.core import files
from loki_dist.core.errors import UserError

INSTALL = "pip install 'loki-dist[plot]'"


def pyplot(flag: str):
    """matplotlib.pyplot, drawing off-screen; a UserError naming `flag` where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"{flag} needs matplotlib: {INSTALL}") from None
    return plt


def save(fig, path: str | Path, dpi: int = 100) -> None:
    """The figure as a PNG at `path` (atomically), then closed."""
    import matplotlib.pyplot as plt

    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
