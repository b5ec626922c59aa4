"""The backbone the demo and the tutorials fine-tune: a slim ResNet pretrained on glyphs, cached.

A slim ResNet (ResNet-18's layout, a quarter of its widths) learns to tell apart the letters and
printed digits of `difflr.demos.glyphs`; that network, its head replaced, is fine-tuned on the
handwritten digits of `difflr.demos.digits`. The pretraining runs once per configuration and is
cached in a file under the user's cache folder, keyed by the configuration, the library version
and the FreeType version (which draws the glyphs); later calls load it in well under a second.

- `pretrained_backbone` — the cached pretrained model (built, with progress, when missing).
- `PretrainConfig` — what defines a pretraining (a frozen dataclass); `TUTORIAL_PRETRAIN`, a
  smaller one the tutorials build in about a minute.
- `slim_resnet`, `SlimResNet` — the backbone (a ``torchvision.models.ResNet``, so
  ``vision_learner``, ``replace_head`` and ``resnet_splitter`` work on it: six layer groups).
- `pretrain`, `cache_file`, `default_cache_dir`, `load_pretrained`, `PretrainingCacheError`.

Examples:
    See `difflr.demos.digits` for the few-shot fine-tuning this backbone is made for."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
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
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import BasicBlock

from difflr.demos.digits import PIXEL_MEAN, PIXEL_STD, AugmentedImages, evaluate, to_input
from difflr.demos.glyphs import GlyphConfig, freetype_version, glyph_classes, render_glyphs
from difflr.utils.checks import check_int, check_positive, user_stacklevel
from difflr.utils.files import atomic_save, safe_load
from difflr.utils.locks import one_builder

__all__ = [
    "CACHE_ENV",
    "TUTORIAL_PRETRAIN",
    "PretrainConfig",
    "PretrainingCacheError",
    "SlimResNet",
    "cache_file",
    "default_cache_dir",
    "load_pretrained",
    "pretrain",
    "pretrained_backbone",
    "slim_resnet",
]


#: Environment variable naming the cache folder (overrides ``$XDG_CACHE_HOME/difflr``).
CACHE_ENV = "DIFFLR_CACHE_DIR"


_FORMAT = "difflr.pretraining/1"  # bump when the cache file's layout changes


class PretrainingCacheError(RuntimeError):
    """A pretrained-backbone file that cannot be used: unreadable, foreign or made for other
    settings. The message names the file, the reason and the fix."""


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
        """Hex digest of the settings, the library version, the FreeType version and the input
        normalisation: files of different keys never stand in for each other."""
        from difflr import __version__

        material = {
            "config": self.as_dict(),
            "difflr": __version__,
            "freetype": freetype_version(),
            "normalisation": [PIXEL_MEAN, PIXEL_STD],  # the input the network was trained on
        }
        digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        return digest[:16]


#: A smaller pretraining for the tutorials and the main job: 300 images per class (14,600 to train
#: on), 3 epochs; about a minute on 2 quiet CPU cores, once, then cached like the default. Source
#: accuracy 0.946 (on 1,000 held-out glyphs). What it is worth on the 5-shot digits:
#: ``docs/results/demo.json`` (the main job's results).
TUTORIAL_PRETRAIN = PretrainConfig(glyphs=GlyphConfig(per_class=300), epochs=3, n_valid=1000)


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
            f"difflr.demos: {len(train)} glyph images of {len(classes)} classes from "
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
    meta = payload.get("meta")
    try:
        widths = tuple(meta["config"]["widths"])
        model = SlimResNet(widths, len(meta["classes"]))
    except Exception as error:
        raise PretrainingCacheError(
            f"{path} has no usable metadata (meta: {type(error).__name__}: {error}); {fix}"
        ) from None
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
    with _callers_random_streams_kept():
        if not rebuild and (model := _cached(path, config, check=False)) is not None:
            return model

    def waiting() -> None:
        if progress:
            print(
                f"difflr.demos: waiting for another process building {_shown(path)}",
                flush=True,
            )

    # One builder at a time: a second notebook or job started meanwhile waits, then loads.
    with one_builder(path, on_wait=waiting), _callers_random_streams_kept():
        if not rebuild and (model := _cached(path, config, check=True)) is not None:
            return model
        return _build(config, path, progress)


@contextlib.contextmanager
def _callers_random_streams_kept() -> Iterator[None]:
    """Building the model draws its initial weights and pretraining seeds torch with its own
    seed: put the caller's random streams (torch, numpy, Python's) back after either, so that
    what a notebook computes next does not depend on whether the backbone came from the cache,
    was built just now, or was asked for at all."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


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
        "freetype": freetype_version(),
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
            f"difflr.demos: source accuracy {meta['source_accuracy']:.3f}; saved {_shown(path)}",
            flush=True,
        )
    model.pretraining = {**meta, "path": str(path), "loaded_from_cache": False}
    return model
