"""Where output goes: a Jupyter kernel (rich, updated in place) or a terminal (plain text)."""

from __future__ import annotations

import sys
from typing import Any


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
