"""A pretrained backbone for the UCI handwritten digits, learned offline from rendered font glyphs.

Real users fine-tune ImageNet weights; without a network we build the pretraining source
ourselves. Letters and printed digits are rendered from the TrueType fonts that ship with
matplotlib (DejaVu Sans/Serif/Mono with their bold and oblique styles, STIX General, Computer
Modern: 22 fonts), distorted at random (rotation, shear, aspect, elastic warp, stroke width) and
brought into the target's domain exactly as the UCI digits were made: a 32x32 bitmap,
size-normalised to fill the box, cut into 4x4 blocks whose on-pixels are counted, giving 8x8
images with 17 grey levels (0..16). A slim ResNet (ResNet-18's layout, a quarter of its widths)
learns to tell the glyphs apart; that network, its head replaced, is the backbone the demo and
the tutorials fine-tune on the handwritten digits.

The pretraining runs once per configuration and is cached in a file under the user's cache
folder, keyed by the configuration, the library version and the FreeType version (which draws
the glyphs). Later calls load it in well under a second.

Public API:

- `pretrained_backbone` — the cached pretrained model (built, with progress, when missing).
- `PretrainConfig`, `GlyphConfig` — what defines a pretraining (frozen dataclasses);
  `TUTORIAL_PRETRAIN`, a smaller one the tutorials build in about a minute.
- `digit_loaders` — the target as a few-shot task: loaders of ``shots`` labelled handwritten
  digits per class (augmented) and of all the others; `draw_shots`, `repeating_loader` and
  `AugmentedImages`, its parts; `evaluate`, the accuracy on prepared inputs.
- `render_glyphs` — the source images, deterministic from the config's seed.
- `uci_digits`, `to_input`, `random_affine` — the target data in the same domain, the one
  transform from 8x8 grey levels to network input, and the augmentation used for training.
- `slim_resnet`, `SlimResNet` — the backbone (a ``torchvision.models.ResNet``, so
  ``vision_learner``, ``replace_head`` and ``resnet_splitter`` work on it: six layer groups).
- `pretrain`, `cache_file`, `default_cache_dir`, `load_pretrained`, `PretrainingCacheError`.

Examples:
    Fine-tune the pretrained backbone on five labelled digits per class::

        from difflr import accuracy, vision_learner
        from difflr.pretraining import digit_loaders, pretrained_backbone
        model = pretrained_backbone()          # loads the cache, or pretrains (a few minutes)
        data = digit_loaders(shots=5)          # 50 labelled digits; the other 1,747 validate
        learn = vision_learner(model, data, n_out=10, metrics=accuracy)  # a fresh 10-class head
        learn.fit_one_cycle(6, 2e-3)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import string
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset
from torchvision.models.resnet import BasicBlock

from difflr.checks import check_int, check_positive, user_stacklevel
from difflr.files import atomic_save, one_builder, safe_load

__all__ = [
    "CACHE_ENV",
    "DIGIT_AUGMENT",
    "FONTS",
    "INPUT_SIZE",
    "MAX_LEVEL",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "TUTORIAL_PRETRAIN",
    "AugmentedImages",
    "GlyphConfig",
    "PretrainConfig",
    "PretrainingCacheError",
    "SlimResNet",
    "cache_file",
    "default_cache_dir",
    "digit_loaders",
    "draw_shots",
    "evaluate",
    "glyph_classes",
    "load_pretrained",
    "pretrain",
    "pretrained_backbone",
    "random_affine",
    "render_glyphs",
    "repeating_loader",
    "slim_resnet",
    "to_input",
    "uci_digits",
]

#: Environment variable naming the cache folder (overrides ``$XDG_CACHE_HOME/difflr``).
CACHE_ENV = "DIFFLR_CACHE_DIR"

#: The text fonts of matplotlib's ``mpl-data/fonts/ttf`` (file stems). Left out: the symbol and
#: size-variant fonts (STIXNonUni*, STIXSiz*, cmex10, cmsy10 map letters to symbols) and the
#: Display fonts (no letters).
FONTS: tuple[str, ...] = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
    "cmr10",
    "cmss10",
    "cmtt10",
    "cmb10",
    "cmti10",
    "cmmi10",
)

#: Side of the network's input in pixels: the 8x8 images upsampled bilinearly. 16 keeps every
#: UCI pixel's information at a quarter of the compute of the usual 32.
INPUT_SIZE = 16
#: Mean and standard deviation of the UCI digits' pixels divided by 16 (all 1797 images); every
#: image, source or target, is normalised with these, so both live on the same scale.
PIXEL_MEAN = 0.3053
PIXEL_STD = 0.3761
#: UCI's grey levels: on-pixel counts of 4x4 blocks of a 32x32 bitmap.
MAX_LEVEL = 16
#: `digit_loaders`' augmentation of the handwritten digits: `random_affine`'s rotation (degrees),
#: scale and shift (the demo's runs use it too).
DIGIT_AUGMENT = (10.0, 0.1, 0.15)
_BITMAP = 32  # side of the binary bitmap the grey levels are counted on
_HI = 64  # side of the canvas the glyphs are distorted on, before the bitmap
_FORMAT = "difflr.pretraining/1"  # bump when the cache file's layout changes


class PretrainingCacheError(RuntimeError):
    """A pretrained-backbone file that cannot be used: unreadable, foreign or made for other
    settings. The message names the file, the reason and the fix."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlyphConfig:
    """How the source images are rendered.

    Args:
        chars: The characters drawn; each is a class unless ``merge`` maps it to another.
        merge: Lowercase letters labelled as their capital: once size-normalised, ``c`` and ``C``
            (``o``, ``s``, ``u``, ``v``, ``w``, ``x``, ``z``, ``p``, ``y``) are the same shape, and
            two labels for one shape would only teach the network to guess.
        fonts: Font file stems in matplotlib's ``mpl-data/fonts/ttf``.
        per_class: Images per class (merged classes get this many in all).
        seed: Seed of every random choice: the same config renders the same images.
        rotation: Largest rotation, degrees (uniform in ``[-rotation, rotation]``).
        shear: Largest horizontal shear (x += shear * y).
        aspect: Largest log aspect change (width times ``exp(a)``, height divided by it).
        elastic: Standard deviation of the elastic warp's displacements on a 4x4 grid, in units
            of the half canvas (0.05 moves strokes by about a pixel of the 32x32 bitmap).
        stroke: ``(min, max)`` extra stroke radius, in pixels of the 64-pixel canvas (0: the
            font's own stroke; 2: about two bitmap pixels thicker).
        fill: ``(min, max)`` fraction of the box the glyph's longer side fills after
            size-normalisation (UCI's digits fill their height).
        shift: Largest translation after size-normalisation, in units of the half box.
    """

    chars: str = string.digits + string.ascii_letters
    merge: str = "cosuvwxzpy"
    fonts: tuple[str, ...] = FONTS
    per_class: int = 1000
    seed: int = 0
    rotation: float = 12.0
    shear: float = 0.25
    aspect: float = 0.25
    elastic: float = 0.05
    stroke: tuple[int, int] = (0, 2)
    fill: tuple[float, float] = (0.9, 1.0)
    shift: float = 0.06

    def __post_init__(self) -> None:
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise ValueError(f"chars must be distinct characters, got {self.chars!r}.")
        stray = sorted(set(self.merge) - set(self.chars))
        if stray:
            raise ValueError(
                f"merge names {''.join(stray)!r}, which are not in chars; merge lowercase "
                "letters of chars into their capitals, e.g. merge='cosuvwxz'."
            )
        check_int(self.per_class, "per_class", 1)
        low, high = self.stroke
        if not 0 <= low <= high:
            raise ValueError(f"stroke must be (min, max) with 0 <= min <= max, got {self.stroke}.")
        if not 0 < self.fill[0] <= self.fill[1] <= 1:
            raise ValueError(f"fill must be (min, max) within (0, 1], got {self.fill}.")


@dataclass(frozen=True)
class PretrainConfig:
    """What defines a pretraining; its cache file is keyed by these values.

    Args:
        glyphs: The source images.
        widths: Channels of ``layer1`` .. ``layer4`` of the slim ResNet.
        epochs: Passes over the source images.
        lr_max: Peak LR of the one-cycle schedule (AdamW).
        batch_size: Source images per step.
        augment: Random affine of each source image at each read (``random_affine``'s
            rotation in degrees, scale, shift): new variations every epoch for the cost of the
            resampling ``to_input`` does anyway. ``None`` for none.
        n_valid: Source images held out to report the source accuracy.
        seed: Seed of the initialisation, the shuffling and the augmentation.
    """

    glyphs: GlyphConfig = field(default_factory=GlyphConfig)
    widths: tuple[int, int, int, int] = (16, 32, 64, 128)
    epochs: int = 6
    lr_max: float = 4e-3
    batch_size: int = 128
    augment: tuple[float, float, float] | None = (10.0, 0.1, 0.1)
    n_valid: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.widths) != 4 or any(
            isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.widths
        ):
            raise ValueError(
                f"widths must be 4 positive ints (channels of layer1..layer4), got {self.widths}."
            )
        check_int(self.epochs, "epochs", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_positive(self.lr_max, "lr_max")
        if self.n_valid < 0:
            raise ValueError(f"n_valid must be >= 0, got {self.n_valid}.")

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def key(self) -> str:
        """Hex digest of the settings, the library version and the FreeType version: files of
        different keys never stand in for each other."""
        from difflr import __version__

        material = {"config": self.as_dict(), "difflr": __version__, "freetype": _freetype()}
        digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        return digest[:16]


#: A smaller pretraining for the tutorials: 300 images per class (14,600 to train on), 3 epochs;
#: about a minute on 2 CPU cores (13 s to render, 42 s to train), once, then cached like the
#: default. Source accuracy 0.936 (the default's: 0.966). On the demo's 5-shot task (5 draws)
#: full fine-tuning reaches 0.941 ± 0.014 against scratch's 0.840 ± 0.025 (the default
#: backbone: 0.956 ± 0.012).
TUTORIAL_PRETRAIN = PretrainConfig(glyphs=GlyphConfig(per_class=300), epochs=3, n_valid=1000)


def _freetype() -> str:
    from PIL import features

    return str(features.version("freetype2"))


# --------------------------------------------------------------------------------------------
# The domain: UCI digits, and the one transform to network input
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Rendering the source
# --------------------------------------------------------------------------------------------


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def glyph_classes(config: GlyphConfig) -> list[str]:
    """The class names of ``config``: its characters, merged ones under their capital, in the
    order of ``chars``; label ``k`` is ``glyph_classes(config)[k]``."""
    names = [c.upper() if c in config.merge else c for c in config.chars]
    return list(dict.fromkeys(names))


def _base_glyphs(config: GlyphConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (font, char) glyph, anti-aliased, its longer side 0.6 of a 64-pixel canvas,
    centred (room to rotate and shear); and each glyph's label."""
    from PIL import ImageFont

    folder = _font_dir()
    box = round(_HI * 0.6)
    glyphs = torch.zeros(len(config.fonts), len(config.chars), _HI, _HI)
    for i, stem in enumerate(config.fonts):
        path = folder / f"{stem}.ttf"
        if not path.is_file():
            raise ValueError(
                f"font {stem!r} is not in {folder}; pass fonts from FONTS (the text fonts that "
                "ship with matplotlib)."
            )
        font = ImageFont.truetype(str(path), 96)
        for j, char in enumerate(config.chars):
            mask = font.getmask(char)
            width, height = mask.size
            ink = np.asarray(mask, dtype=np.uint8).reshape(height, width) / 255.0
            rows, cols = np.nonzero(ink > 0.5)
            if len(rows) == 0:
                raise ValueError(f"font {stem!r} draws nothing for {char!r}; leave it out.")
            ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            factor = box / max(ink.shape)
            h, w = (max(1, round(s * factor)) for s in ink.shape)
            small = F.interpolate(
                torch.tensor(ink, dtype=torch.float32)[None, None], (h, w), mode="area"
            )
            top, left = (_HI - h) // 2, (_HI - w) // 2
            glyphs[i, j, top : top + h, left : left + w] = small[0, 0]
    classes = glyph_classes(config)
    labels = [classes.index(c.upper() if c in config.merge else c) for c in config.chars]
    return glyphs.flatten(0, 1), torch.tensor(labels).repeat(len(config.fonts))


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _distort(glyphs: torch.Tensor, config: GlyphConfig, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, shear, aspect and elastic warp of ``(m, 64, 64)`` glyphs; binary out."""
    m = len(glyphs)
    angle = _uniform(m, -1, 1, generator) * math.radians(config.rotation)
    shear = _uniform(m, -config.shear, config.shear, generator)
    aspect = torch.exp(_uniform(m, -config.aspect, config.aspect, generator))
    cos, sin, zero, one = torch.cos(angle), torch.sin(angle), torch.zeros(m), torch.ones(m)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear_matrix = torch.stack([torch.stack([one, shear], -1), torch.stack([zero, one], -1)], -2)
    stretch = torch.diag_embed(torch.stack([aspect, 1 / aspect], -1))
    theta = torch.cat([rotate @ shear_matrix @ stretch, torch.zeros(m, 2, 1)], 2)
    grid = F.affine_grid(theta, [m, 1, _HI, _HI], align_corners=False)
    if config.elastic > 0:
        # A smooth random displacement field: normal noise on a 4x4 grid, upsampled bicubically.
        coarse = torch.randn(m, 2, 4, 4, generator=generator) * config.elastic
        field_ = F.interpolate(coarse, size=(_HI, _HI), mode="bicubic", align_corners=True)
        grid = grid + field_.permute(0, 2, 3, 1)
    warped = F.grid_sample(glyphs[:, None], grid, mode="bilinear", align_corners=False)
    return (warped[:, 0] > 0.5).float()


def _size_normalise(
    ink: torch.Tensor, config: GlyphConfig, generator: torch.Generator
) -> torch.Tensor:
    """Scale each binary ``(m, 64, 64)`` glyph so that its longer side fills ``fill`` of the
    canvas, centred, then shift it a little: NIST's normalisation of the UCI digits, which fill
    their box."""
    m, side = len(ink), ink.shape[-1]
    rows, cols = ink.amax(2) > 0, ink.amax(1) > 0
    index = torch.arange(side, dtype=torch.float32)
    big = float(side)
    top = torch.where(rows, index, big).amin(1)
    bottom = torch.where(rows, index, -big).amax(1)
    left = torch.where(cols, index, big).amin(1)
    right = torch.where(cols, index, -big).amax(1)
    empty = ~rows.any(1)  # a glyph warped off the canvas: keep the frame as it is
    top[empty], bottom[empty], left[empty], right[empty] = 0.0, side - 1.0, 0.0, side - 1.0
    extent = torch.maximum(bottom - top + 1, right - left + 1)
    fill = _uniform(m, config.fill[0], config.fill[1], generator)
    scale = extent / (side * fill)  # input pixels per output pixel
    theta = torch.zeros(m, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    # Centre of the ink box in [-1, 1] coordinates, plus a small random shift.
    theta[:, 0, 2] = (left + right + 1) / side - 1
    theta[:, 1, 2] = (top + bottom + 1) / side - 1
    theta[:, :, 2] += (
        _uniform(2 * m, -config.shift, config.shift, generator).view(m, 2) * scale[:, None]
    )
    grid = F.affine_grid(theta, [m, 1, side, side], align_corners=False)
    return (F.grid_sample(ink[:, None], grid, mode="bilinear", align_corners=False) > 0.5).float()


def _thicken(ink: torch.Tensor, config: GlyphConfig, generator: torch.Generator) -> torch.Tensor:
    """Dilate each ``(m, 1, 64, 64)`` glyph by a random radius in ``config.stroke`` pixels."""
    low, high = config.stroke
    radius = torch.randint(low, high + 1, (len(ink),), generator=generator)
    out = ink.clone()
    for r in range(max(low, 1), high + 1):
        chosen = radius == r
        if chosen.any():
            out[chosen] = F.max_pool2d(ink[chosen], 2 * r + 1, stride=1, padding=r)
    return out


def _to_levels(ink: torch.Tensor) -> torch.Tensor:
    """``(m, 1, 64, 64)`` binary to UCI's form: a 32x32 bitmap (2x2 majority), then the count of
    on-pixels in each 4x4 block: ``(m, 8, 8)`` uint8 in 0..16."""
    bitmap = (F.avg_pool2d(ink, _HI // _BITMAP) >= 0.5).float()
    block = _BITMAP // 8
    counts = F.avg_pool2d(bitmap, block, divisor_override=1)
    return counts[:, 0].round().to(torch.uint8)


def render_glyphs(
    config: GlyphConfig | None = None, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render the source images of ``config`` in the UCI digits' domain.

    Each image is a random (font, character) glyph, distorted (rotation, shear, aspect, elastic
    warp), size-normalised to fill the box, thickened, and reduced the way the UCI digits were:
    a 32x32 bitmap whose 4x4 blocks' on-pixels are counted. The same config gives the same
    images (one ``torch.Generator`` seeded with ``config.seed`` drives every choice).

    Args:
        config: What to render; ``None`` for the defaults.
        chunk: Images transformed at once (memory: about ``chunk * 50`` kB).

    Returns:
        Grey levels ``(n, 8, 8)`` uint8 in ``0..16`` and labels ``(n,)`` int64, with
        ``n = per_class * len(glyph_classes(config))``.

    Examples:
        >>> levels, labels = render_glyphs(GlyphConfig(chars="ab", merge="", fonts=FONTS[:1],
        ...                                            per_class=3))
        >>> levels.shape, levels.dtype, int(levels.max()) <= 16, torch.bincount(labels).tolist()
        (torch.Size([6, 8, 8]), torch.uint8, True, [3, 3])
    """
    config = GlyphConfig() if config is None else config
    glyphs, glyph_labels = _base_glyphs(config)
    n_classes = len(glyph_classes(config))
    generator = torch.Generator().manual_seed(config.seed)
    n = config.per_class * n_classes
    # Exactly per_class images of each class, in random order; each picks one of its class's
    # glyphs (a font's), so merged classes are not over-represented.
    labels = torch.arange(n_classes).repeat(config.per_class)
    labels = labels[torch.randperm(n, generator=generator)]
    members = [torch.where(glyph_labels == k)[0] for k in range(n_classes)]
    pick = torch.rand(n, generator=generator)
    index = torch.stack(
        [members[k][int(p * len(members[k]))] for k, p in zip(labels.tolist(), pick.tolist())]
    )
    parts = []
    for start in range(0, n, chunk):
        ink = _distort(glyphs[index[start : start + chunk]], config, generator)
        ink = _size_normalise(ink, config, generator)
        parts.append(_to_levels(_thicken(ink, config, generator)))
    return torch.cat(parts), labels


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------


class SlimResNet(tvm.ResNet):
    """ResNet-18's layout (a stem, four stages of two basic blocks, a pooled linear head) with
    narrower stages and a stem for small images.

    It is a ``torchvision.models.ResNet`` with the same module names (``conv1``, ``bn1``,
    ``layer1`` .. ``layer4``, ``fc``), so difflr's ResNet splitter cuts it into the original
    example's six layer groups and ``replace_head``/``vision_learner`` swap its head. It differs
    from torchvision's ResNet-18 in two ways, both for 2 CPU cores and 16x16 inputs: widths
    ``(16, 32, 64, 128)`` by default instead of ``(64, 128, 256, 512)``, and a 3x3 stride-1
    stem without max-pooling (torchvision's 7x7 stride-2 stem and pool would shrink a 16x16
    image to 4x4 before ``layer1``). With 1-channel 16x16 inputs it has 0.7 M parameters and
    8.7 M multiply-adds per image, against 11.2 M and 37 M for ResNet-18 on 3-channel 32x32
    images (the 8x8 digits hold no more detail than 16x16 shows).

    Args:
        widths: Channels of ``layer1`` .. ``layer4``.
        n_out: Outputs of ``fc``.
        in_channels: Channels of the input images (1: grey levels).
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128),
        n_out: int = 10,
        in_channels: int = 1,
    ) -> None:
        # torchvision's ResNet.__init__ hard-codes ResNet-18's widths and stem, so the modules
        # are built here under the same names; forward is defined below for the same reason.
        nn.Module.__init__(self)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or channels != width:
                downsample = nn.Sequential(
                    nn.Conv2d(channels, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
                )
            blocks = [BasicBlock(channels, width, stride, downsample), BasicBlock(width, width)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, n_out)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, BasicBlock):
                # Each residual branch starts as zero (torchvision's zero_init_residual): a deep
                # net then trains like a shallow one in its first steps.
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def slim_resnet(n_out: int = 10, widths: Sequence[int] = (16, 32, 64, 128)) -> SlimResNet:
    """A randomly initialised `SlimResNet` for 1-channel 16x16 inputs (``to_input``'s output).

    Examples:
        >>> model = slim_resnet(n_out=3).eval()
        >>> model(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 3])
    """
    return SlimResNet(widths, n_out)


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------


def pretrain(
    config: PretrainConfig | None = None, progress: bool = True
) -> tuple[SlimResNet, dict[str, Any]]:
    """Render the source and train a `SlimResNet` on it with ``Learner.fit_one_cycle``.

    Args:
        config: What to train; ``None`` for the defaults.
        progress: Show Lightning's progress bar and the epoch table while it trains.

    Returns:
        The trained model (its ``fc`` has one output per glyph class) and plain metadata:
        ``classes``, ``source_accuracy`` (on ``n_valid`` held-out source images),
        ``n_images``, ``render_seconds``, ``train_seconds``.
    """
    from difflr import Learner, accuracy  # the public names; imported here, where they train

    config = PretrainConfig() if config is None else config
    started = time.perf_counter()
    levels, labels = render_glyphs(config.glyphs)
    render_seconds = time.perf_counter() - started
    classes = glyph_classes(config.glyphs)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(labels), generator=generator)
    n_valid = min(config.n_valid, len(labels) // 5)
    valid, train = order[:n_valid], order[n_valid:]
    dataset = AugmentedImages(levels[train], labels[train], config.augment, generator)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(train) > config.batch_size,
        collate_fn=dataset.collate,
        generator=generator,
    )
    # The held-out glyphs as the validation set: the epoch table shows the source accuracy.
    held_out = TensorDataset(to_input(levels[valid]), labels[valid])
    valid_loader = DataLoader(held_out, batch_size=1024) if n_valid else None
    torch.manual_seed(config.seed)
    model = SlimResNet(config.widths, len(classes))
    learn = Learner(
        model,
        (loader, valid_loader),
        F.cross_entropy,
        metrics=accuracy,
        logger=False,
        checkpoint=False,
        enable_progress_bar=progress,
    )
    if progress:
        print(
            f"difflr.pretraining: {len(train)} glyph images of {len(classes)} classes from "
            f"{len(config.glyphs.fonts)} fonts (rendered in {render_seconds:.0f} s); "
            f"{config.epochs} epochs of a slim ResNet",
            flush=True,
        )
    with _quiet(progress):
        learn.fit_one_cycle(config.epochs, config.lr_max)
    model.eval()
    return model, {
        "classes": classes,
        "source_accuracy": evaluate(model, held_out.tensors[0], labels[valid]),
        "n_images": len(train),
        "render_seconds": render_seconds,
        "train_seconds": time.perf_counter() - started - render_seconds,
    }


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Swallow the Learner's epoch table when no progress is wanted."""
    if progress:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$DIFFLR_CACHE_DIR``, else ``$XDG_CACHE_HOME/difflr``, else ``~/.cache/difflr``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "difflr"


def _shown(path: Path) -> str:
    """``path`` for a progress message: under the home folder as ``~/...`` (a notebook's output
    then names the file without the machine's user folder)."""
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def cache_file(config: PretrainConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    """Where the backbone pretrained with ``config`` is kept: ``glyph_resnet_<key>.pt`` in
    ``cache_dir`` (default: `default_cache_dir`)."""
    config = PretrainConfig() if config is None else config
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return folder / f"glyph_resnet_{config.key()}.pt"


def load_pretrained(
    path: str | Path, config: PretrainConfig | None = None
) -> tuple[SlimResNet, dict[str, Any]]:
    """Load a backbone that `pretrained_backbone` saved.

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain values only; no
    code runs).

    Args:
        path: The ``.pt`` file.
        config: When given, the file must have been made with it (same key).

    Returns:
        The model (eval mode) and the metadata stored with it (``config``, ``key``,
        ``classes``, ``source_accuracy``, timings, versions).

    Raises:
        PretrainingCacheError: The file is unreadable, not a difflr pretraining file, made with
            other settings, or its weights do not fit; the message names the file and the fix.
    """
    path = Path(path)
    fix = f"delete {path} or call pretrained_backbone(rebuild=True) to pretrain again."
    try:
        payload = safe_load(path, "pretrained backbone")
    except (OSError, ValueError) as error:  # truncated, a pickle of other objects, not a file
        raise PretrainingCacheError(f"{error} {fix}") from error
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise PretrainingCacheError(
            f"{path} is not a difflr pretraining file of format {_FORMAT!r} (found {found!r}); "
            f"{fix}"
        )
    if config is not None and payload.get("key") != config.key():
        raise PretrainingCacheError(
            f"{path} was pretrained with other settings (key {payload.get('key')}, expected "
            f"{config.key()}); {fix}"
        )
    meta = payload["meta"]
    model = SlimResNet(tuple(meta["config"]["widths"]), len(meta["classes"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as error:
        raise PretrainingCacheError(
            f"the weights in {path} do not fit the slim ResNet its metadata describes "
            f"({str(error).splitlines()[0]}); {fix}"
        ) from error
    return model.eval(), meta


def pretrained_backbone(
    config: PretrainConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> SlimResNet:
    """The slim ResNet pretrained on rendered glyphs: from the cache, or trained and cached.

    The first call for a config renders the glyphs and trains (a few minutes on 2 CPU cores,
    with progress); later calls load the file (well under a second). The model keeps its source
    head (``fc``: one output per glyph class); give it a new one with
    ``vision_learner(model, data, n_out)`` or ``replace_head(model, n_out)``.

    Args:
        config: The pretraining; ``None`` for the defaults (``PretrainConfig()``).
        cache_dir: Folder of the cache; default `default_cache_dir` (``$DIFFLR_CACHE_DIR``,
            ``$XDG_CACHE_HOME/difflr`` or ``~/.cache/difflr``).
        rebuild: Pretrain again even when the file exists, and overwrite it.
        progress: Show progress while pretraining (nothing is shown when loading).

    Returns:
        The model, in eval mode. ``model.pretraining`` holds the metadata (``classes``,
        ``source_accuracy``, ``config``, ``path``, ``loaded_from_cache``, timings).

    Examples:
        >>> model = pretrained_backbone()  # doctest: +SKIP
        >>> model.pretraining["source_accuracy"]  # doctest: +SKIP
        0.97
    """
    config = PretrainConfig() if config is None else config
    path = cache_file(config, cache_dir)
    if not rebuild and (model := _cached(path, config, check=False)) is not None:
        return model

    def waiting() -> None:
        if progress:
            print(
                f"difflr.pretraining: waiting for another process building {_shown(path)}",
                flush=True,
            )

    # One builder at a time: a second notebook or job started meanwhile waits, then loads.
    with one_builder(path, on_wait=waiting):
        if not rebuild and (model := _cached(path, config, check=True)) is not None:
            return model
        return _build(config, path, progress)


def _cached(path: Path, config: PretrainConfig, check: bool) -> SlimResNet | None:
    """The cached model, or ``None`` when there is none; an unusable file is reported (once:
    when ``check``, under the builder's lock) and rebuilt."""
    if not path.is_file():
        return None
    try:
        model, meta = load_pretrained(path, config)
    except PretrainingCacheError as error:
        if check:
            warnings.warn(f"{error} Pretraining again now.", stacklevel=user_stacklevel())
        return None
    model.pretraining = {**meta, "path": str(path), "loaded_from_cache": True}
    return model


def _build(config: PretrainConfig, path: Path, progress: bool) -> SlimResNet:
    model, meta = pretrain(config, progress=progress)
    from difflr import __version__

    meta = {
        **meta,
        "config": config.as_dict(),
        "key": config.key(),
        "difflr": __version__,
        "torch": str(torch.__version__),  # a TorchVersion would not load with weights_only
        "freetype": _freetype(),
    }
    payload = {
        "format": _FORMAT,
        "key": config.key(),
        "meta": meta,
        "state_dict": model.state_dict(),
    }
    atomic_save(payload, path)
    if progress:
        print(
            f"difflr.pretraining: source accuracy {meta['source_accuracy']:.3f}; saved "
            f"{_shown(path)}",
            flush=True,
        )
    model.pretraining = {**meta, "path": str(path), "loaded_from_cache": False}
    return model
