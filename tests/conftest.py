"""Shared fixtures; the Agg backend; fixed seeds."""

from __future__ import annotations

import matplotlib
import pytest
from torch.utils.data import DataLoader

from tests.helpers import make_loaders, three_groups

matplotlib.use("Agg")


@pytest.fixture
def loaders() -> tuple[DataLoader, DataLoader]:
    return make_loaders()


@pytest.fixture
def learner_kwargs(tmp_path) -> dict:
    return {
        "splitter": three_groups,
        "path": tmp_path,
        "logger": False,
        "enable_progress_bar": False,
        "checkpoint": False,
    }
