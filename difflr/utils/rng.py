"""The random number generators a run draws from, captured and put back: one format for the
in-memory ``lr_find`` snapshot and for the checkpoints a fit writes.

`RngState` holds the torch (CPU and CUDA), numpy and python states, plus the states of the
``torch.Generator`` objects a run's data loaders carry (``DataLoader(generator=...)``, a sampler's
own generator). `RngState.to_record` turns it into tensors and plain values for a checkpoint read
with ``weights_only=True``; `RngState.from_record` reads one back and refuses a malformed record
before any generator is touched.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["RngState", "loader_generators"]


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects a data loader draws from: its own
    (``DataLoader(generator=...)``), its sampler's and its batch sampler's sampler's."""
    found: list[torch.Generator] = []
    candidates = [
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(
            getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None
        ),
    ]
    for generator in candidates:
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


@dataclass
class RngState:
    """The states of the torch, CUDA, numpy and python generators, and of ``loaders``'
    generators (see `loader_generators`), in the order given to `capture`."""

    torch_state: torch.Tensor
    cuda: list[torch.Tensor]
    numpy: tuple[Any, ...]
    python: tuple[Any, ...]
    loaders: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def capture(cls, generators: Iterable[torch.Generator] = ()) -> RngState:
        return cls(
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            np.random.get_state(),
            random.getstate(),
            [g.get_state() for g in generators],
        )

    def restore(self, generators: Sequence[torch.Generator] = ()) -> None:
        """Put the global states back, and those of ``generators`` (see `restore_loaders`)."""
        torch.set_rng_state(self.torch_state)
        if self.cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)
        self.restore_loaders(generators)

    def restore_loaders(self, generators: Sequence[torch.Generator]) -> None:
        """Put back the loaders' generator states, in capture order (a different number of
        generators than captured, e.g. another loader, leaves them as they are)."""
        if len(generators) == len(self.loaders):
            for generator, state in zip(generators, self.loaders):
                generator.set_state(state)

    def to_record(self) -> dict[str, Any]:
        """Tensors and plain values (numpy's key array as an int64 tensor)."""
        kind, keys, position, has_gauss, gauss = self.numpy
        version, internal, gauss_next = self.python
        return {
            "torch": self.torch_state,
            "cuda": list(self.cuda),
            "numpy": [
                kind,
                torch.from_numpy(np.asarray(keys).astype(np.int64)),
                int(position),
                int(has_gauss),
                float(gauss),
            ],
            "python": [version, list(internal), gauss_next],
            "loaders": list(self.loaders),
        }

    @classmethod
    def from_record(cls, record: Any, where: str = "the checkpoint") -> RngState:
        """Read what `to_record` wrote, checking every field before any generator is touched.

        Raises:
            ValueError: The record is malformed (an edited or foreign file); names the field.
        """

        def bad(what: str) -> ValueError:
            return ValueError(
                f"{where}'s RNG record is malformed ({what}); the file was edited or written by "
                "something else. Start the fit anew, or resume from an earlier checkpoint."
            )

        if not isinstance(record, Mapping) or set(record) - {"loaders"} != {
            "torch",
            "cuda",
            "numpy",
            "python",
        }:
            raise bad("expected the keys torch, cuda, numpy, python")
        torch_state = record["torch"]
        reference = torch.get_rng_state()
        if not (
            isinstance(torch_state, torch.Tensor)
            and torch_state.dtype == torch.uint8
            and torch_state.shape == reference.shape
        ):
            raise bad(f"torch: a uint8 tensor of shape {tuple(reference.shape)} expected")
        cuda = record["cuda"]
        if not isinstance(cuda, Sequence) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda
        ):
            raise bad("cuda: a list of uint8 tensors expected")
        numpy_state = record["numpy"]
        if not (isinstance(numpy_state, Sequence) and len(numpy_state) == 5):
            raise bad("numpy: [kind, keys, position, has_gauss, gauss] expected")
        kind, keys, position, has_gauss, gauss = numpy_state
        if not (
            kind == "MT19937"
            and isinstance(keys, torch.Tensor)
            and keys.shape == (624,)
            and not keys.is_floating_point()
            and bool(((keys >= 0) & (keys < 2**32)).all())
            and isinstance(position, int)
            and 0 <= position <= 624
            and has_gauss in (0, 1)
            and isinstance(gauss, float)
        ):
            raise bad("numpy: an MT19937 state with 624 keys and a position in [0, 624] expected")
        python_state = record["python"]
        if not (isinstance(python_state, Sequence) and len(python_state) == 3):
            raise bad("python: [version, internal state, gauss_next] expected")
        version, internal, gauss_next = python_state
        if not (
            version == random.getstate()[0]
            and isinstance(internal, Sequence)
            and len(internal) == 625
            and all(isinstance(v, int) and 0 <= v < 2**32 for v in internal[:624])
            and isinstance(internal[624], int)
            and 0 <= internal[624] <= 624
            and (gauss_next is None or isinstance(gauss_next, float))
        ):
            raise bad("python: a Mersenne Twister state of 625 ints expected")
        loaders = record.get("loaders", [])
        if not isinstance(loaders, Sequence) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1 for t in loaders
        ):
            raise bad("loaders: a list of uint8 generator states expected")
        return cls(
            torch_state,
            list(cuda),
            (kind, keys.numpy().astype(np.uint32), position, int(has_gauss), gauss),
            (version, tuple(internal), gauss_next),
            list(loaders),
        )
