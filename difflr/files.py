"""Files a Learner writes and reads on request: saved states and exported models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["export_model", "read_state", "state_file", "write_state"]


def state_file(models: Path, name: str | Path) -> Path:
    """Where ``save(name)`` writes: ``models/{name}.pth``; a name with a suffix is a path."""
    return Path(name) if Path(name).suffix else models / f"{name}.pth"


def write_state(
    file: Path, model: nn.Module, frozen: Sequence[bool], optimizer: torch.optim.Optimizer | None
) -> Path:
    """Save the model's weights, the frozen pattern and (unless ``None``) the optimizer state."""
    file.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"model": model.state_dict(), "frozen": list(frozen)}
    if optimizer is not None:
        state["opt"] = optimizer.state_dict()
    torch.save(state, file)
    return file


def read_state(file: Path) -> dict[str, Any]:
    """What `write_state` wrote.

    Raises:
        FileNotFoundError: No such file.
    """
    if not file.is_file():
        raise FileNotFoundError(f"no saved Learner state at {file}; see Learner.save(name).")
    return torch.load(file, map_location="cpu", weights_only=False)


def export_model(model: nn.Module, file: Path) -> Path:
    """Pickle the whole model (architecture and weights) in eval mode, for inference."""
    file.parent.mkdir(parents=True, exist_ok=True)
    training = model.training
    model.eval()
    try:
        torch.save(model, file)
    finally:
        model.train(training)
    return file
