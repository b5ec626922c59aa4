import pytest
import torch
from torch import nn

from difflr.groups.layers import no_decay_param_ids
from difflr.groups.splitters import split_model
from difflr.optim.param_groups import build_param_groups
from tests.helpers import make_model, three_groups


def test_mapping_splitter_names_groups_by_index_and_key():
    groups = split_model(make_model(), three_groups)
    assert [g.name for g in groups] == ["0.stem", "1.body", "2.head"]


def test_sequence_splitter_names_groups_by_class():
    model = make_model()
    groups = split_model(model, lambda m: [m[:3], [*m[3].parameters()], m[5]])
    assert [g.name for g in groups] == ["0.sequential", "1.group", "2.linear"]


def test_model_splits_method_is_used_when_there_is_no_splitter():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(2, 2), nn.Linear(2, 1)

        def model_splits(self):
            return [self.body, self.head]

    assert len(split_model(Net())) == 2


def test_unknown_model_is_one_group():
    with pytest.warns(UserWarning, match="found no layer groups"):
        groups = split_model(nn.Sequential(nn.Linear(2, 2)))
    assert len(groups) == 1


def test_every_param_is_in_exactly_one_group():
    model = make_model()
    groups = split_model(model, three_groups)
    ids = [id(p) for g in groups for p in g.params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_a_missing_param_is_named():
    with pytest.raises(ValueError, match=r"in no layer group: 5\.weight, 5\.bias"):
        split_model(make_model(), lambda m: [m[:3], m[3:5]])


def test_a_repeated_param_is_named():
    with pytest.raises(ValueError, match=r"\(3\.weight\) is in layer groups '0\.a' and '1\.b'"):
        split_model(make_model(), lambda m: {"a": m[:5], "b": m[3:]})


def test_frozen_params_outside_groups_are_allowed():
    model = make_model()
    for p in model[5].parameters():
        p.requires_grad_(False)
    assert len(split_model(model, lambda m: [m[:3], m[3:5]])) == 2


def test_params_of_another_model_are_refused():
    model, other = make_model(), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="do not belong to the model"):
        split_model(model, lambda m: [m, other])


def test_a_splitter_returning_a_module_is_refused():
    with pytest.raises(TypeError, match="must return a list of groups"):
        split_model(make_model(), lambda m: m)


def test_an_empty_group_is_refused():
    with pytest.raises(ValueError, match="has no parameters"):
        split_model(make_model(), lambda m: [m, nn.ReLU()])


def test_bias_and_norm_params_take_no_decay():
    model = make_model()
    ids = no_decay_param_ids(model)
    expected = {id(model[i].bias) for i in (0, 3, 5)} | {id(model[1].weight), id(model[1].bias)}
    assert ids == expected


def test_param_groups_split_decay_from_no_decay_within_a_layer_group():
    model = make_model()
    pgs = build_param_groups(model, split_model(model, three_groups), wd_bn_bias=False)
    assert [pg["name"] for pg in pgs] == [
        "0.stem",
        "0.stem/no_decay",
        "1.body",
        "1.body/no_decay",
        "2.head",
        "2.head/no_decay",
    ]
    assert [pg["layer_group"] for pg in pgs] == [0, 0, 1, 1, 2, 2]
    assert pgs[1]["params"] == [model[0].bias, model[1].weight, model[1].bias]


def test_wd_bn_bias_keeps_one_param_group_per_layer_group():
    model = make_model()
    pgs = build_param_groups(model, split_model(model, three_groups), wd_bn_bias=True)
    assert [pg["name"] for pg in pgs] == ["0.stem", "1.body", "2.head"]
    assert len({pg["name"] for pg in pgs}) == len(pgs)


def test_group_n_params_counts_scalars():
    model = nn.Sequential(nn.Linear(3, 2))
    (group,) = split_model(model, lambda m: [m])
    assert group.n_params == 8 and isinstance(group.params[0], torch.nn.Parameter)
