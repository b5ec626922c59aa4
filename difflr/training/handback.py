"""Several devices from a notebook: calls that run in forked worker processes, and what comes back.

With ``strategy="ddp_notebook"`` (or ``"ddp_fork"``) Lightning's ``_MultiProcessingLauncher``
forks one worker process per device for each ``trainer.fit``/``validate``/``predict`` call; the
notebook's process only waits. Lightning itself brings back rank 0's weights (a state dict
written to a temporary file), its ``callback_metrics`` and the call's return value. A Learner keeps
more than that between calls, and this module brings the rest back through the same mechanism
(the launcher's ``get_extra_results``/``update_main_process_results``): from global rank 0, after
the call,

- the optimizer's state dict (state and hyper-parameters: the LRs and momentums the schedule
  left in it),
- each parameter's ``requires_grad``, each module's train/eval mode and the buffers that are not
  in the state dict (``persistent=False``),
- the fit loop's progress (so ``learn.trainer.current_epoch`` and ``global_step`` are the
  worker's, and the logger's step offset moves on by the steps the workers made),
- the state of every callback of the Trainer: difflr's kept objects (the recorder's steps, the
  epoch table, the collected predictions) by their ``handback_state``/``load_handback_state``,
  any other callback by Lightning's ``state_dict``/``load_state_dict`` (the scheduler's position,
  a user's ``EarlyStopping``), as from a checkpoint,
- the torch (CPU), numpy and python RNG states.

Everything travels as bytes written by ``torch.save`` (as Lightning sends its metrics), on the CPU:
the notebook's process never holds a CUDA tensor, so CUDA is never initialised there by difflr
(forking after CUDA is initialised is impossible; `check_launcher` says so before anything runs).

``ddp_spawn`` (and ``forkserver``) start fresh interpreters that must unpickle the whole call,
Learner included (its model, loaders, callbacks and any lambda in them): refused, with the reason.
"""

from __future__ import annotations

import builtins
import io
import random
import re
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from difflr.utils.nested import to_cpu

__all__ = [
    "Handback",
    "HandsBack",
    "check_launcher",
    "hand_back",
    "runs_in_workers",
    "worker_errors",
]

#: The key of difflr's bytes among the launcher's extra results.
_KEY = "difflr_handback_bytes"


@runtime_checkable
class HandsBack(Protocol):
    """An object whose state a worker hands back whole (difflr's recorder, epoch table and
    prediction collector): what it returns must pickle, and is given to the notebook's copy."""

    def handback_state(self) -> Any: ...

    def load_handback_state(self, state: Any) -> None: ...


def runs_in_workers(trainer: pl.Trainer) -> bool:
    """Whether ``trainer``'s calls run in worker processes started for each call (Lightning's
    multiprocessing launcher: ``ddp_notebook``, ``ddp_fork``, ``ddp_spawn``)."""
    return isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)


def _start_method(trainer: pl.Trainer) -> str:
    # Lightning keeps the start method on the launcher only (pinned by tests/test_handback.py).
    return str(getattr(trainer.strategy.launcher, "_start_method", "spawn"))


def check_launcher(trainer: pl.Trainer) -> None:
    """Refuse, before anything runs, a launcher whose workers a Learner cannot hand back from.

    Raises:
        ValueError: A ``spawn``/``forkserver`` launcher (``ddp_spawn``): its workers unpickle
            the whole call; or a fork launcher while CUDA is already initialised in this process.
    """
    if not runs_in_workers(trainer):
        return
    method = _start_method(trainer)
    if method != "fork":
        raise ValueError(
            f"a Learner cannot train with a strategy that starts its worker processes by "
            f"{method!r} ({type(trainer.strategy).__name__}, e.g. strategy='ddp_spawn'): each "
            "worker is a fresh interpreter that must unpickle the whole Learner (its model, "
            "loaders, callbacks, and any lambda or notebook-defined class in them), and only "
            "rank 0's weights would come back. Use strategy='ddp_notebook' (fork: works in "
            "Jupyter, everything the Learner keeps comes back), or strategy='ddp' in a script "
            "(python train.py, or torchrun)."
        )
    if torch.cuda.is_initialized():
        raise ValueError(
            "CUDA is already initialised in this process, and the worker processes of "
            f"{type(trainer.strategy).__name__} (strategy='ddp_notebook'/'ddp_fork') are forked "
            "from it: a forked process cannot use CUDA then. Restart the kernel and do not touch "
            "the GPU before the fit (no model.cuda()/.to('cuda'), no CUDA tensor, no "
            "torch.cuda.* call other than is_available/device_count): each worker moves the "
            "model to its own device, and difflr brings everything back on the CPU."
        )


class Handback:
    """What the workers of one call hand back to the notebook's Learner: collected on global
    rank 0 after the call, applied in the notebook's process.

    Args:
        module: The LightningModule that trains (its weights come back through Lightning).
        optimizer: The Learner's optimizer.
        callbacks: The Trainer's callbacks before the workers start: each worker holds its copy
            of each, in this order (a module's ``configure_callbacks`` may change the Trainer's
            list in the workers).
    """

    def __init__(
        self,
        module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.callbacks = list(callbacks)

    def collect(self, trainer: pl.Trainer) -> bytes:
        """Rank 0's state after the call, as bytes (tensors on the CPU)."""
        module = self.module
        persistent = set(module.state_dict().keys())
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "requires_grad": [p.requires_grad for p in module.parameters()],
            "training": [m.training for m in module.modules()],
            "buffers": {k: b for k, b in module.named_buffers() if k not in persistent},
            "callbacks": [_callback_state(cb) for cb in self.callbacks],
            "rng": (torch.get_rng_state(), np.random.get_state(), random.getstate()),
            "fit_loop": (
                trainer.fit_loop.state_dict() if trainer.state.fn == TrainerFn.FITTING else None
            ),
        }
        state = to_cpu(state)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def apply(self, trainer: pl.Trainer, data: bytes) -> None:
        """Put rank 0's state (from `collect`) into this process's Learner and ``trainer``."""
        # Written by this program's own worker a moment ago (objects, not only tensors).
        state = torch.load(io.BytesIO(data), weights_only=False)
        module = self.module
        self.optimizer.load_state_dict(state["optimizer"])
        for p, flag in zip(module.parameters(), state["requires_grad"]):
            p.requires_grad_(flag)
        for m, training in zip(module.modules(), state["training"]):
            m.training = training
        buffers = dict(module.named_buffers())
        with torch.no_grad():
            for key, value in state["buffers"].items():
                buffers[key].copy_(value)
        for callback, saved in zip(self.callbacks, state["callbacks"], strict=True):
            _load_callback_state(callback, saved)
        torch_rng, np_rng, py_rng = state["rng"]
        torch.set_rng_state(torch_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
        if state["fit_loop"] is not None:
            trainer.fit_loop.load_state_dict(state["fit_loop"])


def _callback_state(callback: Any) -> tuple[str, Any] | None:
    if isinstance(callback, HandsBack):
        return ("whole", callback.handback_state())
    if isinstance(callback, pl.Callback):
        saved = callback.state_dict()
        return ("state_dict", saved) if saved else None
    return None


def _load_callback_state(callback: Any, saved: tuple[str, Any] | None) -> None:
    if saved is None:
        return
    how, state = saved
    if how == "whole":
        callback.load_handback_state(state)
    else:
        callback.load_state_dict(state)


class _HandbackLauncher(_MultiProcessingLauncher):
    """Lightning's multiprocessing launcher, whose rank 0 also sends a `Handback`'s bytes with
    the results Lightning sends back (its documented extension points)."""

    def __init__(self, strategy: Any, start_method: Any, handback: Handback) -> None:
        super().__init__(strategy, start_method=start_method)
        self.handback = handback

    @override
    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        extra[_KEY] = self.handback.collect(trainer)
        return extra

    @override
    def update_main_process_results(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        self.handback.apply(trainer, extra[_KEY])


def hand_back(
    trainer: pl.Trainer, module: pl.LightningModule, optimizer: torch.optim.Optimizer
) -> None:
    """Make ``trainer``'s worker processes (if it has any) hand everything the Learner keeps
    back to this process after each call; nothing changes for a Trainer that runs here.

    Raises:
        ValueError: See `check_launcher`.
    """
    check_launcher(trainer)
    if not runs_in_workers(trainer):
        return
    # Every worker resolves the logger's version itself: fix it here once, so that every call
    # writes to the same run folder (one TensorBoard timeline) rather than a new version each.
    for logger in trainer.loggers:
        _ = logger.version
    strategy = trainer.strategy
    # Lightning has no public setter for a strategy's launcher; `_launcher` is what its
    # `launcher` property returns (pinned by tests/test_handback.py).
    strategy._launcher = _HandbackLauncher(
        strategy, _start_method(trainer), Handback(module, optimizer, trainer.callbacks)
    )


#: The last line of a Python traceback: ``FloatingPointError: the training loss is nan ...``.
_ERROR_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*): (.*)$")


def _original_error(error: BaseException) -> BaseException | None:
    """The worker's error as its own type, for a built-in exception (``FloatingPointError``,
    ``ValueError``, ...) whose traceback torch hands over as text; else ``None``."""
    text = str(getattr(error, "msg", "") or error)
    lines = text.rstrip().splitlines()
    for k in range(len(lines) - 1, -1, -1):
        match = _ERROR_LINE.match(lines[k])
        if match is None:
            continue
        kind = getattr(builtins, match.group(1), None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            return None
        message = "\n".join([match.group(2), *lines[k + 1 :]])
        index = getattr(error, "error_index", None)
        try:
            return kind(
                f"{message}\n(raised in worker process {index}: nothing came back from the "
                "workers, so the Learner is as it was before this call)"
            )
        except TypeError:  # an exception type that takes other arguments
            return None
    return None


@contextmanager
def worker_errors(trainer: pl.Trainer) -> Iterator[None]:
    """Around a call of a Trainer that may run in worker processes: a worker's error is raised
    here as its own type when it is a built-in one (torch reports it as a
    ``ProcessRaisedException`` holding the traceback's text), and any worker still running when
    the call ends by an error or an interrupt is killed, so that none is left behind."""
    try:
        yield
    except BaseException as error:
        if not runs_in_workers(trainer):
            raise
        launcher = trainer.strategy.launcher
        launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))
        for process in launcher.procs:
            process.join(timeout=10)  # reaped: no zombie left in the notebook's process
        if isinstance(error, torch.multiprocessing.ProcessRaisedException):
            original = _original_error(error)
            if original is not None:
                raise original from error
        raise
