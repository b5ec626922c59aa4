"""Where output goes: a Jupyter kernel (rich, updated in place) or a terminal (plain text)."""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["in_notebook", "kernel_shell", "terminal_width"]

#: Set in a process forked from this one (``ddp_notebook``'s workers): ipykernel forwards a
#: forked child's prints to the cell but drops its rich displays ("attempted to send message
#: from fork"), so such a child writes plain text.
_FORKED = False


def _after_fork_in_child() -> None:
    global _FORKED
    _FORKED = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def kernel_shell() -> Any | None:
    """The running IPython shell if it is a kernel (Jupyter) that this process can display in,
    else ``None`` (also in a process forked from the kernel's: see ``_FORKED``).

    Never imports IPython: if it is not imported yet, this is certainly not a kernel.
    """
    if _FORKED:
        return None
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
