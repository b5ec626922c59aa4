import pytest
import torch
from torch import nn

from difflr.groups.freezing import apply_freeze
from difflr.groups.splitters import split_model
from difflr.policy.freeze import frozen_pattern
from tests.helpers import make_model, three_groups


@pytest.mark.parametrize(
    ("n", "pattern"),
    [
        (0, [False, False, False]),
        (1, [True, False, False]),
        (-1, [True, True, False]),
        (-2, [True, False, False]),
        (-3, [False, False, False]),  # fastai: n + N groups frozen, so -N freezes none
        (3, [True, True, True]),
    ],
)
def test_frozen_pattern_counts_from_either_end(n, pattern):
    assert frozen_pattern(n, 3) == pattern


@pytest.mark.parametrize("n", [4, -4, 10])
def test_out_of_range_n_names_the_range(n):
    with pytest.raises(ValueError, match=rf"freeze_to\({n}\) is out of range.*\[-3, 3\]"):
        frozen_pattern(n, 3)


def test_non_int_n_is_a_type_error():
    with pytest.raises(TypeError, match="takes an int"):
        frozen_pattern(1.5, 3)


def _flags(model: nn.Sequential) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def test_train_bn_keeps_batchnorm_trainable_in_frozen_groups():
    model = make_model()
    apply_freeze(model, split_model(model, three_groups), [True, True, False], train_bn=True)
    assert _flags(model) == {
        "0.weight": False,
        "0.bias": False,
        "1.weight": True,
        "1.bias": True,
        "3.weight": False,
        "3.bias": False,
        "5.weight": True,
        "5.bias": True,
    }


def test_without_train_bn_batchnorm_freezes_with_its_group():
    model = make_model()
    apply_freeze(model, split_model(model, three_groups), [True, True, False], train_bn=False)
    assert [n for n, f in _flags(model).items() if f] == ["5.weight", "5.bias"]


@pytest.mark.parametrize(
    "norm",
    [nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.InstanceNorm1d(4, affine=True), nn.BatchNorm1d(4)],
)
def test_every_normalisation_layer_type_stays_trainable(norm):
    model = nn.Sequential(nn.Linear(4, 4), norm, nn.Linear(4, 2))
    groups = split_model(model, lambda m: [m[:2], m[2]])
    apply_freeze(model, groups, [True, False], train_bn=True)
    assert all(p.requires_grad for p in norm.parameters())
    assert not model[0].weight.requires_grad


def test_freezing_drops_existing_gradients():
    model = make_model()
    for p in model.parameters():
        p.grad = p.detach().clone()
    apply_freeze(model, split_model(model, three_groups), [True, False, False], train_bn=False)
    assert model[0].weight.grad is None and model[3].weight.grad is not None


def test_freezing_everything_warns():
    model = make_model()
    with pytest.warns(UserWarning, match="every layer group is frozen"):
        apply_freeze(model, split_model(model, three_groups), [True] * 3, train_bn=False)


def test_a_parameterless_batchnorm_in_a_frozen_group_keeps_its_statistics_with_train_bn_false(
    tmp_path,
):
    from tests.helpers import make_learner

    model = nn.Sequential(
        nn.Linear(6, 16),
        nn.BatchNorm1d(16, affine=False),  # no parameters: follows the Linear it normalises
        nn.ReLU(),
        nn.Linear(16, 3),
    )
    learn = make_learner(
        tmp_path, model=model, splitter=lambda m: [m[:3], m[3]], train_bn=False, checkpoint=False
    )
    learn.freeze()
    stats = model[1].running_mean.clone(), model[1].running_var.clone()
    learn.fit(1, 1e-2)
    assert torch.equal(model[1].running_mean, stats[0])
    assert torch.equal(model[1].running_var, stats[1])
    assert int(model[1].num_batches_tracked) == 0
