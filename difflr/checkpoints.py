"""The Learner's checkpoints: where they go, what a fit records in them, and resuming from one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

__all__ = ["PlanState", "checkpoint_callbacks", "read_plan_state", "resolve_checkpoint"]


class PlanState(Callback):
    """Saves, in every checkpoint, which stage of a plan ran and with which frozen pattern."""

    def __init__(self, stage: int, n_stages: int, frozen: Sequence[bool]) -> None:
        self.stage, self.n_stages, self.frozen = stage, n_stages, list(frozen)

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.stage, "n_phases": self.n_stages, "frozen": self.frozen}


def read_plan_state(path: Path, n_stages: int) -> tuple[int, list[bool]]:
    """The stage a checkpoint was written in and its frozen pattern.

    Raises:
        ValueError: The checkpoint was not written by a Learner fit, or by a plan of another
            length.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    states = [v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith("PlanState")]
    if not states:
        raise ValueError(
            f"{path} was not written by a Learner fit (no plan state in it); resume it with "
            "trainer.fit(..., ckpt_path=...) or load weights with learn.load()."
        )
    state = states[0]
    if state["n_phases"] != n_stages:
        raise ValueError(
            f"{path} was written by a call of {state['n_phases']} phase(s) but this call has "
            f"{n_stages}; resume with the same method and arguments that wrote it."
        )
    return int(state["phase"]), list(state["frozen"])


def resolve_checkpoint(folder: Path, ckpt_path: str | Path) -> Path:
    """The file ``ckpt_path`` names: ``"last"`` is ``folder/last.ckpt``.

    Raises:
        FileNotFoundError: There is no such file.
    """
    path = folder / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(ckpt_path)!r}: no checkpoint at {path}; pass the path of a .ckpt "
            "file, or 'last' for the Learner's path/checkpoints/last.ckpt."
        )
    return path


def checkpoint_callbacks(folder: Path, monitor: str | None = None) -> list[pl.Callback]:
    """``folder/last.ckpt`` at each epoch end and, with ``monitor``, ``folder/best.ckpt``."""
    callbacks: list[pl.Callback] = [
        # One file, overwritten at each epoch end (save_last alone only writes at fit end).
        ModelCheckpoint(dirpath=folder, filename="last", save_top_k=1, enable_version_counter=False)
    ]
    if monitor is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=folder,
                filename="best",
                monitor=monitor,
                mode="min" if "loss" in monitor else "max",
                save_top_k=1,
                enable_version_counter=False,
            )
        )
    return callbacks
