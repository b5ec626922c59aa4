"""Applications of difflr, not its API: the main job and what it is built from.

- `difflr.demos.ablation`: the main job (``python -m difflr.demo``).
- `difflr.demos.settings`, `difflr.demos.phases`: its flags, grids and committed choices; its
  phases (draws, selection, evaluation, LR sweep).
- `difflr.demos.digits`: the UCI handwritten digits as a few-shot task.
- `difflr.demos.glyphs`: letters and printed digits rendered from matplotlib's fonts, reduced to the
  digits' form (the pretraining source).
- `difflr.demos.backbone`: the slim ResNet pretrained on the glyphs, cached.

The tutorials import the backbone and the digits from here.
"""

from difflr.demos.backbone import (
    CACHE_ENV,
    TUTORIAL_PRETRAIN,
    PretrainConfig,
    PretrainingCacheError,
    SlimResNet,
    cache_file,
    default_cache_dir,
    load_pretrained,
    pretrain,
    pretrained_backbone,
    slim_resnet,
)
from difflr.demos.digits import (
    DIGIT_AUGMENT,
    INPUT_SIZE,
    MAX_LEVEL,
    PIXEL_MEAN,
    PIXEL_STD,
    AugmentedImages,
    digit_loaders,
    draw_shots,
    evaluate,
    random_affine,
    repeating_loader,
    to_input,
    uci_digits,
)
from difflr.demos.glyphs import FONTS, GlyphConfig, glyph_classes, render_glyphs

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
