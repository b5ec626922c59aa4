"""Hugging Face transformers: recognising a model and the list of layers its config counts.

Installed with ``pip install difflr[transformers]``; nothing here imports ``transformers``. A
model can only be a ``transformers.PreTrainedModel`` if the user has imported ``transformers``
already, so the check looks in ``sys.modules`` and ``import difflr`` stays free of it.

Every Hugging Face model says in its config how many layers its trunk has
(``config.num_hidden_layers``; GPT-2's ``n_layer`` and DistilBERT's ``n_layers`` are mapped to it).
The trunk is the one list of modules of that length inside the base model, wherever the family
keeps it (``bert.encoder.layer``, ``transformer.h``, ``model.layers``, ``vit.layers``,
``distilbert.transformer.layer``), so the rule needs no table of families and holds for a
one-layer model too. `difflr.groups.splitters` then cuts the model along it (`difflr.groups.blocks`) into
``embeddings``, ``layer0`` .. ``layer{n-1}`` and ``head``.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["GROUP_NAMES", "holds_layers", "is_transformers_model", "transformers_trunk"]

#: Names of the groups of a Hugging Face model: before the layers, each layer, after the layers.
GROUP_NAMES = ("embeddings", "layer", "head")


def is_transformers_model(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers.PreTrainedModel`` (without importing transformers).

    Examples:
        >>> from torch import nn
        >>> is_transformers_model(nn.Linear(2, 2))
        False
    """
    transformers = sys.modules.get("transformers")
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers else None
    return isinstance(pretrained, type) and isinstance(module, pretrained)


def _n_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    try:
        n = config.num_hidden_layers  # type: ignore[union-attr]
    except AttributeError:  # a composite config (an encoder-decoder, CLIP): no single count
        return None
    return n if isinstance(n, int) and n >= 1 else None


def _layer_list(model: nn.Module) -> str | None:
    """Path of the layer list of the Hugging Face model ``model`` itself, or ``None``."""
    n = _n_layers(model)
    if n is None:
        return None
    base = getattr(model, "base_model", model)
    prefix = next((path for path, module in model.named_modules() if module is base), "")
    found = [
        path
        for path, module in base.named_modules()
        if isinstance(module, (nn.ModuleList, nn.Sequential))
        and len(module) == n
        and len({type(child) for child in module}) == 1
        and all(holds_layers(child) for child in module)
    ]
    if len(found) != 1:
        return None
    return ".".join(part for part in (prefix, found[0]) if part)


def holds_layers(module: nn.Module) -> bool:
    """Whether ``module`` has parameters in children of its own: a layer of layers (a
    transformer layer: attention, MLP), not a single layer (a per-layer norm or bias, which some
    families keep in a list beside the layers). The repeated-blocks rule uses it too."""
    return any(next(child.parameters(), None) is not None for child in module.children())


def transformers_trunk(model: nn.Module) -> str | None:
    """Path of the list of layers of the Hugging Face model in ``model``, e.g.
    ``"bert.encoder.layer"``.

    The model may be ``model`` itself or one held inside it (by a ``LightningModule``, an
    ``nn.Sequential``, ...). Its layers are the ``nn.ModuleList`` (or ``nn.Sequential``) inside its
    base model whose length is ``config.num_hidden_layers`` and whose items are layers of one class.

    Args:
        model: Any module.

    Returns:
        The path, as in ``model.get_submodule(path)``; ``None`` when ``model`` holds no Hugging
        Face model or several, or the model's config has no single layer count (encoder-decoders,
        multi-tower models), or not exactly one list matches it.

    Examples:
        >>> from torch import nn
        >>> transformers_trunk(nn.Linear(2, 2)) is None
        True
    """
    found: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(f"{outer}.") for outer in found) or (path and "" in found):
            continue  # a part of a model already found (a base model inside its task model)
        if is_transformers_model(module):
            found.append(path)
    if len(found) != 1:
        return None
    path = found[0]
    layers = _layer_list(model.get_submodule(path) if path else model)
    if layers is None:
        return None
    return ".".join(part for part in (path, layers) if part)
