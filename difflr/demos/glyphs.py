"""The pretraining source: letters and printed digits rendered from matplotlib's fonts.

Real users fine-tune ImageNet weights; without a network the source is made here. Glyphs are
rendered from the TrueType fonts that ship with matplotlib (DejaVu Sans/Serif/Mono with their
bold and oblique styles, STIX General, Computer Modern: 22 fonts), distorted at random (rotation,
shear, aspect, elastic warp, stroke width) and brought into the target's domain exactly as the
UCI digits were made: a 32x32 bitmap, size-normalised to fill the box, cut into 4x4 blocks whose
on-pixels are counted, giving 8x8 images with 17 grey levels (0..16).

- `GlyphConfig` — what defines the source (a frozen dataclass); `glyph_classes`, its classes.
- `render_glyphs` — the images, deterministic from the config's seed."""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflr.utils.checks import check_int

__all__ = [
    "FONTS",
    "GlyphConfig",
    "freetype_version",
    "glyph_classes",
    "render_glyphs",
]


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


_BITMAP = 32  # side of the binary bitmap the grey levels are counted on


_HI = 64  # side of the canvas the glyphs are distorted on, before the bitmap


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


def freetype_version() -> str:
    from PIL import features

    return str(features.version("freetype2"))


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
