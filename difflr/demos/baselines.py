"""The main job's baselines that fine-tune nothing: classic classifiers on the few labelled images.

- ``knn_pixels``: 1-nearest-neighbour on the pixels (the network's 16x16 input, flattened: the
  8x8 image upsampled, so the same information).
- ``logreg_pixels``: logistic regression on the standardised pixels.
- ``linear_probe``: logistic regression on the frozen pretrained backbone's pooled features (the
  128 channels entering its head): what the pretraining is worth without any fine-tuning.

They see the labelled images as they are (no augmentation). The logistic regressions' inverse
regularisation ``C`` is a hyper-parameter, chosen on the selection pool like the recipes' LRs.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["BASELINE_NAMES", "C_GRID", "DESCRIPTIONS", "baseline_accuracies", "pooled_features"]

#: The baselines, in the table's order.
BASELINE_NAMES = ("knn_pixels", "logreg_pixels", "linear_probe")
#: What each is, for the table.
DESCRIPTIONS = {
    "knn_pixels": "1-nearest neighbour on the pixels",
    "logreg_pixels": "logistic regression on the pixels",
    "linear_probe": "logistic regression on the frozen backbone's features",
}
#: The grid of logistic regression's ``C`` searched on the selection pool.
C_GRID = (0.01, 0.1, 1.0, 10.0)


@torch.no_grad()
def pooled_features(backbone: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """The backbone's pooled features of network ``inputs`` (eval mode: the source's norm
    statistics), ``(n, channels)``; the backbone is not changed."""
    body = copy.deepcopy(backbone).eval()
    body.fc = nn.Identity()
    return np.concatenate([body(inputs[i : i + 512]).numpy() for i in range(0, len(inputs), 512)])


def baseline_accuracies(
    name: str,
    train_inputs: torch.Tensor,
    train_labels: torch.Tensor,
    test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    c: float | None = None,
    backbone: nn.Module | None = None,
) -> dict[str, float]:
    """Fit baseline ``name`` on the labelled images and score it on every test set.

    Args:
        name: One of `BASELINE_NAMES`.
        train_inputs, train_labels: The labelled images as network inputs, and their labels.
        test_sets: ``{set name: (inputs, labels)}``.
        c: Logistic regression's inverse regularisation (not used by ``knn_pixels``).
        backbone: The pretrained backbone (``linear_probe`` only).

    Returns:
        ``{set name: accuracy in [0, 1]}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def represent(inputs: torch.Tensor) -> np.ndarray:
        if name == "linear_probe":
            if backbone is None:
                raise ValueError("linear_probe needs the backbone; pass backbone=.")
            return pooled_features(backbone, inputs)
        return inputs.flatten(1).numpy()

    model: Any
    if name == "knn_pixels":
        model = KNeighborsClassifier(n_neighbors=1)
    elif name in ("logreg_pixels", "linear_probe"):
        if c is None:
            raise ValueError(f"{name} needs its C; pass c= (chosen on the selection pool).")
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    else:
        raise ValueError(
            f"unknown baseline {name!r}; the baselines are {', '.join(BASELINE_NAMES)}."
        )
    model.fit(represent(train_inputs), train_labels.numpy())
    return {
        key: float((model.predict(represent(inputs)) == labels.numpy()).mean())
        for key, (inputs, labels) in test_sets.items()
    }
