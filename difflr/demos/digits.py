"""The target: the UCI handwritten digits (they ship with scikit-learn) as a few-shot task.

- `uci_digits`, `to_input` — the 1,797 images as 8x8 grey levels (0..16) and the one transform to
  network input (normalised with the pretraining glyphs' statistics, `PIXEL_MEAN`/`PIXEL_STD`).
- `random_affine`, `AugmentedImages` — the augmentation used for training.
- `draw_shots`, `digit_loaders`, `repeating_loader` — ``shots`` labelled digits per class and the
  loaders over them and over the others; `evaluate`, the accuracy on prepared inputs.

Examples:
    Fine-tune the pretrained backbone on five labelled digits per class::

        from difflr import accuracy, vision_learner
        from difflr.demos import digit_loaders, pretrained_backbone
        model = pretrained_backbone()          # loads the cache, or pretrains (a few minutes)
        data = digit_loaders(shots=5)          # 50 labelled digits; the other 1,747 validate
        learn = vision_learner(model, data, n_out=10, metrics=accuracy)  # a fresh 10-class head
        learn.fit_one_cycle(6, 1e-3)"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from difflr.utils.checks import check_int

__all__ = [
    "DIGIT_AUGMENT",
    "INPUT_SIZE",
    "MAX_LEVEL",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "AugmentedImages",
    "digit_loaders",
    "draw_shots",
    "evaluate",
    "random_affine",
    "repeating_loader",
    "to_input",
    "uci_digits",
]


#: Side of the network's input in pixels: the 8x8 images upsampled bilinearly. 16 keeps every
#: UCI pixel's information at a quarter of the compute of the usual 32.
INPUT_SIZE = 16


#: Mean and standard deviation of the pretraining source's pixels divided by 16 (the 52,000
#: glyphs of the default `GlyphConfig`), as one normalises with ImageNet's statistics: every
#: image, source or target, is normalised with these, so both live on the same scale, and no
#: statistic of a handwritten digit (a test image among them) enters the input.
PIXEL_MEAN = 0.3357


PIXEL_STD = 0.3820


#: UCI's grey levels: on-pixel counts of 4x4 blocks of a 32x32 bitmap.
MAX_LEVEL = 16


#: `digit_loaders`' augmentation of the handwritten digits: `random_affine`'s rotation (degrees),
#: scale and shift (the demo's runs use it too).
DIGIT_AUGMENT = (10.0, 0.1, 0.15)


def uci_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 UCI handwritten digits that ship with scikit-learn (nothing is downloaded).

    Returns:
        Grey levels ``(1797, 8, 8)`` as ``uint8`` in ``0..16``, and labels ``(1797,)`` in
        ``0..9``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install difflr[demo]``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the UCI digits come with scikit-learn; install it with pip install 'difflr[demo]' "
            "(or pip install scikit-learn)."
        ) from error
    digits = load_digits()
    levels = torch.from_numpy(np.rint(digits.images).astype(np.uint8))
    return levels, torch.from_numpy(digits.target.astype(np.int64))


def to_input(
    levels: torch.Tensor, theta: torch.Tensor | None = None, size: int = INPUT_SIZE
) -> torch.Tensor:
    """8x8 grey levels to the network's input: bilinear upsampling, normalised.

    Source and target images both go through this function, so they meet the network in the
    same form.

    Args:
        levels: ``(n, 8, 8)`` grey levels in ``0..16`` (any dtype).
        theta: Optional ``(n, 2, 3)`` affine matrices (``F.affine_grid``'s convention, output to
            input coordinates in [-1, 1]) applied in the same resampling: augmentation at no
            extra cost. ``None``: the identity.
        size: Side of the output, pixels.

    Returns:
        ``(n, 1, size, size)`` float32, about zero mean and unit variance.

    Examples:
        >>> to_input(torch.full((2, 8, 8), 16)).shape
        torch.Size([2, 1, 16, 16])
    """
    if levels.ndim != 3 or levels.shape[1:] != (8, 8):
        raise ValueError(f"levels must have shape (n, 8, 8), got {tuple(levels.shape)}.")
    x = levels.float()[:, None] / MAX_LEVEL
    n = len(x)
    if theta is None:
        theta = torch.eye(2, 3).expand(n, 2, 3)
    # grid_sample with the identity equals F.interpolate(bilinear, align_corners=False) inside
    # the image and reads zeros (the background) outside it, where a shift moves pixels in.
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (x - PIXEL_MEAN) / PIXEL_STD


def random_affine(
    n: int,
    rotation: float = 10.0,
    scale: float = 0.1,
    shift: float = 0.15,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random affine matrices for ``to_input``: rotation, isotropic scale and translation.

    Args:
        n: Number of matrices.
        rotation: Largest rotation, degrees.
        scale: Largest relative scale change (the image is scaled by ``1 ± scale``).
        shift: Largest translation, in half-image units (0.15 is 0.6 pixels of the 8x8 image).
        generator: Source of randomness; ``None`` uses torch's global one.

    Returns:
        ``(n, 2, 3)`` float32 matrices.
    """
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotation)
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    theta = torch.zeros(n, 2, 3)
    # Output-to-input mapping: dividing by the zoom enlarges the image.
    theta[:, 0, 0] = torch.cos(angle) / zoom
    theta[:, 0, 1] = -torch.sin(angle) / zoom
    theta[:, 1, 0] = torch.sin(angle) / zoom
    theta[:, 1, 1] = torch.cos(angle) / zoom
    theta[:, :, 2] = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift
    return theta


class AugmentedImages(Dataset):
    """Grey-level images whose batches ``collate`` turns into network input, with a random
    affine per image when ``augment`` is given (`random_affine` and the upsampling in one
    resampling, so augmentation costs nothing extra).

    Items are indices; pass ``collate_fn=dataset.collate`` to the ``DataLoader``.

    Args:
        levels: ``(n, 8, 8)`` grey levels in ``0..16``.
        labels: ``(n,)`` class indices.
        augment: `random_affine`'s ``(rotation, scale, shift)``; ``None`` for none.
        generator: Source of the affines' randomness; ``None`` uses torch's global one.
    """

    def __init__(
        self,
        levels: torch.Tensor,
        labels: torch.Tensor,
        augment: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(levels) != len(labels):
            raise ValueError(f"{len(levels)} images but {len(labels)} labels; pass one label each.")
        self.levels, self.labels = levels, labels
        self.augment = augment
        self.generator = generator

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: ``(to_input(levels, affines), labels)``."""
        index = torch.tensor(indices)
        theta = None
        if self.augment is not None:
            theta = random_affine(len(index), *self.augment, generator=self.generator)
        return to_input(self.levels[index], theta), self.labels[index]


def draw_shots(
    labels: torch.Tensor, shots: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Few-shot split: ``shots`` random indices of each class, and every other index.

    Args:
        labels: ``(n,)`` class indices ``0..k-1``.
        shots: Labelled images per class.
        generator: Source of the draw; ``None`` uses torch's global one.

    Returns:
        The chosen indices (class by class) and the rest (ascending): the training and the
        test set.

    Raises:
        ValueError: A class has no more than ``shots`` images (nothing would be left to test on).

    Examples:
        >>> train, rest = draw_shots(torch.tensor([0, 0, 0, 1, 1, 1]), 2)
        >>> len(train), len(rest)
        (4, 2)
    """
    check_int(shots, "shots", 1)
    chosen = []
    for label in range(int(labels.max()) + 1):
        candidates = torch.where(labels == label)[0]
        if len(candidates) <= shots:
            raise ValueError(
                f"class {label} has {len(candidates)} images, not more than shots={shots}; "
                "lower shots."
            )
        chosen.append(candidates[torch.randperm(len(candidates), generator=generator)[:shots]])
    index = torch.cat(chosen)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[index] = False
    return index, torch.where(rest)[0]


def digit_loaders(
    shots: int = 10,
    *,
    batch_size: int = 32,
    batches_per_epoch: int = 10,
    augment: Sequence[float] | None = DIGIT_AUGMENT,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """The UCI digits as a few-shot task in the backbone's domain: ``(train, valid)`` loaders.

    ``shots`` images of each digit, drawn with ``seed``, to train on; all the others (about
    1,800 - 10 x ``shots``) to validate on. The few training images are augmented and repeated:
    an epoch is ``batches_per_epoch`` batches of ``batch_size`` images drawn at random, so a
    schedule has enough steps to show its shape. The demo's ablation uses the same data.

    Args:
        shots: Labelled images per digit.
        batch_size: Images per training batch.
        batches_per_epoch: Training batches per epoch.
        augment: `random_affine`'s ``(rotation, scale, shift)`` for the training images;
            ``None`` for none.
        seed: Seed of the draw (the shuffling and augmentation use torch's global RNG:
            ``torch.manual_seed`` makes a run repeat).

    Returns:
        Training loader (augmented, ``batches_per_epoch`` batches) and validation loader
        (every other image, not augmented), both yielding ``(inputs, labels)`` with inputs of
        shape ``(n, 1, 16, 16)``.

    Examples:
        >>> train_dl, valid_dl = digit_loaders(shots=5)  # doctest: +SKIP
        >>> len(train_dl), len(valid_dl.dataset)  # doctest: +SKIP
        (10, 1747)
    """
    levels, labels = uci_digits()
    train, valid = draw_shots(labels, shots, torch.Generator().manual_seed(seed))
    train_loader = repeating_loader(
        levels[train], labels[train], batch_size, batches_per_epoch, augment
    )
    held_out = TensorDataset(to_input(levels[valid]), labels[valid])
    return train_loader, DataLoader(held_out, batch_size=512)


def repeating_loader(
    levels: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    batches_per_epoch: int,
    augment: Sequence[float] | None = DIGIT_AUGMENT,
) -> DataLoader:
    """A few labelled images as an epoch of ``batches_per_epoch`` batches drawn at random (the
    images repeated), augmented (`AugmentedImages`); torch's global RNG draws and augments."""
    dataset = AugmentedImages(levels, labels, augment)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, num_samples=batches_per_epoch * batch_size),
        collate_fn=dataset.collate,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Accuracy of ``model`` on network ``inputs`` (`to_input`'s), in [0, 1]; the model is left
    in eval mode. ``0.0`` for no images."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(inputs[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(len(labels), 1)
