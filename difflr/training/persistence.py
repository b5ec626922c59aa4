"""Saving, loading and exporting a Learner: the files its weights and optimizer state go to.

`Persistence` gives the `difflr.learner.Learner` its ``save``, ``load`` and ``export``; the files
themselves are `difflr.utils.files`'s (atomic writes, loads that run no code) and, for a sharded
model, `difflr.training.sharding`'s (gathered from and scattered to every rank).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from typing_extensions import Self

from difflr.groups.adapters import has_adapters, merged_copy, saved_part
from difflr.groups.layers import LayerGroup, group_fingerprint
from difflr.training.sharding import check_unsharded, is_sharded, load_sharded, save_sharded
from difflr.utils.files import export_model, load_state, state_file, write_state

__all__ = ["Persistence"]


class Persistence:
    """The Learner's ``save``, ``load`` and ``export`` (the Learner sits above this module).

    A mixin: it holds no state of its own and reads the Learner's ``model``, ``splits``, ``opt``,
    ``path`` and frozen pattern; ``load`` enters the loaded pattern through the Learner's
    ``_enter_stage`` (with the optimizer state just loaded).
    """

    model: nn.Module
    splits: list[LayerGroup]
    opt: torch.optim.Optimizer
    path: Path
    _frozen: list[bool]

    def save(self, name: str | Path, with_opt: bool = True) -> Path:
        """Save the weights, the freeze pattern and the optimizer state to
        ``path/models/{name}.pth`` (or a ``pathlib.Path``), atomically (`difflr.utils.files`).
        Of a ``peft`` adapter model only the adapters (and ``modules_to_save``) are written, not
        the frozen base weights.

        Under ``ModelParallelStrategy`` the state is gathered from every rank (call it on every
        rank) and rank 0 writes the file an unsharded Learner writes.

        Raises:
            ValueError: ``name`` would leave ``path/models`` (a separator, ``..``).
            OSError: The write failed; the previous file is unchanged.
        """
        file = state_file(self.path / "models", name)
        groups = group_fingerprint(self.model, self.splits)
        opt = self.opt if with_opt else None
        if is_sharded(self.model):  # gathered from every rank: call it on every rank
            return save_sharded(file, self.model, self._frozen, opt, groups)
        # An adapter model's file holds its adapters only (what trains), as peft saves them.
        return write_state(file, saved_part(self.model, self.splits), self._frozen, opt, groups)

    def load(self, name: str | Path, with_opt: bool = True, strict: bool = True) -> Self:
        """Load what `save` wrote (a name under ``path/models``, or a ``pathlib.Path``): read
        without running code, and checked against the model and its layer groups before
        anything is loaded, all or nothing (`difflr.utils.files.load_state`).

        Raises:
            FileNotFoundError: No such file.
            ValueError: The file is not a plain, complete state, or does not fit.
        """
        file = state_file(self.path / "models", name)
        groups = group_fingerprint(self.model, self.splits)
        opt = self.opt if with_opt else None
        if is_sharded(self.model):
            frozen = load_sharded(file, self.model, opt, groups, strict)
        else:
            frozen = load_state(file, saved_part(self.model, self.splits), opt, groups, strict)
        if frozen is not None and len(frozen) == len(self.splits):
            self._enter_stage(frozen, previous=frozen)  # with the optimizer state just loaded
        return self

    def export(self, fname: str | Path = "export.pt", merge_adapters: bool | None = None) -> Path:
        """Write the model (architecture and weights, in eval mode) for inference to
        ``path/fname`` (a plain file name; a ``pathlib.Path`` to write elsewhere); read it back
        with ``torch.load(file, weights_only=False)`` — a pickle, so only from a source you trust.

        Args:
            fname: File name under ``path``.
            merge_adapters: Write a ``peft`` adapter model with its adapters merged into the base
                weights and without ``peft``'s wrappers (``merge_and_unload``, on a copy: the
                Learner's model keeps its adapters); ``None``: merge when the model has
                adapters; ``False``: write it as it is (loading it then needs ``peft``).

        Raises:
            ValueError: ``fname`` would leave ``path`` (a separator, ``..``), as in `save`; the
                model is sharded (save() the full state and load it into an unsharded model);
                ``merge_adapters=True`` for a model without adapters.
        """
        check_unsharded(
            self.model, "export()", "save() the full state and load it into an unsharded model"
        )
        merge = has_adapters(self.model) if merge_adapters is None else merge_adapters
        model = merged_copy(self.model) if merge else self.model
        return export_model(model, state_file(self.path, fname, suffix=""))
