"""Layer groups for any model made of repeated blocks: the trunk, what runs before it, what after.

Transformers and most CNNs share one shape: an input part (embeddings, a stem), a *trunk* of
blocks of one type applied in turn (``encoder.layer``, ``h``, ``layers``, ``blocks``, or stages
``layer1`` .. ``layer4`` that each hold such blocks), and an output part (a final norm, a pooler,
a head). `BlockSplitter` cuts a model along that shape:

============================  =================================================================
group                         parameters
============================  =================================================================
``stem``                      registered before the trunk (embeddings, patch projection, stem)
``block0`` .. ``block{n-1}``  one per block, in order (or ``block_groups`` contiguous runs)
``head``                      registered after the trunk (final norm, pooler, classifier)
============================  =================================================================

(``embeddings``, ``layer0`` .. and ``head`` for a Hugging Face model.) *Registration order* (the
order of ``model.named_parameters()``) stands in for forward order, which cannot be known
without running the model: a module assigned in ``__init__`` before the trunk is taken to run
before it. That is how models are usually written, and how the Hugging Face families in the docs
are; a model that registers its head before its trunk needs a splitter of its own (or a
``model_splits()`` method).

**How the trunk is found** (`find_trunk`). A *block* is a child module that holds parameters in
children of its own (so ``nn.Linear`` or ``nn.LayerNorm`` is not a block, a transformer layer or
``nn.Sequential(conv, bn)`` is). A *run* is a sequence of at least two blocks of the same class
among one module's children; children without parameters (activations, pooling, dropout) do not
break a run. A run of *stages* is one where more than half of the blocks hold a run themselves
(ResNet's ``layer1`` .. ``layer4``, an EfficientNet's stages, decoder layers that each hold a list
of experts); the runs inside its stages are then not candidates, so a ResNet-50-like model is cut
at its stages rather than at the six blocks of its third one. Of the remaining runs the longest
is the trunk; a tie goes to the run holding more parameters, then to the first one.

**Tied parameters.** A parameter registered in several places (an LM head whose weight *is* the
input embedding matrix: GPT-2, BERT's masked-LM head, LLaMA with ``tie_word_embeddings``) is one
tensor and goes into one group. With ``tied="head"`` (the default) a parameter that is used after
the trunk goes to the head group: it is the output projection, so ``freeze()`` trains it, and it
takes the head's learning rate — ULMFiT's choice, where the tied embedding trains with the
decoder in the last group. With ``tied="first"`` it stays in the group where it is first
registered (the embeddings), at the lowest learning rate, and ``freeze()`` leaves it frozen.
Any other shared parameter belongs to the first group that holds it. `tied_parameters` lists them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from torch import nn

from difflr.groups.hf import GROUP_NAMES as TRANSFORMERS_NAMES
from difflr.groups.hf import holds_layers, transformers_trunk
from difflr.utils.checks import check_choice, check_int

__all__ = [
    "BlockSplitter",
    "Trunk",
    "chunks",
    "cut_along_trunk",
    "find_trunk",
    "tied_parameters",
    "trunk_at",
]

#: Layer groups as this module builds them: ``{name: params}``, in forward order, head last.
NamedGroups: TypeAlias = "dict[str, list[nn.Parameter]]"

#: Names of the groups: before the trunk, prefix of the blocks' groups, after the trunk.
DEFAULT_NAMES = ("stem", "block", "head")


@dataclass(frozen=True)
class Trunk:
    """The repeated blocks of a model.

    Attributes:
        path: Path of the module whose children the blocks are (``""``: the model itself),
            as in ``model.get_submodule(path)``.
        blocks: The blocks' names among that module's children, in order (``("0", "1", ...)``
            for an ``nn.ModuleList``; ``("layer1", ..., "layer4")`` for stages).
        block_type: The blocks' class name.
    """

    path: str
    blocks: tuple[str, ...]
    block_type: str

    def block_paths(self) -> list[str]:
        """Each block's path in the model (``"bert.encoder.layer.0"``)."""
        return [f"{self.path}.{name}" if self.path else name for name in self.blocks]

    def __str__(self) -> str:
        where = self.path or "the model"
        return f"{len(self.blocks)} {self.block_type} blocks in {where}"


# --------------------------------------------------------------------------------------------
# Finding the trunk
# --------------------------------------------------------------------------------------------


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _runs(module: nn.Module, blocks_only: bool = True) -> Iterator[list[str]]:
    """Maximal runs of same-class children of ``module`` that hold parameters (``blocks_only``:
    that are blocks), skipping parameter-free children; as lists of child names."""
    run: list[str] = []
    run_type: type | None = None
    for name, child in module.named_children():
        if not _has_params(child):
            continue  # an activation, a pool, a dropout: part of the flow, not of a run
        if blocks_only and not holds_layers(child):
            if run:
                yield run
            run, run_type = [], None
            continue
        if type(child) is run_type:
            run.append(name)
        else:
            if run:
                yield run
            run, run_type = [name], type(child)
    if run:
        yield run


def _n_params(modules: Sequence[nn.Module]) -> int:
    unique = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in unique.values())


def find_trunk(model: nn.Module) -> Trunk | None:
    """The trunk of ``model``: its longest run of same-class blocks, or its run of stages.

    See the module docstring for the rule. Parameter-free children between blocks (activations,
    pooling) do not break a run.

    Args:
        model: Any module.

    Returns:
        The trunk, or ``None`` when the model has no run of two or more blocks (an MLP of
        ``nn.Linear`` layers, a single block).

    Examples:
        >>> from torch import nn
        >>> def block():
        ...     return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        >>> model = nn.Sequential(nn.Linear(4, 8), *[block() for _ in range(3)], nn.Linear(8, 2))
        >>> str(find_trunk(model))
        '3 Sequential blocks in the model'
        >>> find_trunk(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))) is None
        True
    """
    candidates: list[tuple[str, list[str]]] = []
    for path, module in model.named_modules():
        candidates.extend((path, run) for run in _runs(module) if len(run) >= 2)
    if not candidates:
        return None

    def paths_of(path: str, run: list[str]) -> list[str]:
        return [f"{path}.{name}" if path else name for name in run]

    def inside(candidate_path: str, block_path: str) -> bool:
        return candidate_path == block_path or candidate_path.startswith(f"{block_path}.")

    # A run of stages: more than half of its blocks hold a candidate run. The runs inside its
    # stages are then parts of the trunk, not rivals of it.
    nested: set[int] = set()
    for path, run in candidates:
        block_paths = paths_of(path, run)
        holders = [
            block
            for block in block_paths
            if any(inside(other_path, block) for other_path, _ in candidates)
        ]
        if 2 * len(holders) > len(block_paths):
            nested.update(
                i
                for i, (other_path, _) in enumerate(candidates)
                if any(inside(other_path, block) for block in block_paths)
            )

    best: tuple[int, int] | None = None
    trunk: Trunk | None = None
    for i, (path, run) in enumerate(candidates):
        if i in nested:
            continue
        container = model.get_submodule(path) if path else model
        blocks = [container.get_submodule(name) for name in run]
        key = (len(run), _n_params(blocks))
        if best is None or key > best:  # strictly: ties go to the first run found
            best = key
            trunk = Trunk(path, tuple(run), type(blocks[0]).__name__)
    return trunk


def trunk_at(model: nn.Module, path: str) -> Trunk:
    """The trunk whose blocks are the children of ``model.get_submodule(path)`` that hold
    parameters (all of them, whatever their class).

    Raises:
        ValueError: There is no such submodule, or none of its children holds parameters.
    """
    try:
        container = model.get_submodule(path) if path else model
    except AttributeError:
        raise ValueError(
            f"trunk={path!r}: {type(model).__name__} has no such submodule; pass the path of the "
            "module that holds the blocks, as in model.get_submodule(path) "
            "(e.g. 'bert.encoder.layer'), or trunk=None to find it."
        ) from None
    names = [name for name, child in container.named_children() if _has_params(child)]
    if not names:
        raise ValueError(
            f"trunk={path!r}: {type(container).__name__} has no children with parameters, so no "
            "blocks; pass the path of the module that holds the blocks."
        )
    block_type = type(container.get_submodule(names[0])).__name__
    return Trunk(path, tuple(names), block_type)


# --------------------------------------------------------------------------------------------
# Cutting the model along its trunk
# --------------------------------------------------------------------------------------------


def chunks(items: Sequence[Any], n_chunks: int) -> list[list[Any]]:
    """``items`` cut into ``n_chunks`` contiguous runs whose lengths differ by at most one, longer
    first (fewer runs when there are fewer items).

    Examples:
        >>> chunks([0, 1, 2, 3, 4], 3)
        [[0, 1], [2, 3], [4]]
    """
    n_chunks = min(n_chunks, len(items))
    size, extra = divmod(len(items), n_chunks)
    result, start = [], 0
    for k in range(n_chunks):
        stop = start + size + (1 if k < extra else 0)
        result.append(list(items[start:stop]))
        start = stop
    return result


def tied_parameters(model: nn.Module) -> list[tuple[str, ...]]:
    """The parameters registered under several names: one tuple of names per shared tensor.

    Examples:
        >>> from torch import nn
        >>> embedding, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> head.weight = embedding.weight
        >>> tied_parameters(nn.ModuleDict({"embedding": embedding, "head": head}))
        [('embedding.weight', 'head.weight')]
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [tuple(group) for group in names.values() if len(group) > 1]


def cut_along_trunk(
    model: nn.Module,
    trunk: Trunk,
    block_groups: int | None = None,
    tied: str = "head",
    names: tuple[str, str, str] = DEFAULT_NAMES,
) -> NamedGroups:
    """``{first: [...], block0: [...], ..., last: [...]}`` for ``model`` cut along ``trunk``;
    the first and last groups are present even when empty (see `BlockSplitter`)."""
    first, block_name, last = names
    block_prefixes = [f"{path}." for path in trunk.block_paths()]
    # Each parameter's place: 0 = before the trunk, 1 + k = block k, len + 1 = after the trunk.
    after = len(block_prefixes) + 1
    place: dict[int, int] = {}
    params: dict[int, nn.Parameter] = {}
    reached = False
    for name, p in model.named_parameters(remove_duplicate=False):
        k = next((k for k, pre in enumerate(block_prefixes) if name.startswith(pre)), None)
        if k is not None:
            reached = True
            where = 1 + k
        else:
            where = after if reached else 0
        if id(p) not in place:
            place[id(p)], params[id(p)] = where, p
        elif tied == "head" and where == after:
            place[id(p)] = after  # an output projection tied to an input embedding

    by_place: dict[int, list[nn.Parameter]] = {}
    for key, where in place.items():
        by_place.setdefault(where, []).append(params[key])

    groups: NamedGroups = {first: by_place.get(0, [])}
    indices = list(range(len(block_prefixes)))
    runs = [[k] for k in indices] if block_groups is None else chunks(indices, block_groups)
    for run in runs:
        label = f"{block_name}{run[0]}" if len(run) == 1 else f"{block_name}{run[0]}-{run[-1]}"
        groups[label] = [p for k in run for p in by_place.get(1 + k, [])]
    groups[last] = by_place.get(after, [])
    return groups


# --------------------------------------------------------------------------------------------
# The splitter
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSplitter:
    """Splitter for a model made of repeated blocks: a group before the trunk, the blocks, a group
    after it (see the module docstring for how the trunk is found and tied weights are placed).

    Used automatically for a model that defines no ``model_splits()`` and is no architecture
    difflr knows by name; pass one yourself to choose the trunk or to cut it coarser. In a
    Hugging Face model (or a module holding one) the trunk is its list of
    ``config.num_hidden_layers`` layers (`difflr.groups.hf`), and the groups are named ``embeddings``,
    ``layer0`` .. and ``head``.

    Args:
        trunk: Path of the module holding the blocks (``"bert.encoder.layer"``, ``"blocks"``);
            each of its children that holds parameters is a block. ``None``: the Hugging Face
            model's layers, else `find_trunk`.
        block_groups: Cut the blocks into this many contiguous groups (lengths differ by at most
            one, longer first) instead of one group per block; the groups before and after the
            trunk come on top.
        tied: Where a parameter shared by the input side and the output side goes: ``"head"``
            (the default: it is the output projection, trained by ``freeze()`` at the head's LR)
            or ``"first"`` (the group that registers it first: the embeddings).
        names: Names of the group before the trunk, the prefix of the block groups (``"block3"``,
            ``"block0-3"``) and the group after the trunk. ``None``: ``("embeddings", "layer",
            "head")`` for a Hugging Face model, else ``("stem", "block", "head")``.

    Raises:
        TypeError: ``block_groups`` is not an int or ``None``; ``trunk`` is not a string.
        ValueError: ``block_groups < 1``; ``tied`` is not ``"head"`` or ``"first"``; (when called)
            ``trunk`` names no submodule, or no trunk can be found.

    Examples:
        >>> from torch import nn
        >>> def block():
        ...     return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        >>> model = nn.Sequential(nn.Linear(4, 8), *[block() for _ in range(4)], nn.Linear(8, 2))
        >>> list(BlockSplitter()(model))
        ['stem', 'block0', 'block1', 'block2', 'block3', 'head']
        >>> list(BlockSplitter(block_groups=2)(model))
        ['stem', 'block0-1', 'block2-3', 'head']
    """

    trunk: str | None = None
    block_groups: int | None = None
    tied: Literal["head", "first"] = "head"
    names: tuple[str, str, str] | None = None

    def __post_init__(self) -> None:
        if self.trunk is not None and not isinstance(self.trunk, str):
            raise TypeError(
                f"trunk must be a module path such as 'encoder.layer', or None, got {self.trunk!r}."
            )
        if self.block_groups is not None:
            check_int(self.block_groups, "block_groups", 1, what="groups the blocks are cut into")
        check_choice(self.tied, "tied", ("head", "first"))
        if self.names is not None and (
            isinstance(self.names, str)
            or len(self.names) != 3
            or len(set(self.names)) != 3
            or not all(isinstance(name, str) and name for name in self.names)
        ):
            raise ValueError(
                f"names must be three different names (before the trunk, block prefix, after "
                f"the trunk), got {self.names!r}; e.g. ('embeddings', 'layer', 'head')."
            )

    def find(self, model: nn.Module) -> Trunk:
        """The trunk this splitter cuts ``model`` along.

        Raises:
            ValueError: ``trunk`` names no submodule of ``model``, or there is no trunk to find.
        """
        return self._locate(model)[0]

    def _locate(self, model: nn.Module) -> tuple[Trunk, tuple[str, str, str]]:
        layers = transformers_trunk(model)
        names = self.names or (TRANSFORMERS_NAMES if layers is not None else DEFAULT_NAMES)
        path = self.trunk if self.trunk is not None else layers
        if path is not None:
            return trunk_at(model, path), names
        trunk = find_trunk(model)
        if trunk is None:
            raise ValueError(
                f"{type(model).__name__} has no run of two or more blocks of one class, so "
                "BlockSplitter found no trunk; pass BlockSplitter(trunk='path.to.blocks') or a "
                "splitter that returns the groups."
            )
        return trunk, names

    def __call__(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        trunk, names = self._locate(model)
        groups = cut_along_trunk(model, trunk, self.block_groups, self.tied, names)
        return {name: params for name, params in groups.items() if params}
