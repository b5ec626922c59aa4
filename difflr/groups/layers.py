"""Layer groups ("splits"): how a model is cut into groups.

A *splitter* is a function ``splitter(model)`` that returns the model's layer groups in forward
order (stem first, head last), either as a sequence or as a mapping ``{name: group}``. A group is
an ``nn.Module`` or an iterable of ``nn.Parameter``. Every trainable parameter of the model must be
in exactly one group. `layer_groups` checks that and names each group; each becomes one or two
optimizer param groups (`difflr.optim.param_groups`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from torch import nn

from difflr.utils.checks import user_stacklevel

__all__ = [
    "NORM_TYPES",
    "Group",
    "LayerGroup",
    "Splitter",
    "group_fingerprint",
    "layer_groups",
    "no_decay_param_ids",
    "norm_param_ids",
    "warn_single_group",
]

Group: TypeAlias = "nn.Module | Iterable[nn.Parameter]"


Splitter: TypeAlias = "Callable[[nn.Module], Sequence[Group] | Mapping[str, Group]]"


#: Layers whose parameters stay trainable in frozen groups (``train_bn=True``) and take no weight
#: decay (``wd_bn_bias=False``).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*, LazyBatchNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


if hasattr(nn, "RMSNorm"):
    NORM_TYPES = (*NORM_TYPES, nn.RMSNorm)


@dataclass(frozen=True, eq=False)
class LayerGroup:
    """One layer group: a name and its parameters, in the order the model defines them.

    Attributes:
        name: Unique, readable name such as ``"0.stem"`` or ``"5.head"``; used as the optimizer
            param group's ``"name"`` and as the TensorBoard tag.
        params: The group's parameters (frozen ones included).
        fixed: Those of ``params`` that never train, whatever the freeze pattern: the base
            weights an adapter method (LoRA, ``peft``) froze (`difflr.groups.adapters`). Freezing
            leaves them frozen and the optimizer does not hold them; empty for other models.
    """

    name: str
    params: tuple[nn.Parameter, ...]
    fixed: tuple[nn.Parameter, ...] = ()

    @property
    def n_params(self) -> int:
        """Number of scalar values in the group."""
        return sum(p.numel() for p in self.params)

    @property
    def tunable(self) -> tuple[nn.Parameter, ...]:
        """The parameters that may train (``params`` less ``fixed``)."""
        if not self.fixed:
            return self.params
        fixed = {id(p) for p in self.fixed}
        return tuple(p for p in self.params if id(p) not in fixed)


def norm_param_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters owned by normalisation layers (see ``NORM_TYPES``)."""
    return {
        id(p)
        for module in model.modules()
        if isinstance(module, NORM_TYPES)
        for p in module.parameters(recurse=False)
    }


def no_decay_param_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that take no weight decay when ``wd_bn_bias=False``.

    These are normalisation-layer parameters and every bias (a parameter named ``bias`` or any
    parameter with a single dimension, as LayerScale gammas and positional offsets are).
    """
    ids = norm_param_ids(model)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias" or p.ndim <= 1:
            ids.add(id(p))
    return ids


def _group_params(group: Any, index: int) -> list[nn.Parameter]:
    if isinstance(group, nn.Parameter):
        return [group]
    if isinstance(group, nn.Module):
        return list(group.parameters())
    if isinstance(group, Iterable) and not isinstance(group, (str, bytes)):
        params = []
        for item in group:
            if isinstance(item, nn.Module):
                params.extend(item.parameters())
            elif isinstance(item, nn.Parameter):
                params.append(item)
            else:
                raise TypeError(
                    f"layer group {index} holds a {type(item).__name__}; a group must be an "
                    "nn.Module or an iterable of nn.Parameter/nn.Module."
                )
        return params
    raise TypeError(
        f"layer group {index} is a {type(group).__name__}; a splitter must return nn.Modules or "
        "lists of nn.Parameter (or a dict of them keyed by name)."
    )


def _default_name(index: int, group: Any) -> str:
    if isinstance(group, nn.Module):
        return f"{index}.{type(group).__name__.lower()}"
    return f"{index}.group"


def layer_groups(model: nn.Module, raw: Sequence[Group] | Mapping[str, Group]) -> list[LayerGroup]:
    """Name a splitter's result and check that it covers the model's parameters exactly once.

    Args:
        model: The model that was split.
        raw: What a splitter returned: groups in forward order, as a sequence or as a
            ``{name: group}`` mapping.

    Returns:
        The layer groups, stem first, head last. Sequence groups are named ``"{i}.{class}"``;
        mapping groups ``"{i}.{key}"``.

    Raises:
        ValueError: A trainable parameter is in no group or in several; a group is empty.
        TypeError: ``raw`` is not a sequence or mapping of groups.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [g.name for g in layer_groups(model, {"body": model[0], "head": model[2]})]
        ['0.body', '1.head']
    """
    if isinstance(raw, Mapping):
        items = [(f"{i}.{key}", group) for i, (key, group) in enumerate(raw.items())]
    else:
        if isinstance(raw, (nn.Module, str, bytes)) or not isinstance(raw, Iterable):
            raise TypeError(
                f"the splitter returned a {type(raw).__name__}; it must return a list of groups "
                "(nn.Module or list of nn.Parameter) or a dict {name: group}."
            )
        items = [(_default_name(i, group), group) for i, group in enumerate(raw)]
    if not items:
        raise ValueError("the splitter returned no groups; return at least one group.")

    groups = []
    owner: dict[int, str] = {}
    for i, (name, group) in enumerate(items):
        params = _group_params(group, i)
        unique = list({id(p): p for p in params}.values())
        for p in unique:
            if id(p) in owner:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} ({_param_name(model, p)}) is in "
                    f"layer groups {owner[id(p)]!r} and {name!r}; each parameter must be in "
                    "exactly one group."
                )
            owner[id(p)] = name
        if not unique:
            raise ValueError(f"layer group {name!r} has no parameters; drop it from the splitter.")
        groups.append(LayerGroup(name, tuple(unique)))

    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(
            f"{len(missing)} trainable parameter(s) are in no layer group: {shown}. "
            "Add them to a group in the splitter (the head usually), or set requires_grad=False."
        )
    model_ids = {id(q) for q in model.parameters()}
    foreign = [p for p in owner if p not in model_ids]
    if foreign:
        raise ValueError(
            f"the splitter returned {len(foreign)} parameter(s) that do not belong to the model; "
            "split the model that is trained."
        )
    return groups


def _param_name(model: nn.Module, param: nn.Parameter) -> str:
    return next((n for n, p in model.named_parameters() if p is param), "unnamed")


def group_fingerprint(model: nn.Module, groups: Sequence[LayerGroup]) -> list[dict[str, Any]]:
    """Each layer group's name, parameter names and shapes, in order: two Learners with the same
    fingerprint put the same parameters in the same groups (what a resume must check before it
    loads optimizer state group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        {
            "name": group.name,
            "params": [names.get(id(p), "?") for p in group.params],
            "shapes": [list(p.shape) for p in group.params],
        }
        for group in groups
    ]


def warn_single_group(groups: Sequence[LayerGroup], action: str) -> None:
    """Warn that ``action`` is of little use on a model with a single layer group."""
    if len(groups) == 1:
        warnings.warn(
            f"{action} on a model with a single layer group does nothing useful; pass a "
            "splitter (or define model_splits()) to cut the model into groups.",
            stacklevel=user_stacklevel(),
        )
