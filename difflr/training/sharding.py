"""Sharded fine-tuning: FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``.

A Learner keeps one model and one optimizer for its life and builds a fresh ``Trainer`` per call.
Under ``ModelParallelStrategy`` the first Trainer's ``configure_model`` shards the model in place
(FSDP2 swaps every parameter for a ``DTensor`` shard) and the model stays sharded between calls;
the later Trainers find it sharded and leave it. What difflr adds lives here:

- `fresh_strategy`: a strategy *instance* given to the Learner is copied for each Trainer (a
  Trainer attaches its accelerator, precision and cluster environment to the instance it gets,
  and the next Trainer would refuse it: "accelerator set through both strategy class and
  accelerator flag").
- `check_strategy`: refuse, before anything runs, the strategies a Learner cannot drive (FSDP1,
  DeepSpeed, tensor parallelism), naming the reason and what to use.
- `Sharding`: the ``configure_model`` of every Trainer under ``ModelParallelStrategy``. Unless the
  user's ``LightningModule`` shards itself in its own ``configure_model``, it applies
  ``fully_shard`` to each repeated block difflr knows (`difflr.groups.blocks.BlockSplitter`'s
  trunk: Hugging Face layers, repeated blocks, torchvision stages), then to the root. Then it
  re-targets the Learner's optimizer (one param group per layer group, as always; its state,
  if any, sharded like its parameter) and layer groups onto the sharded parameters.
- `shard_like`: a full tensor cut into the shard of this rank, like a sharded parameter (what
  ``lr_find``'s restore and the re-targeting use).
- `full_state_dict`, `load_full_state_dict`: the whole model and optimizer state gathered (for
  ``save``) and scattered back (for ``load``), collectives that every rank calls.
- `atomic_folder_saves`: a distributed checkpoint (a folder of shards) is written beside its
  target and renamed over it once every rank has written.
- `equal_shards`: ``get_preds`` reads padded shards, so every rank runs as many forwards.
- `rank_zero_decides`: a resume is decided on rank 0, which wrote the checkpoint.
"""

from __future__ import annotations

import copy
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, MutableSequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from difflr.groups.blocks import BlockSplitter
from difflr.groups.layers import LayerGroup
from difflr.utils.files import TEMP_PREFIX, atomic_save, check_state_fits, read_state, state_content

__all__ = [
    "FOLDER_METADATA",
    "Sharding",
    "atomic_folder_saves",
    "check_strategy",
    "check_unsharded",
    "equal_shards",
    "fresh_strategy",
    "full_state_dict",
    "is_checkpoint_folder",
    "is_sharded",
    "is_sharding_strategy",
    "load_full_state_dict",
    "load_sharded",
    "rank_zero_decides",
    "reshard",
    "reshard_optimizer_state",
    "save_sharded",
    "shard_blocks",
    "shard_like",
]

#: Prefixes that wrappers a user's configure_model may add put into parameter names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def fresh_strategy(strategy: Any) -> Any:
    """A copy of a ``Strategy`` instance for one Trainer (anything else as it is).

    A Trainer attaches its accelerator, precision plugin, cluster environment and model to the
    strategy instance it is given; a second Trainer given the same instance refuses it
    ("accelerator set through both strategy class and accelerator flag"). The Learner builds a
    Trainer per call, so each gets a deep copy of the instance the user gave, with the same
    settings, and the user's instance is never touched.

    Raises:
        TypeError: The instance cannot be copied.
    """
    if not isinstance(strategy, Strategy):
        return strategy
    try:
        return copy.deepcopy(strategy)
    except Exception as error:
        raise TypeError(
            f"the Learner builds a fresh Trainer for each call and gives each a copy of "
            f"strategy={type(strategy).__name__}(...), but it cannot be copied ({error}); pass "
            "the strategy by name (e.g. strategy='ddp') or an instance that copy.deepcopy can copy."
        ) from error


def is_sharding_strategy(strategy: Any) -> bool:
    """Whether ``strategy`` (a Trainer argument or a Trainer's strategy) is FSDP2 through
    Lightning's ``ModelParallelStrategy``."""
    return isinstance(strategy, ModelParallelStrategy)


def check_strategy(trainer_kwargs: Mapping[str, Any]) -> None:
    """Refuse a strategy a Learner cannot drive, before anything runs.

    - FSDP1 (``strategy="fsdp"`` or ``FSDPStrategy``): it flattens the parameters when it wraps
      the model, while the Learner's optimizer (one param group per layer group) is built once,
      on the full parameters, and lives across Trainers; Lightning 2.6 also runs it on CUDA only.
      ``ModelParallelStrategy`` (FSDP2) is what difflr shards with.
    - DeepSpeed: it builds and steps its own optimizer from its config, so the Learner's
      optimizer, its per-group LRs and schedules, and ``lr_find``'s exact restore would not apply.
    - ``ModelParallelStrategy`` with a tensor-parallel size other than 1 (``"auto"`` means the
      number of devices of a node): difflr shards along the data-parallel dimension only.

    Raises:
        ValueError: One of the above, with what to pass instead.
    """
    strategy = trainer_kwargs.get("strategy")
    name = strategy.lower() if isinstance(strategy, str) else type(strategy).__name__.lower()
    if name.startswith("fsdp") or name == "fsdpstrategy":
        on_cpu = str(trainer_kwargs.get("accelerator", "")).lower() == "cpu"
        raise ValueError(
            f"strategy={strategy!r} is FSDP1, which a Learner cannot drive: it flattens the "
            "parameters when it wraps the model, while the Learner's optimizer (one param group "
            "per layer group) lives across fits"
            + (", and Lightning runs FSDPStrategy on CUDA only" if on_cpu else "")
            + ". Pass strategy=ModelParallelStrategy(data_parallel_size=<processes>, "
            "tensor_parallel_size=1) (FSDP2, on CPU too): difflr shards the model's blocks itself."
        )
    if "deepspeed" in name:
        raise ValueError(
            f"strategy={strategy!r}: DeepSpeed builds and steps its own optimizer from its "
            "config, so the Learner's optimizer (one param group per layer group), its "
            "discriminative LRs and schedules and lr_find's exact restore would not apply. Use "
            "ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1) to "
            "shard the model, or strategy='ddp'."
        )
    if is_sharding_strategy(strategy):
        tp = strategy._tensor_parallel_size  # no public getter before setup
        if tp != 1:
            raise ValueError(
                f"ModelParallelStrategy(tensor_parallel_size={tp!r}): difflr shards along the "
                "data-parallel dimension only (FSDP2; 'auto' means every device of a node in "
                "the tensor-parallel dimension). Pass ModelParallelStrategy("
                "data_parallel_size=<processes>, tensor_parallel_size=1)."
            )


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` shard (FSDP2 applied)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def check_unsharded(model: nn.Module, what: str, instead: str) -> None:
    """Refuse ``what`` on a sharded model.

    Raises:
        ValueError: ``model`` is sharded; the message says what to do ``instead``.
    """
    if is_sharded(model):
        raise ValueError(
            f"{what} is not supported on a sharded model (ModelParallelStrategy): each process "
            f"holds only a shard of every parameter, and running the model is a collective of "
            f"every process; {instead}."
        )


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` as a ``DTensor`` placed like ``like`` (this rank's shard, no communication);
    ``full`` itself when ``like`` is not a ``DTensor`` or ``full`` already is one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or isinstance(full, DTensor):
        return full
    local = full.to(device=like.device)
    return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)


def _plain_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def shard_blocks(model: nn.Module, mesh: Any, splitter: Any = None) -> list[str]:
    """``fully_shard`` each block of ``model``'s trunk, then ``model`` itself (each child holding
    parameters, for a ``LightningModule``); returns the blocks' paths.

    The trunk is the one `difflr.groups.blocks.BlockSplitter` cuts along: ``splitter``'s own if it
    is a ``BlockSplitter``, else the Hugging Face model's layers, else the longest run of
    same-class blocks (torchvision's stages too).

    Raises:
        ValueError: No trunk can be found (the message says which splitter to pass); a
            ``LightningModule`` holds parameters outside its children.
    """
    from torch.distributed.fsdp import fully_shard

    finder = splitter if isinstance(splitter, BlockSplitter) else BlockSplitter()
    try:
        trunk = finder.find(model)
    except ValueError as error:
        raise ValueError(
            f"cannot shard {type(model).__name__}: difflr applies fully_shard to each repeated "
            f"block of the model and found none ({error}). Pass splitter=BlockSplitter("
            "trunk='path.to.blocks') (e.g. 'model.layers') to the Learner, or shard the model "
            "yourself in your LightningModule's configure_model."
        ) from None
    paths = trunk.block_paths()
    for path in paths:
        fully_shard(model.get_submodule(path), mesh=mesh)
    for root in _roots(model):
        fully_shard(root, mesh=mesh)
    return paths


def _roots(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward the training calls, to be sharded last: the model itself, or
    for a ``LightningModule`` (whose ``training_step`` calls its parts, not its own ``forward``)
    each child that holds parameters.

    Raises:
        ValueError: A ``LightningModule`` with parameters of its own (outside any child).
    """
    if not isinstance(model, pl.LightningModule):
        return [model]
    own = [name for name, _ in model.named_parameters(recurse=False)]
    if own:
        raise ValueError(
            f"cannot shard {type(model).__name__}: it holds parameters of its own ({own[:3]}), "
            "outside any child module, and its training_step need not call its forward, so "
            "difflr cannot tell when to gather them. Move them into a child module, or shard "
            "the model yourself in configure_model."
        )
    return [child for child in model.children() if next(child.parameters(), None) is not None]


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 module of ``module`` back in its sharded state.

    FSDP2 keeps the root's parameters gathered after a forward that no backward follows
    (``validate``, ``get_preds``): the module then holds full, plain parameters in place of the
    shards that the optimizer and the layer groups hold.
    """
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


class Sharding:
    """The Learner's ``configure_model`` under ``ModelParallelStrategy``; see the module docstring.

    Args:
        model: The Learner's model (the root that is sharded).
        splits: The Learner's layer groups (a list, re-targeted in place).
        splitter: The Learner's splitter (a ``BlockSplitter`` also says where the blocks are).
    """

    def __init__(
        self, model: nn.Module, splits: MutableSequence[LayerGroup], splitter: Any = None
    ) -> None:
        self.model = model
        self.splits = splits
        self.splitter = splitter
        #: Paths of the blocks difflr sharded (empty before, or when the user's module shards).
        self.blocks: list[str] = []

    @contextmanager
    def configuring(
        self, module: pl.LightningModule, optimizer: torch.optim.Optimizer, strategy: Any
    ) -> Iterator[None]:
        """For one Trainer run under ``strategy``: give ``module`` a ``configure_model`` that shards
        (or calls the module's own) and then re-targets ``optimizer`` and the layer groups.

        The hook is an instance attribute for the length of the run; the class is never touched.
        Nothing happens under any other strategy.
        """
        if not is_sharding_strategy(strategy):
            yield
            return
        own = module.__dict__.get("configure_model")
        users = is_overridden("configure_model", module)
        module.configure_model = self._hook(module, optimizer, users)
        try:
            yield
        finally:
            if own is None:
                del module.configure_model
            else:
                module.configure_model = own
            reshard(module)

    def _hook(
        self, module: pl.LightningModule, optimizer: torch.optim.Optimizer, users: bool
    ) -> Callable[[], None]:
        def configure_model() -> None:
            before = {
                id(p): _plain_name(n) for n, p in module.named_parameters(remove_duplicate=False)
            }
            if users:
                type(module).configure_model(module)
            elif not is_sharded(self.model):
                mesh = module.device_mesh["data_parallel"]
                self.blocks = shard_blocks(self.model, mesh, self.splitter)
            self._retarget(module, optimizer, before)

        return configure_model

    def _retarget(
        self,
        module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        before: Mapping[int, str],
    ) -> None:
        """Point the optimizer's param groups (and its state) and the layer groups at the
        parameters ``module`` holds now, matched by name."""
        after = {_plain_name(n): p for n, p in module.named_parameters(remove_duplicate=False)}
        moved: dict[int, nn.Parameter] = {}
        for old_id, name in before.items():
            new = after.get(name)
            if new is None:
                raise RuntimeError(
                    f"after configure_model the module has no parameter {name!r}; difflr "
                    "re-targets its optimizer by parameter name, so configure_model must keep the "
                    "names (fully_shard does; a wrapper that renames parameters does not)."
                )
            if id(new) != old_id:
                moved[old_id] = new
        if not moved:
            return
        for group in optimizer.param_groups:
            group["params"] = [moved.get(id(p), p) for p in group["params"]]
        for old in list(optimizer.state):
            if id(old) in moved:
                new = moved[id(old)]
                state = optimizer.state.pop(old)
                optimizer.state[new] = {
                    k: shard_like(v, new)
                    if isinstance(v, torch.Tensor) and v.shape == old.shape and v.ndim > 0
                    else v
                    for k, v in state.items()
                }
        for i, group in enumerate(self.splits):
            self.splits[i] = LayerGroup(
                group.name, tuple(moved.get(id(p), p) for p in group.params)
            )


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The whole model's state dict (and the optimizer's, keyed as ``optimizer.state_dict()`` keys
    it for the unsharded model) gathered to CPU on global rank 0: a collective that every rank
    calls; the other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    result = {"model": get_model_state_dict(model, options=options)}
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer, options=options)
        result["opt"] = _by_index(model, optimizer, osd)
    return result


def _by_index(
    model: nn.Module, optimizer: torch.optim.Optimizer, osd: Mapping[str, Any]
) -> dict[str, Any]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint's) keyed by position, as
    ``optimizer.state_dict()`` keys it."""
    if not osd:
        return {}  # not rank 0
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    index: dict[str, int] = {}
    k = 0
    groups = []
    for group, saved in zip(optimizer.param_groups, osd["param_groups"]):
        ids = []
        for p in group["params"]:
            index[names[id(p)]] = k
            ids.append(k)
            k += 1
        groups.append({**{key: v for key, v in saved.items() if key != "params"}, "params": ids})
    # torch hands plain tensors (the step counts) back as they are: copies, not the live state.
    state = {
        index[name]: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        for name, value in osd["state"].items()
        if name in index
    }
    return {"state": state, "param_groups": groups}


def load_full_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, state: Mapping[str, Any]
) -> None:
    """Load a full model state dict (and optimizer state keyed by position) into the sharded
    ``model`` and ``optimizer``: every rank keeps its own shard."""
    from torch.distributed.tensor import DTensor

    own = model.state_dict()
    with torch.no_grad():
        for key, value in state["model"].items():
            target = own.get(key)
            if target is None:
                continue  # strict=False: a key the model does not have
            if isinstance(target, DTensor):
                target.to_local().copy_(shard_like(value, target).to_local())
            else:
                target.copy_(value)
    if optimizer is None or "opt" not in state:
        return
    optimizer.load_state_dict(state["opt"])
    reshard_optimizer_state(optimizer)


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Cut every full-size state tensor of ``optimizer`` into its parameter's shard (after
    ``optimizer.load_state_dict`` of a state saved unsharded); nothing for unsharded params."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in optimizer.state:
                optimizer.state[p] = {
                    k: shard_like(v, p) if isinstance(v, torch.Tensor) and v.ndim > 0 else v
                    for k, v in optimizer.state[p].items()
                }


def save_sharded(
    file: Path,
    model: nn.Module,
    frozen: list[bool],
    optimizer: torch.optim.Optimizer | None,
    groups: list[dict[str, Any]] | None = None,
) -> Path:
    """`difflr.utils.files.write_state` for a sharded model: the full state is gathered (a
    collective: every rank must call it) and global rank 0 writes it, atomically; the file is
    the one an unsharded Learner writes."""
    gathered = full_state_dict(model, optimizer)
    opt_state = None if optimizer is None else gathered["opt"]
    state = state_content(gathered["model"], frozen, opt_state, groups)
    if _rank() == 0:
        atomic_save(state, file)
    _barrier()
    return file


def load_sharded(
    file: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    groups: list[dict[str, Any]] | None = None,
    strict: bool = True,
) -> list[bool] | None:
    """`difflr.utils.files.load_state` for a sharded model: every rank reads the file, checks it
    (`difflr.utils.files.check_state_fits`, before anything changes) and keeps its own shard."""
    state = read_state(file)
    check_state_fits(state, model, optimizer, file, strict, groups)
    load_full_state_dict(model, optimizer, state)
    return state.get("frozen")


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_zero_decides(decide: Callable[[], Any]) -> Any:
    """``decide()`` on global rank 0, its result (or its error) sent to every rank of the live
    process group; simply ``decide()`` without one.

    For decisions taken before a Trainer exists that read what rank 0 alone wrote (a resume reads
    the checkpoint rank 0 wrote, with the ids of rank 0's Learner and fit).

    Raises:
        Exception: Rank 0's error on rank 0; a ``RuntimeError`` with its message elsewhere.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = decide()
        except Exception as exc:
            error = exc
    box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, src=0)
    result, message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 refused, so rank {dist.get_rank()} does too: {message}")
    return result


def equal_shards(loader: Any, rank: int, world_size: int) -> Any:
    """``loader`` (a sequential ``DataLoader``) rebuilt to read this rank's shard through a padding
    ``DistributedSampler(shuffle=False)``: every rank reads the same number of batches.

    A sharded forward is a collective (each block's parameters are gathered from every rank), so
    a rank with one batch more than the others would wait for them forever. Lightning's
    prediction sampler does not pad (its shards may differ by an item, hence by a batch); the
    padded items come twice and `difflr.predictions` keeps each item once. Anything but a plain
    ``DataLoader`` with a ``batch_size`` is returned as it is.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    if type(loader) is not DataLoader or loader.batch_size is None:
        return loader
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )


#: The file of a distributed-checkpoint folder that holds everything but the shards (Lightning's).
FOLDER_METADATA = "meta.pt"


def is_checkpoint_folder(path: Path) -> bool:
    """Whether ``path`` is a distributed-checkpoint folder as ``ModelParallelStrategy`` writes it
    (``save_distributed_checkpoint=True``): the shards, and ``meta.pt`` with the rest."""
    return path.is_dir() and (path / FOLDER_METADATA).is_file()


def atomic_folder_saves(strategy: Any) -> Any:
    """Make ``strategy`` (difflr's own copy for one Trainer) write each distributed checkpoint
    folder beside its target and rename it over the target once every rank has written its
    shard; any other strategy is returned as it is.

    Until the rename the previous checkpoint stays where it was: a kill mid-write leaves it
    readable (and a folder ``.difflr-partial-...`` beside it). The swap itself is two renames:
    the previous folder becomes ``<name>.previous`` for the instant between them, then is removed.
    An instance attribute on difflr's copy; the class and the user's instance are not touched.
    """
    if not (is_sharding_strategy(strategy) and strategy._save_distributed_checkpoint):
        return strategy
    save = strategy.save_checkpoint

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None):
        target = Path(strategy.broadcast(str(filepath)))
        token = strategy.broadcast(uuid.uuid4().hex)
        temp = target.with_name(f"{TEMP_PREFIX}{target.name}-{token}")
        save(checkpoint, temp, storage_options)
        strategy.barrier()  # every rank's shard is on disk
        if strategy.global_rank == 0:
            previous = target.with_name(f"{target.name}.previous")
            _remove(previous)  # left by a kill between the two renames of an earlier save
            if target.exists():
                target.rename(previous)
            temp.rename(target)
            _remove(previous)
        strategy.barrier()

    strategy.save_checkpoint = save_checkpoint
    return strategy


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
