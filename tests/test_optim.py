"""The Learner's optimizer: the fastest implementation torch runs, trained to the same numbers as
torch's single-tensor loop, and kept right through moves, loads, resumes and lr_find."""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflr import Learner
from difflr.groups.layers import layer_groups
from difflr.optim.implementation import (
    Fastest,
    describe_optimizer,
    fastest,
    implementation,
    keep_implementation,
    make_optimizer,
)
from difflr.optim.param_groups import (
    build_param_groups,
    layer_group_index,
    momentum_key,
    set_weight_decay,
    write_hypers,
)
from tests.helpers import make_learner, three_groups
from tests.test_lr_finder import _assert_same, _state, _trained
from tests.test_resume import Crash

# The optimizers difflr's docs name, with the hyper-parameters that give them a momentum.
OPTIMIZERS = {
    "AdamW": (torch.optim.AdamW, {}),
    "Adam": (torch.optim.Adam, {}),
    "SGD": (torch.optim.SGD, {"momentum": 0.9}),
    "Adagrad": (torch.optim.Adagrad, {}),
    "RAdam": (torch.optim.RAdam, {}),
    "NAdam": (torch.optim.NAdam, {}),
    "Adamax": (torch.optim.Adamax, {}),
    "RMSprop": (torch.optim.RMSprop, {"momentum": 0.9}),
}
# What torch 2.14 runs on CPU float32 parameters, fastest first.
FASTEST_ON_CPU = {
    "AdamW": "fused",
    "Adam": "fused",
    "SGD": "fused",
    "Adagrad": "fused",
    "RAdam": "foreach",
    "NAdam": "foreach",
    "Adamax": "foreach",
    "RMSprop": "foreach",
}


def make_model() -> nn.Sequential:
    """The helpers' three-group model with the BatchNorm after the ReLU.

    With a BatchNorm right after it, a Linear's bias gets a gradient that is zero up to rounding;
    Adam divides that noise by its own size, so implementations that round differently (fused
    does) move that bias by +-lr apart, while the loss stays the same. Every parameter here has a
    real gradient, so the comparisons below are to float tolerance.
    """
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.ReLU(),
        nn.BatchNorm1d(16),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def single_tensor(cls, **kwargs):
    return functools.partial(cls, foreach=False, **kwargs)


def train_steps(opt_func, n_steps=6, model=None, start=0, stop=None):
    """Steps ``start..stop-1`` (default: all ``n_steps``) of a three-group model with difflr's param groups, weight decay
    0.1 on the decayed groups, and a new LR and momentum per group written before every step (as
    the ParamScheduler does). Returns the losses, the model and the optimizer."""
    model = model or make_model()
    groups = layer_groups(model, three_groups(model))
    opt = opt_func(build_param_groups(model, groups), lr=1e-2)
    set_weight_decay(opt, 0.1)
    index, key = layer_group_index(opt), momentum_key(opt)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    losses = []

    def compute_loss():
        opt.zero_grad()
        loss = F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
        loss.backward()
        return loss

    for step in range(start, n_steps if stop is None else stop):
        pct = step / n_steps
        lrs = np.array([1e-3, 3e-3, 1e-2]) * (1 + 4 * pct)  # every group, every step different
        write_hypers(opt, lrs, np.full(3, 0.95 - 0.1 * pct), index, key)
        losses.append(float(compute_loss().detach()))
        opt.step()
    return np.array(losses), model, opt


def assert_same_training(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(a[0], b[0], rtol=rtol, atol=atol)
    for (name, x), y in zip(a[1].state_dict().items(), b[1].state_dict().values()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=name)


def learner(tmp_path, **kwargs) -> Learner:
    return make_learner(tmp_path, make_model(), **{"checkpoint": False, **kwargs})


# ------------------------------------------------------------------------------------------------
# The choice
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fastest_picks_fused_else_foreach_as_torch_runs_them(name):
    cls, kwargs = OPTIMIZERS[name]
    opt = fastest(cls, **kwargs)([nn.Parameter(torch.zeros(3))], lr=0.1)
    assert type(opt) is cls
    assert implementation(opt) == FASTEST_ON_CPU[name]
    group = opt.param_groups[0]
    assert group["foreach"] is (FASTEST_ON_CPU[name] == "foreach")
    assert group.get("fused", False) is (FASTEST_ON_CPU[name] == "fused")


def test_the_learners_default_is_fused_adamw_and_says_so(tmp_path):
    learn = learner(tmp_path)
    assert type(learn.opt) is torch.optim.AdamW
    assert implementation(learn.opt) == "fused"
    assert "opt=AdamW (fused)" in repr(learn)
    assert learn.summary().splitlines()[-1] == "optimizer: AdamW (fused), 6 param groups"


@pytest.mark.parametrize(
    ("opt_func", "expected"),
    [
        (torch.optim.AdamW, "single-tensor"),  # torch's own default on CPU
        (functools.partial(torch.optim.AdamW, foreach=True), "foreach"),
        (functools.partial(torch.optim.SGD, fused=True), "fused"),
    ],
)
def test_an_explicit_opt_func_is_used_exactly_as_given(tmp_path, opt_func, expected):
    learn = learner(tmp_path, opt_func=opt_func)
    flags = {k: learn.opt.param_groups[0][k] for k in ("foreach", "fused")}
    given = {"foreach": None, "fused": None} | getattr(opt_func, "keywords", {})
    assert flags == given
    learn.fit(1)
    assert implementation(learn.opt) == expected
    assert describe_optimizer(learn.opt) == f"{type(learn.opt).__name__} ({expected})"


def test_implementation_follows_torchs_own_default_and_knows_optimizers_without_a_choice():
    p = nn.Parameter(torch.zeros(3))
    # torch runs its single-tensor loop on CPU when neither flag is set (foreach on GPUs).
    assert implementation(torch.optim.Adam([p])) == "single-tensor"
    assert implementation(torch.optim.LBFGS([p])) is None
    assert describe_optimizer(torch.optim.LBFGS([p])) == "LBFGS"
    mixed = torch.optim.SGD([{"params": [p], "foreach": True}, {"params": [nn.Parameter(p)]}])
    assert implementation(mixed) == "mixed"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: fastest(torch.optim.AdamW, fused=True), "chooses the implementation itself"),
        (lambda: fastest(torch.optim.SGD)([nn.Parameter(torch.zeros(1))], foreach=True), "foreach"),
        (lambda: fastest(torch.optim.LBFGS), "no foreach or fused implementation"),
        (lambda: fastest(torch.optim.AdamW([nn.Parameter(torch.zeros(1))])), "optimizer class"),
    ],
)
def test_fastest_refuses_what_it_cannot_honour(make, words):
    with pytest.raises(TypeError, match=words):
        make()


def test_a_fastest_factory_reads_like_the_call_that_made_it():
    factory = fastest(torch.optim.SGD, momentum=0.9, nesterov=True)
    assert isinstance(factory, Fastest)
    assert repr(factory) == "fastest(SGD, momentum=0.9, nesterov=True)"
    opt = factory([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.8)  # the call wins
    assert opt.param_groups[0]["momentum"] == 0.8 and opt.param_groups[0]["nesterov"]


def test_a_param_group_added_later_runs_the_same_implementation():
    # As Lightning's BaseFinetuning does when it unfreezes a layer.
    first, later = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    opt = fastest(torch.optim.AdamW)([first], lr=0.1)
    opt.add_param_group({"params": [later], "lr": 0.01})
    assert implementation(opt) == "fused"


# ------------------------------------------------------------------------------------------------
# Same numbers as the single-tensor loop
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_implementation_trains_like_the_single_tensor_loop(name):
    """Per-step LRs and momentums written into the groups (as the scheduler does), weight decay
    on the decayed groups only: each implementation ends where the single-tensor loop does."""
    cls, kwargs = OPTIMIZERS[name]
    reference = train_steps(single_tensor(cls, **kwargs))
    for flag in ("fused", "foreach"):
        try:
            run = train_steps(functools.partial(cls, **{flag: True}, **kwargs))
        except TypeError:  # this class has no such implementation
            continue
        assert_same_training(run, reference)
    fast = train_steps(fastest(cls, **kwargs))
    assert implementation(fast[2]) == FASTEST_ON_CPU[name]
    assert_same_training(fast, reference)
    assert not np.allclose(reference[0][0], reference[0][-1])  # it did train


def test_a_fused_step_reads_the_groups_lr_at_each_step_and_skips_params_without_grad():
    # One AdamW step from an empty state, in closed form: p <- p*(1 - lr*wd) - lr*g/(|g| + eps).
    p, bias, frozen = (nn.Parameter(torch.full((3,), 2.0)) for _ in range(3))
    groups = [{"params": [p, frozen], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0}]
    opt = fastest(torch.optim.AdamW)(groups, lr=1.0)
    for pg in opt.param_groups:
        pg["lr"] = 0.01  # as the scheduler writes it before the step
    p.grad, bias.grad = torch.full((3,), 0.5), torch.full((3,), -0.5)
    opt.step()
    assert implementation(opt) == "fused"
    update = 0.01 * 0.5 / (0.5 + 1e-8)
    torch.testing.assert_close(p.detach(), torch.full((3,), 2.0 * (1 - 0.01 * 0.1) - update))
    torch.testing.assert_close(bias.detach(), torch.full((3,), 2.0 + update))  # no decay
    assert torch.equal(frozen.detach(), torch.full((3,), 2.0)) and frozen not in opt.state


def test_the_default_learner_trains_like_torchs_default_adamw(tmp_path):
    """Freezing, discriminative one-cycle LRs and momentums, weight decay and its no-decay groups,
    gradient accumulation: the same weights as torch's single-tensor AdamW."""
    runs = []
    for opt_func in (None, torch.optim.AdamW):
        learn = learner(tmp_path, opt_func=opt_func, wd=0.1, accumulate_grad_batches=2)
        learn.freeze()
        learn.fit_one_cycle(1, 1e-2)
        learn.unfreeze()
        learn.fit_one_cycle(2, slice(1e-4, 1e-2))
        runs.append((learn.recorder.losses, learn.model))
    assert implementation(learn.opt) == "single-tensor"
    assert_same_training(*runs)


def test_bf16_mixed_precision_with_gradient_clipping_trains_with_the_default(tmp_path):
    options = {"precision": "bf16-mixed", "gradient_clip_val": 0.5}
    fast, plain = (learner(tmp_path, opt_func=f, **options) for f in (None, torch.optim.AdamW))
    for learn in (fast, plain):
        learn.fit_one_cycle(2, 1e-2)
    assert implementation(fast.opt) == "fused"
    assert_same_training((fast.recorder.losses, fast.model), (plain.recorder.losses, plain.model))
    # Why the default is not torch's own fused optimizer: Lightning refuses clipping with an
    # optimizer that says it unscales inside its step, as torch marks its fused ones.
    fused = learner(tmp_path, opt_func=functools.partial(torch.optim.AdamW, fused=True), **options)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fused.fit(1)


def test_a_grad_scaler_skips_the_step_on_infs_and_unscales_before_a_fastest_step():
    """The generic GradScaler protocol on a fused optimizer: scaled gradients give the unscaled
    update, and an inf gradient skips the step."""
    reference, fast = (nn.Parameter(torch.ones(4)) for _ in range(2))
    opts = [torch.optim.AdamW([reference], lr=0.1), fastest(torch.optim.AdamW)([fast], lr=0.1)]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    for grad in (torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([1.0, float("inf"), 0, 0])):
        for param, opt in zip((reference, fast), opts):
            opt.zero_grad()
            scaler.scale((param * grad).sum()).backward()
            scaler.step(opt)
        scaler.update()
    torch.testing.assert_close(fast.detach(), reference.detach())
    assert implementation(opts[1]) == "fused"
    assert float(opts[1].state[fast]["step"]) == 1  # the inf step was skipped


# ------------------------------------------------------------------------------------------------
# Falling back, and coming back
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_a_dtype_fused_cannot_handle_falls_back_with_a_warning_and_trains_right():
    model = nn.Linear(4, 2)
    opt = fastest(torch.optim.AdamW)(model.parameters(), lr=1e-2)
    assert implementation(opt) == "fused"
    model.to(torch.complex64)  # the same Parameter objects, a dtype torch's fused kernels refuse
    reference_model = nn.Linear(4, 2).to(torch.complex64)
    reference_model.load_state_dict(model.state_dict())
    reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.complex64)
    with pytest.warns(UserWarning, match=r"fused implementation does not run on complex64"):
        for _ in range(3):
            for m, o in ((model, opt), (reference_model, reference)):
                o.zero_grad()
                m(x).abs().sum().backward()
                o.step()
    assert implementation(opt) == "foreach"
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every step
        opt.step()


def test_sparse_gradients_fall_back_before_the_update_also_inside_a_closure():
    """Lightning passes the step a closure, so the gradients the step uses exist only once the
    closure has run: the check runs then, still before the update."""
    results = []
    for opt_func in (
        fastest(torch.optim.SGD, momentum=0.9),
        single_tensor(torch.optim.SGD, momentum=0.9),
    ):
        torch.manual_seed(0)
        emb = nn.Embedding(10, 3, sparse=True)
        opt = opt_func(emb.parameters(), lr=0.1)

        def closure(emb=emb, opt=opt):
            opt.zero_grad()
            loss = emb(torch.tensor([1, 2, 2])).pow(2).sum()
            loss.backward()
            return loss

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [float(opt.step(closure)) for _ in range(3)]
        results.append((losses, emb.weight.detach().clone(), opt, caught))
    (fast_losses, fast_w, fast_opt, caught), (ref_losses, ref_w, *_) = results
    assert implementation(fast_opt) == "foreach"
    assert any("sparse gradients" in str(w.message) for w in caught)
    np.testing.assert_allclose(fast_losses, ref_losses, rtol=1e-6)
    torch.testing.assert_close(fast_w, ref_w)


def test_a_cast_model_gets_its_state_cast_and_its_step_counters_where_fused_keeps_them(
    monkeypatch,
):
    """After a cast the moments follow the parameters' dtype (torch would fail on the mix), and
    fused gets its ``step`` counters as float32 tensors on the parameter's device."""
    import difflr.optim.implementation

    real = difflr.optim.implementation._runs
    # As if torch had no fused kernel for float64 (on a GPU: a device without one).
    monkeypatch.setattr(
        difflr.optim.implementation,
        "_runs",
        lambda cls, impl, placement, kw: (
            not (impl == "fused" and placement[1] == torch.float64)
            and real(cls, impl, placement, kw)
        ),
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Linear(4, 2)  # float64
        with pytest.warns(UserWarning, match="does not run on float64"):
            opt = fastest(torch.optim.AdamW)(model.parameters(), lr=1e-2)
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        assert implementation(opt) == "foreach"
        assert {s["step"].dtype for s in opt.state.values()} == {torch.float64}  # torch's choice
        model.float()  # now fused runs: the counters become what fused keeps
        model(torch.ones(1, 4, dtype=torch.float32)).sum().backward()
        opt.step()
    finally:
        torch.set_default_dtype(default_dtype)
    assert implementation(opt) == "fused"
    assert {(s["step"].dtype, float(s["step"])) for s in opt.state.values()} == {
        (torch.float32, 2.0)
    }
    assert {s["exp_avg"].dtype for s in opt.state.values()} == {torch.float32}


# ------------------------------------------------------------------------------------------------
# State: round trips between implementations, save/load, resume, lr_find
# ------------------------------------------------------------------------------------------------

IMPLEMENTATION_FLAGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {}}


@pytest.mark.parametrize("saved", IMPLEMENTATION_FLAGS)
@pytest.mark.parametrize("loaded", IMPLEMENTATION_FLAGS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_optimizer_state_round_trips_between_implementations(name, saved, loaded):
    cls, kwargs = OPTIMIZERS[name]
    uninterrupted = train_steps(single_tensor(cls, **kwargs), n_steps=6)

    first = train_steps(functools.partial(cls, **IMPLEMENTATION_FLAGS[saved], **kwargs), stop=3)
    buffer = io.BytesIO()
    torch.save({"model": first[1].state_dict(), "opt": first[2].state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    model = make_model()
    model.load_state_dict(state["model"])
    groups = build_param_groups(model, layer_groups(model, three_groups(model)))
    opt = keep_implementation(cls(groups, lr=1e-2, **IMPLEMENTATION_FLAGS[loaded], **kwargs))
    before = implementation(opt)
    opt.load_state_dict(state["opt"])
    assert implementation(opt) == before  # the loaded flags did not take over

    # Continue the same schedule (steps 3..5 of 6) on the loaded optimizer.
    rest = train_steps(lambda groups, lr: opt, n_steps=6, model=model, start=3)
    assert_same_training((np.r_[first[0], rest[0]], model), uninterrupted[:2])


def test_torch_alone_would_take_the_saved_implementation_flags():
    """Why keep_implementation exists: torch's load_state_dict copies the saved flags."""
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    fused = torch.optim.AdamW([p], fused=True)
    plain = torch.optim.AdamW([q], foreach=True)
    plain.load_state_dict(fused.state_dict())
    assert implementation(plain) == "fused"
    kept = keep_implementation(torch.optim.AdamW([q], foreach=True))
    kept.load_state_dict(fused.state_dict())
    assert implementation(kept) == "foreach"


def test_learn_save_and_load_move_state_between_implementations(tmp_path):
    fast = learner(tmp_path)
    fast.fit(1, lr=1e-2)
    file = fast.save("fast")
    plain = learner(tmp_path, opt_func=torch.optim.AdamW).load(file)
    assert implementation(plain.opt) == "single-tensor"
    saved, loaded = fast.opt.state_dict()["state"], plain.opt.state_dict()["state"]
    for key, state in saved.items():
        for name, value in state.items():
            assert torch.equal(value, loaded[key][name]), (key, name)
    back = learner(tmp_path).load(plain.save("plain"))
    assert implementation(back.opt) == "fused"
    for learn in (fast, plain, back):
        learn.fit(1, lr=1e-2)
    assert_same_training((fast.recorder.losses, fast.model), (plain.recorder.losses, plain.model))
    assert_same_training((fast.recorder.losses, fast.model), (back.recorder.losses, back.model))


def test_a_fit_checkpointed_by_the_default_resumes_on_torchs_default_adamw(tmp_path):
    full = learner(tmp_path / "full")
    full.fit_one_cycle(3, slice(1e-4, 1e-2))
    crashed = learner(tmp_path / "run", checkpoint=True, callbacks=[Crash(epoch=2, batch=0)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit_one_cycle(3, slice(1e-4, 1e-2))
    resumed = learner(tmp_path / "run", checkpoint=True, opt_func=torch.optim.AdamW)
    resumed.fit_one_cycle(3, slice(1e-4, 1e-2), ckpt_path="last")
    assert implementation(resumed.opt) == "single-tensor"
    for (name, x), y in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_lr_find_restores_a_fastest_sgd_bit_for_bit(tmp_path):
    learn = _trained(tmp_path, opt_func=fastest(torch.optim.SGD, momentum=0.9))
    before = _state(learn)
    assert implementation(learn.opt) == "fused"
    learn.lr_find(num_it=20, show_plot=False)
    _assert_same(before, _state(learn))  # weights, buffers, momentum buffers, flags, RNG
    assert implementation(learn.opt) == "fused"


def test_make_optimizer_keeps_the_implementation_of_an_explicit_opt_func():
    model = make_model()
    groups = build_param_groups(model, layer_groups(model, three_groups(model)))
    opt = make_optimizer(torch.optim.AdamW, groups, 1e-3, 3)
    other = make_model()
    saved = torch.optim.AdamW(
        build_param_groups(other, layer_groups(other, three_groups(other))), fused=True
    )
    opt.load_state_dict(saved.state_dict())
    assert implementation(opt) == "single-tensor"
