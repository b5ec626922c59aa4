"""The LightningModule around a plain model: mistakes in a loss or a metric are named."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from difflr import Learner
from tests.helpers import make_loaders, make_model, three_groups


def fit_with(tmp_path, **kwargs) -> None:
    loss_func = kwargs.pop("loss_func", F.cross_entropy)
    learn = Learner(
        make_model(),
        make_loaders(),
        loss_func,
        splitter=three_groups,
        path=tmp_path,
        logger=False,
        enable_progress_bar=False,
        checkpoint=False,
        **kwargs,
    )
    learn.fit(1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        (
            {"loss_func": lambda p, t: F.cross_entropy(p, t, reduction="none")},
            ValueError,
            r"returned a tensor of shape \(16,\), one loss per item.*reduction='mean'",
        ),
        ({"loss_func": lambda p, t: 1.0}, TypeError, r"returned a float \(1\.0\), not a tensor"),
        (
            {"metrics": lambda p, t: "good"},
            TypeError,
            r"metric 'metric0' returned 'good' \(str\); a metric must return a number",
        ),
    ],
)
def test_a_wrong_loss_or_metric_says_what_to_return(tmp_path, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        fit_with(tmp_path, **kwargs)
