"""What Ctrl-C and SIGTERM mean during a Trainer call of a Learner (fit, validate, predict): one
place for both, used by every call of `difflr.training.runner.Runner`.

Ctrl-C raises ``KeyboardInterrupt`` (Lightning raises ``SystemExit``); SIGTERM ends the process
with status 143 and a message on stderr, also in a prediction pass (which Lightning runs on).
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["StopPredictingOnSigterm", "interruptible"]


@contextmanager
def interruptible(
    trainer: pl.Trainer,
    module: torch.nn.Module,
    *,
    interrupted: Any,
    terminated: str,
    restore_modes: bool = False,
) -> Iterator[None]:
    """Run a Trainer call (fit, validate, predict) with the signals meaning what
    they mean: Ctrl-C raises ``KeyboardInterrupt`` (Lightning raises ``SystemExit``), SIGTERM ends
    the process with status 143 and a message on stderr (a ``KeyboardInterrupt`` could be caught
    by a script that then goes on).

    Args:
        trainer: The Trainer that runs.
        module: Its module; with ``restore_modes``, every submodule's train/eval mode is put back
            when the call is interrupted or fails (an evaluation promises an unchanged model).
        interrupted: Returns the ``KeyboardInterrupt``'s message.
        terminated: What the SIGTERM message says after ``"difflr: SIGTERM received, "``.
    """
    handler = signal.getsignal(signal.SIGINT)
    modes = {name: m.training for name, m in module.named_modules()} if restore_modes else {}
    sigterm = False
    try:
        with warnings.catch_warnings():
            # Raised inside Lightning itself on recent torch; nothing a user can act on.
            warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)")
            yield
        sigterm = trainer.received_sigterm  # predict does not stop at SIGTERM by itself
    except SIGTERMException:
        sigterm = True
    except SystemExit:
        # Lightning turns Ctrl-C into SystemExit (it would end a notebook's kernel or a script's
        # later cleanup); give the user back the KeyboardInterrupt they raised.
        _put_back_modes(module, modes)
        if trainer.interrupted:
            raise KeyboardInterrupt(interrupted()) from None
        raise
    except BaseException:
        _put_back_modes(module, modes)
        raise
    finally:
        # Lightning ignores SIGINT while it shuts down after an interrupt; restore it.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)
    if sigterm:
        _put_back_modes(module, modes)
        print(f"difflr: SIGTERM received, {terminated}.", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM)


def _put_back_modes(module: torch.nn.Module, modes: Mapping[str, bool]) -> None:
    for name, submodule in module.named_modules():
        if name in modes:
            submodule.training = modes[name]


class StopPredictingOnSigterm(pl.Callback):
    """Stop a prediction pass after the running batch at SIGTERM (Lightning's prediction loop
    notes the signal but runs on); `interruptible` then ends the process."""

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException
