"""Where output goes: a Jupyter kernel (rich, updated in place) or a terminal (plain text)."""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["in_notebook", "kernel_shell", "terminal_width"]


def kernel_shell() -> Any | None:
    """The running IPython shell if it is a kernel (Jupyter), else ``None``.

    Never imports IPython: if it is not imported yet, this is certainly not a kernel.
    """
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    if get_ipython is None:
        return None
    shell = get_ipython()
    return shell if getattr(shell, "kernel", None) is not None else None


def in_notebook() -> bool:
    """Whether the code runs in a Jupyter kernel (where HTML output is shown)."""
    return kernel_shell() is not None


def terminal_width(stream: Any) -> int | None:
    """Columns a line written to ``stream`` may fill without wrapping, or ``None`` when
    ``stream`` is not a terminal (a pipe, a file: no limit).

    One column is kept free: some terminals wrap a line that fills the last one, and a wrapped
    line can no longer be redrawn in place.
    """
    try:
        if not stream.isatty():
            return None
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None
    return columns - 1 if columns > 1 else None
