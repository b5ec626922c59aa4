"""Shared fixtures; the Agg backend; fixed seeds."""

from __future__ import annotations

import matplotlib
import pytest
from torch.utils.data import DataLoader

from tests.helpers import make_loaders, quiet, three_groups

matplotlib.use("Agg")


@pytest.fixture
def loaders() -> tuple[DataLoader, DataLoader]:
    return make_loaders()


@pytest.fixture
def learner_kwargs(tmp_path) -> dict:
    """`make_learner`'s options without checkpoints, for tests that bring their own data."""
    return {"splitter": three_groups, **quiet(tmp_path), "checkpoint": False}
