"""The Learner's optimizer: one for its lifetime, with a named param group per layer group, run
by the fastest implementation torch has for where its parameters are.

torch's optimizers have up to three implementations of the same update: the single-tensor loop
(a few small kernels per parameter), ``foreach`` (each operation over all the parameters at once)
and ``fused`` (the whole update in one kernel per device and dtype). torch picks the
single-tensor loop on CPU and ``foreach`` on GPUs unless told; on ResNet-18's parameters on CPU
the fused AdamW step is several times faster than the loop. `fastest` makes an optimizer factory
that uses the fastest implementation that runs for the parameters' device and dtype, and keeps
that choice right when the model moves (Lightning moves it to the accelerator at fit time, after
the Learner built its optimizer on the CPU).

Which implementation runs where is asked of torch itself, not written down here: the first time
a (device, dtype) meets an optimizer class, two steps on a four-element tensor there tell whether
torch runs ``fused`` (then ``foreach``) for it, and the answer is cached for the process.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

from difflr.optim.param_groups import GROUP_INDEX_KEY, LR_SCALE_KEY
from difflr.policy.lr import LRSpec, expand_lrs
from difflr.utils.checks import user_stacklevel

__all__ = [
    "IMPLEMENTATIONS",
    "Fastest",
    "describe_optimizer",
    "fastest",
    "implementation",
    "keep_implementation",
    "make_optimizer",
]

OptFunc = Callable[..., torch.optim.Optimizer]

#: torch's implementations of an optimizer step, fastest first.
IMPLEMENTATIONS = ("fused", "foreach", "single-tensor")

# The param-group flags that select each implementation (a class sets only those it knows).
_FLAGS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True, "foreach": False},
    "foreach": {"fused": False, "foreach": True},
    "single-tensor": {"fused": False, "foreach": False},
}

# Where parameters live, as far as the choice of implementation goes: device, dtype, and whether
# the gradient is sparse (torch's fused kernels refuse sparse gradients).
Placement = tuple[torch.device, torch.dtype, bool]


# ------------------------------------------------------------------------------------------------
# The public factory
# ------------------------------------------------------------------------------------------------


class Fastest:
    """An optimizer factory: ``opt_class`` with the fastest implementation torch runs for the
    parameters' device and dtype — ``fused``, else ``foreach``, else the single-tensor loop.

    Call it as you would call ``opt_class`` (``Fastest(...)(params, lr=...)``), pass it as a
    Learner's ``opt_func``, or return what it builds from your own ``configure_optimizers``. The
    optimizer it builds is a plain ``opt_class`` instance (same state dict, same
    ``LearningRateMonitor`` tags) that keeps its implementation right for where the parameters
    are:

    - before each step it looks at the parameters' devices and dtypes (and whether a gradient
      is sparse); when they changed — the model moved to a GPU, was cast to another dtype — it
      chooses again, and warns when it must fall back from ``fused``;
    - loading a state dict keeps the implementation (torch's ``load_state_dict`` alone would take
      the saved optimizer's ``fused``/``foreach`` flags), and the state round-trips between
      implementations;
    - under mixed precision it lets Lightning and ``GradScaler`` unscale the gradients outside
      the step (the generic protocol), so gradient clipping still works; a fused optimizer built
      directly is refused by Lightning with ``gradient_clip_val``.

    Args:
        opt_class: A torch optimizer class that has ``foreach`` or ``fused`` implementations
            (``AdamW``, ``Adam``, ``SGD``, ``Adagrad`` have both; ``RAdam``, ``NAdam``,
            ``Adamax``, ``RMSprop``, ``Rprop``, ``ASGD``, ``Adadelta`` have ``foreach``).
        **defaults: Hyper-parameters for every optimizer it builds (``momentum=0.9``); keyword
            arguments of the call win over them.

    Raises:
        TypeError: ``opt_class`` is not an optimizer class, has no implementation to choose
            from, or ``fused``/``foreach`` is given (the factory chooses them).

    Examples:
        >>> import torch
        >>> from difflr.optim.implementation import fastest, implementation
        >>> opt = fastest(torch.optim.SGD, momentum=0.9)([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
        >>> type(opt).__name__, implementation(opt)
        ('SGD', 'fused')
    """

    def __init__(self, opt_class: type[torch.optim.Optimizer], **defaults: Any) -> None:
        if not (isinstance(opt_class, type) and issubclass(opt_class, torch.optim.Optimizer)):
            raise TypeError(
                f"fastest() takes a torch optimizer class such as torch.optim.AdamW, got "
                f"{opt_class!r}."
            )
        self.implementations = _implementations_of(opt_class)
        if len(self.implementations) == 1:
            raise TypeError(
                f"{opt_class.__name__} has no foreach or fused implementation to choose from; "
                f"pass {opt_class.__name__} itself as opt_func."
            )
        _refuse_flags(defaults, opt_class)
        self.opt_class = opt_class
        self.defaults = dict(defaults)

    def __call__(self, params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
        """Build the optimizer, its implementation chosen for where ``params`` are now.

        Raises:
            TypeError: ``fused`` or ``foreach`` is given.
        """
        _refuse_flags(kwargs, self.opt_class)
        # Built with torch's default flags and switched after: torch's constructor would mark a
        # fused optimizer as one that unscales its gradients inside the step (the private
        # ``_step_supports_amp_scaling``), and Lightning then refuses gradient clipping under
        # mixed precision. Unmarked, a GradScaler unscales before the step and skips it on
        # infs itself, right for every implementation (one host sync per step more than the
        # in-kernel path).
        optimizer = self.opt_class(params, **{**self.defaults, **kwargs})
        keeper = _KeepFastest(self.opt_class, self.implementations, optimizer)
        optimizer.register_step_pre_hook(keeper)
        optimizer.register_load_state_dict_pre_hook(keeper.before_load)
        optimizer.register_load_state_dict_post_hook(keeper.after_load)
        _MANAGED[optimizer] = keeper
        keeper.refresh(optimizer)
        return optimizer

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.defaults.items())
        return f"fastest({self.opt_class.__name__}{args})"


def fastest(opt_class: type[torch.optim.Optimizer], **defaults: Any) -> Fastest:
    """``opt_class`` with the fastest implementation torch runs for where the parameters are.

    ``Learner(..., opt_func=None)`` (the default) is ``fastest(torch.optim.AdamW)``. See `Fastest`.

    Examples:
        >>> import torch
        >>> fastest(torch.optim.SGD, momentum=0.9)
        fastest(SGD, momentum=0.9)
    """
    return Fastest(opt_class, **defaults)


def _accepted(opt_class: type[torch.optim.Optimizer]) -> set[str]:
    """The keyword arguments of ``opt_class``'s constructor."""
    try:
        return set(inspect.signature(opt_class).parameters)
    except (TypeError, ValueError):  # no introspectable signature: assume none
        return set()


def _implementations_of(opt_class: type[torch.optim.Optimizer]) -> tuple[str, ...]:
    """The implementations ``opt_class``'s constructor can select, fastest first (the
    ``fused`` and ``foreach`` flags are named after them)."""
    accepted = _accepted(opt_class)
    return tuple(impl for impl in IMPLEMENTATIONS if impl == "single-tensor" or impl in accepted)


def _refuse_flags(kwargs: dict[str, Any], opt_class: type) -> None:
    given = sorted({"fused", "foreach"} & kwargs.keys())
    if given:
        raise TypeError(
            f"fastest({opt_class.__name__}) chooses the implementation itself, got "
            f"{', '.join(f'{k}={kwargs[k]!r}' for k in given)}; to fix one, pass "
            f"functools.partial({opt_class.__name__}, {given[0]}=...) as opt_func instead."
        )


# ------------------------------------------------------------------------------------------------
# Keeping the choice right for where the parameters are
# ------------------------------------------------------------------------------------------------

# Optimizers built by a `Fastest`, with what keeps their implementation (weak: no leak).
_MANAGED: weakref.WeakKeyDictionary[torch.optim.Optimizer, _KeepFastest] = (
    weakref.WeakKeyDictionary()
)


class _KeepFastest:
    """Keeps an optimizer on the fastest implementation that runs where its parameters are.

    It is the optimizer's step pre-hook: before each step it compares the parameters' placement
    (devices, dtypes, sparse gradients) with the one it chose for, and chooses again when it
    changed. When the step evaluates a closure (as Lightning's does), the gradients it will use
    exist only after the closure; the check then runs right after the closure, still before the
    update (torch's optimizers read ``fused``/``foreach`` after evaluating the closure).
    """

    def __init__(
        self,
        opt_class: type[torch.optim.Optimizer],
        implementations: tuple[str, ...],
        optimizer: torch.optim.Optimizer,
    ) -> None:
        self.name = opt_class.__name__
        self.implementations = implementations
        accepted = _accepted(opt_class) - {"fused", "foreach"}
        # The hyper-parameters that can decide whether an implementation runs (differentiable,
        # capturable, a tensor lr, ...); the flags are the probe's to set.
        self.probe_kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        self.opt_class = opt_class
        self.placement: frozenset[Placement] | None = None
        self._warned: set[str] = set()

    def __call__(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        # ``args`` is ``(optimizer, closure?)``, as torch's step wrapper passes them.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.refresh(optimizer)
            return None

        def closure_then_check() -> Any:
            loss = closure()
            self.refresh(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_check}
        return (args[0], closure_then_check, *args[2:]), kwargs

    def refresh(self, optimizer: torch.optim.Optimizer) -> None:
        """Choose again if the parameters' placement changed since the last choice."""
        placement = _placement(optimizer)
        if placement == self.placement:
            return
        choice, refused = self._choose(placement)
        _set_implementation(optimizer, choice)
        _conform_state(optimizer)
        self.placement = placement
        if refused and choice not in self._warned:
            self._warned.add(choice)
            warnings.warn(
                f"{self.name}: torch's {refused[0]} implementation does not run on "
                f"{refused[1]}; using {choice}, the fastest that does (the same updates, a "
                "slower step).",
                stacklevel=user_stacklevel(),
            )

    def _choose(self, placement: frozenset[Placement]) -> tuple[str, tuple[str, str] | None]:
        """The fastest implementation that runs for every placement, and, if a faster one was
        refused, which one and where."""
        refused = None
        for impl in self.implementations:
            failing = [
                p
                for p in sorted(placement, key=str)
                if impl != "single-tensor" and not _runs(self.opt_class, impl, p, self.probe_kwargs)
            ]
            if not failing:
                return impl, refused
            if refused is None:
                refused = (impl, ", ".join(_describe_placement(p) for p in failing))
        return "single-tensor", refused

    def before_load(
        self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
    ) -> dict[str, Any]:
        return _with_own_flags(optimizer, state_dict)

    def after_load(self, optimizer: torch.optim.Optimizer) -> None:
        # The loaded state was placed for the flags in force; check again at the next step.
        self.placement = None


def _placement(optimizer: torch.optim.Optimizer) -> frozenset[Placement]:
    return frozenset(
        (p.device, p.dtype, p.grad is not None and p.grad.is_sparse)
        for group in optimizer.param_groups
        for p in group["params"]
    )


def _describe_placement(placement: Placement) -> str:
    device, dtype, sparse = placement
    kind = "sparse gradients of " if sparse else ""
    return f"{kind}{str(dtype).removeprefix('torch.')} parameters on {device}"


# (class, implementation, device type, dtype, sparse, hyper-parameters) -> runs
_RUNS: dict[tuple[Any, ...], bool] = {}


def _runs(
    opt_class: type[torch.optim.Optimizer],
    impl: str,
    placement: Placement,
    kwargs: dict[str, Any],
) -> bool:
    """Whether torch runs ``opt_class`` with ``impl`` for parameters of this placement: two
    steps on a four-element parameter there, with the optimizer's hyper-parameters."""
    device, dtype, sparse = placement
    key = (opt_class, impl, device.type, dtype, sparse, _hashable(kwargs))
    if key not in _RUNS:
        accepted = _accepted(opt_class)
        flags = {k: v for k, v in _FLAGS[impl].items() if k in accepted}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                param = torch.zeros(4, device=device, dtype=dtype, requires_grad=True)
                grad = torch.ones_like(param)
                param.grad = grad.to_sparse() if sparse else grad
                probe = opt_class([param], **kwargs, **flags)
                probe.step()
                probe.step()
                ok = device.type == "meta" or bool(torch.isfinite(param.detach()).all())
        except Exception:  # torch refuses it: any error means "not here"
            ok = False
        _RUNS[key] = ok
    return _RUNS[key]


def _hashable(kwargs: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    def summary(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"Tensor[{value.device.type}, {value.dtype}]"
        return repr(value)

    return tuple(sorted((k, summary(v)) for k, v in kwargs.items()))


def _set_implementation(optimizer: torch.optim.Optimizer, impl: str) -> None:
    # The defaults too, so that a group added later (Lightning's BaseFinetuning adds some) gets
    # the same implementation from the start.
    for group in (*optimizer.param_groups, optimizer.defaults):
        for key, value in _FLAGS[impl].items():
            if key in group:
                group[key] = value


def _conform_state(optimizer: torch.optim.Optimizer) -> None:
    """Put each parameter's state where torch's ``load_state_dict`` would put it for the flags
    in force: moments on the parameter's device and in its dtype, the ``step`` counter a float32
    tensor on the parameter's device for ``fused`` (and ``capturable``), else left as torch made it
    (on the CPU, where the non-fused step reads it without a sync).

    Neither a change of implementation nor a model moved or cast does this by itself: Lightning
    moves the moments to the accelerator but leaves ``step`` where it is, and a cast model keeps
    moments of the old dtype.
    """
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            for key, value in (state or {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key != "step":
                    dtype = p.dtype if p.is_floating_point() else value.dtype
                    if value.device != p.device or value.dtype != dtype:
                        state[key] = value.to(device=p.device, dtype=dtype)
                elif on_device:
                    if value.device != p.device or value.dtype != torch.float32:
                        state[key] = value.to(device=p.device, dtype=torch.float32)
                elif value.device.type != "cpu":
                    state[key] = value.to("cpu")


def _with_own_flags(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each param group's ``fused``/``foreach`` flags replaced by the
    optimizer's own (torch's ``load_state_dict`` would take the saved ones)."""
    saved = state_dict.get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(optimizer.param_groups):
        return state_dict  # torch reports the mismatch itself
    groups = [
        {**old, **{k: new[k] for k in ("fused", "foreach") if k in new}}
        for old, new in zip(saved, optimizer.param_groups)
    ]
    return {**state_dict, "param_groups": groups}


def keep_implementation(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.load_state_dict`` keep the optimizer's ``fused``/``foreach`` flags.

    torch's ``load_state_dict`` copies the saved param groups whole, implementation flags
    included: a state saved by a fused optimizer turns a foreach one fused, and one saved by a
    foreach optimizer leaves a fused one half-switched (its GradScaler protocol still fused).
    The state itself (moments, step counts) is the same for every implementation and is kept.
    Optimizers built by `fastest` do this already; the Learner applies it to the optimizer of an
    explicit ``opt_func`` too, so ``learn.load`` and checkpoint resumes never change it.
    Returns ``optimizer``.
    """
    if optimizer not in _MANAGED:
        optimizer.register_load_state_dict_pre_hook(_with_own_flags)
    return optimizer


# ------------------------------------------------------------------------------------------------
# Which implementation an optimizer runs
# ------------------------------------------------------------------------------------------------


def implementation(optimizer: torch.optim.Optimizer) -> str | None:
    """Which of torch's implementations ``optimizer.step()`` runs now: ``"fused"``,
    ``"foreach"`` or ``"single-tensor"``; ``"mixed"`` if its param groups differ; ``None`` for an
    optimizer without that choice (``LBFGS``, most third-party ones).

    With neither flag set, torch decides at each step (``foreach`` when every parameter is on a
    GPU-like device, else the single-tensor loop), and so does this. For an optimizer built by
    `fastest` it is the choice for where the parameters are now.

    Examples:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> implementation(torch.optim.AdamW([p])), implementation(torch.optim.AdamW([p], fused=True))
        ('single-tensor', 'fused')
    """
    keeper = _MANAGED.get(optimizer)
    if keeper is not None:
        keeper.refresh(optimizer)
    found = set()
    for group in optimizer.param_groups:
        if "fused" not in group and "foreach" not in group:
            return None
        if group.get("fused"):
            found.add("fused")
        elif group.get("foreach") or (
            group.get("foreach") is None and _torch_defaults_to_foreach(group)
        ):
            found.add("foreach")
        else:
            found.add("single-tensor")
    return found.pop() if len(found) == 1 else ("mixed" if found else None)


def _torch_defaults_to_foreach(group: dict[str, Any]) -> bool:
    """torch's own choice for a group with ``foreach=None`` and ``fused=None``.

    Asks torch's private ``_default_to_fused_or_foreach`` (the function its optimizers call);
    should it go, fall back to its rule as of torch 2.14: foreach on GPU-like devices only.
    """
    params = [p for p in group["params"] if isinstance(p, torch.Tensor)]
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:  # pragma: no cover - a future torch
        return bool(params) and all(p.device.type not in ("cpu", "meta", "mps") for p in params)
    return _default_to_fused_or_foreach(params, bool(group.get("differentiable")), False)[1]


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class and implementation, e.g. ``"AdamW (fused)"``; just the class for an
    optimizer without that choice."""
    impl = implementation(optimizer)
    return type(optimizer).__name__ + ("" if impl is None else f" ({impl})")


# ------------------------------------------------------------------------------------------------
# The Learner's optimizer
# ------------------------------------------------------------------------------------------------


def make_optimizer(
    opt_func: OptFunc | None, param_groups: list[dict[str, Any]], lr: LRSpec, n_groups: int
) -> torch.optim.Optimizer:
    """Call ``opt_func(param_groups, lr=...)`` with each param group at its layer group's LR.

    Args:
        opt_func: An optimizer class or factory, e.g. ``torch.optim.AdamW``,
            ``functools.partial(torch.optim.SGD, momentum=0.9)`` or
            ``fastest(torch.optim.SGD, momentum=0.9)``; used exactly as given. ``None`` is
            ``fastest(torch.optim.AdamW)``.
        param_groups: From `difflr.optim.param_groups.build_param_groups` (each carries its layer group's
            index).
        lr: The LR spec over the ``n_groups`` layer groups.
        n_groups: Number of layer groups.

    Returns:
        The optimizer, made to keep its implementation when it loads a state (see
        `keep_implementation`).

    Raises:
        TypeError: ``opt_func`` is not a factory, cannot be called that way, or returns
            something that is not a ``torch.optim.Optimizer``.
        ValueError: ``lr`` does not fit ``n_groups``.
    """
    if opt_func is None:
        opt_func = fastest(torch.optim.AdamW)
    if not callable(opt_func) or isinstance(opt_func, torch.optim.Optimizer):
        raise TypeError(
            f"opt_func must be an optimizer factory such as torch.optim.AdamW or "
            f"functools.partial(torch.optim.SGD, momentum=0.9), got {opt_func!r}."
        )
    lrs = expand_lrs(lr, n_groups, name="lr")
    for pg in param_groups:
        pg["lr"] = lrs[pg[GROUP_INDEX_KEY]] * pg.get(LR_SCALE_KEY, 1.0)
    try:
        opt = opt_func(param_groups, lr=lrs[-1])
    except TypeError as exc:
        raise TypeError(
            f"opt_func {opt_func!r} could not be called as opt_func(param_groups, lr=...): "
            f"{exc}. Pass a torch optimizer class or a functools.partial of one."
        ) from exc
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"opt_func returned a {type(opt).__name__}, not a torch.optim.Optimizer; pass an "
            "optimizer class such as torch.optim.AdamW."
        )
    return keep_implementation(opt)
