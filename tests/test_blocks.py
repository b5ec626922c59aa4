"""Tests for difflr.groups.blocks: finding the trunk of repeated blocks and cutting a model along it."""

from __future__ import annotations

import doctest
import itertools
import pickle

import pytest
import torch
from torch import nn

import difflr.groups.blocks
import difflr.groups.hf
from difflr.groups.blocks import BlockSplitter, Trunk, chunks, find_trunk, tied_parameters
from difflr.groups.splitters import split_model


class Block(nn.Module):
    """A pre-norm residual block: a norm and an MLP, as in a transformer layer."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class TinyLM(nn.Module):
    """Embeddings, a ModuleList of blocks, a final norm and an LM head tied to the embeddings."""

    def __init__(self, n_blocks: int = 3, vocab: int = 11, dim: int = 8, tie: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(16, dim))
        self.layers = nn.ModuleList(Block(dim) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class Bottleneck(nn.Module):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class StagedNet(nn.Module):
    """A ResNet-50-like layout: stages layer1..layer4 of 3, 4, 6 and 3 blocks."""

    def __init__(self, depths: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        for i, depth in enumerate(depths, 1):
            setattr(self, f"layer{i}", nn.Sequential(*[Bottleneck() for _ in range(depth)]))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)
        self.n_stages = len(depths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.pool(x).flatten(1))


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _ids_of(model: nn.Module, *paths: str) -> set[int]:
    ids: set[int] = set()
    for path in paths:
        try:
            ids |= _ids(model.get_submodule(path).parameters())
        except AttributeError:
            ids.add(id(model.get_parameter(path)))
    return ids


def _assert_covers_once(model: nn.Module, groups: dict[str, list[nn.Parameter]]) -> None:
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert set(grouped) == _ids(model.parameters()), "a parameter is in no group"


def _first_use(model: nn.Module, *inputs: torch.Tensor) -> dict[int, int]:
    """Param id -> rank of the first forward call of a module that holds it directly."""
    rank: dict[int, int] = {}
    counter = itertools.count()
    handles = []
    for module in model.modules():

        def record(m: nn.Module, _args: object) -> None:
            for p in m.parameters(recurse=False):
                rank.setdefault(id(p), next(counter))

        handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return rank


# --------------------------------------------------------------------------------------------
# find_trunk
# --------------------------------------------------------------------------------------------


def test_the_trunk_of_a_transformer_is_its_list_of_layers() -> None:
    trunk = find_trunk(TinyLM(n_blocks=3))
    assert trunk == Trunk("layers", ("0", "1", "2"), "Block")
    assert trunk.block_paths() == ["layers.0", "layers.1", "layers.2"]
    assert str(trunk) == "3 Block blocks in layers"


def test_parameter_free_children_do_not_break_a_run() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), Bottleneck(), nn.ReLU(), nn.MaxPool2d(2), Bottleneck(), nn.Dropout()
    )
    assert find_trunk(model) == Trunk("", ("1", "4"), "Bottleneck")


def test_a_block_of_another_class_ends_a_run() -> None:
    model = nn.Sequential(Bottleneck(), Bottleneck(), Block(4), Bottleneck())
    assert find_trunk(model).blocks == ("0", "1")


def test_stages_are_the_trunk_rather_than_the_longest_stage() -> None:
    # layer3 holds the longest run (6 blocks) but every stage holds a run: the stages win.
    trunk = find_trunk(StagedNet())
    assert trunk == Trunk("", ("layer1", "layer2", "layer3", "layer4"), "Sequential")


def test_lists_inside_every_layer_do_not_compete_with_the_layers() -> None:
    # A mixture of experts: each of 2 layers holds a list of 4 experts, a longer run.
    class MoELayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(8, 4)
            self.experts = nn.ModuleList(Block() for _ in range(4))

    model = nn.Sequential(nn.Embedding(5, 8), nn.Sequential(MoELayer(), MoELayer()))
    assert find_trunk(model) == Trunk("1", ("0", "1"), "MoELayer")


def test_a_longer_run_wins_then_more_parameters_then_the_first() -> None:
    # A ModuleList beside a Sequential: two containers of different classes, so not stages.
    def two(a: list[nn.Module], b: list[nn.Module]) -> nn.Module:
        return nn.ModuleDict({"a": nn.ModuleList(a), "b": nn.Sequential(*b)})

    assert find_trunk(two([Block(8), Block(8)], [Block(2), Block(2), Block(2)])).path == "b"
    assert find_trunk(two([Block(2), Block(2)], [Block(8), Block(8)])).path == "b"
    assert find_trunk(two([Block(4), Block(4)], [Block(4), Block(4)])).path == "a"


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
        nn.Sequential(nn.Embedding(5, 8), Block(), nn.Linear(8, 2)),
        nn.Linear(3, 3),
    ],
    ids=["mlp_of_linears", "one_block", "one_layer"],
)
def test_no_run_of_two_blocks_means_no_trunk(model: nn.Module) -> None:
    assert find_trunk(model) is None


# --------------------------------------------------------------------------------------------
# BlockSplitter
# --------------------------------------------------------------------------------------------


def test_groups_are_stem_each_block_and_head_covering_every_param_once() -> None:
    model = TinyLM(n_blocks=3, tie=False)
    groups = BlockSplitter()(model)
    assert list(groups) == ["stem", "block0", "block1", "block2", "head"]
    _assert_covers_once(model, groups)
    assert _ids(groups["stem"]) == _ids_of(model, "embed", "pos")
    assert _ids(groups["block1"]) == _ids_of(model, "layers.1")
    assert _ids(groups["head"]) == _ids_of(model, "norm", "lm_head")


def test_groups_run_in_forward_order() -> None:
    model = TinyLM(n_blocks=3, tie=False)
    rank = _first_use(model, torch.randint(0, 11, (2, 5)))
    groups = list(BlockSplitter()(model).values())
    for earlier, later in itertools.pairwise(groups):
        assert max(rank[id(p)] for p in earlier) < min(rank[id(p)] for p in later)


def test_stages_give_the_original_examples_six_groups() -> None:
    model = StagedNet()
    groups = BlockSplitter()(model)
    assert list(groups) == ["stem", "block0", "block1", "block2", "block3", "head"]
    _assert_covers_once(model, groups)
    assert _ids(groups["stem"]) == _ids_of(model, "conv1", "bn1")
    assert _ids(groups["block2"]) == _ids_of(model, "layer3")
    assert _ids(groups["head"]) == _ids_of(model, "fc")


@pytest.mark.parametrize(
    ("n_blocks", "block_groups", "expected"),
    [
        (5, 2, {"block0-2": [0, 1, 2], "block3-4": [3, 4]}),
        (4, 4, {"block0": [0], "block1": [1], "block2": [2], "block3": [3]}),
        (3, 5, {"block0": [0], "block1": [1], "block2": [2]}),  # never more groups than blocks
        (6, 1, {"block0-5": [0, 1, 2, 3, 4, 5]}),
    ],
)
def test_block_groups_cuts_the_blocks_into_contiguous_runs(
    n_blocks: int, block_groups: int, expected: dict[str, list[int]]
) -> None:
    model = TinyLM(n_blocks=n_blocks, tie=False)
    groups = BlockSplitter(block_groups=block_groups)(model)
    assert list(groups) == ["stem", *expected, "head"]
    _assert_covers_once(model, groups)
    for name, blocks in expected.items():
        assert _ids(groups[name]) == _ids_of(model, *(f"layers.{k}" for k in blocks))


def test_chunks_are_contiguous_near_equal_and_longer_first() -> None:
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert chunks([1, 2], 5) == [[1], [2]]


def test_an_explicit_trunk_takes_every_child_with_parameters_as_a_block() -> None:
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 2)
    )
    assert find_trunk(model) is None
    groups = BlockSplitter(trunk="1")(model)
    assert list(groups) == ["stem", "block0", "block1", "head"]
    assert _ids(groups["block1"]) == _ids_of(model, "1.2")


def test_empty_groups_are_dropped() -> None:
    model = nn.Sequential(Block(), Block())  # nothing before or after the blocks
    assert list(BlockSplitter()(model)) == ["block0", "block1"]


def test_names_rename_the_groups() -> None:
    groups = BlockSplitter(names=("embeddings", "layer", "lm_head"))(TinyLM(n_blocks=2))
    assert list(groups) == ["embeddings", "layer0", "layer1", "lm_head"]


def test_a_wrapper_with_its_own_head_puts_it_in_the_head_group() -> None:
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = TinyLM(n_blocks=2, tie=False)
            self.classifier = nn.Linear(11, 3)

    model = Classifier()
    groups = BlockSplitter()(model)
    assert _ids(groups["head"]) == _ids_of(model, "backbone.norm", "backbone.lm_head", "classifier")


# --------------------------------------------------------------------------------------------
# Tied parameters
# --------------------------------------------------------------------------------------------


def test_a_tied_lm_head_trains_with_the_head_by_default() -> None:
    model = TinyLM(n_blocks=2, tie=True)
    assert tied_parameters(model) == [("embed.weight", "lm_head.weight")]
    groups = BlockSplitter()(model)
    _assert_covers_once(model, groups)
    assert id(model.embed.weight) in _ids(groups["head"])
    assert _ids(groups["stem"]) == {id(model.pos)}


def test_tied_first_keeps_a_tied_weight_with_the_embeddings() -> None:
    model = TinyLM(n_blocks=2, tie=True)
    groups = BlockSplitter(tied="first")(model)
    _assert_covers_once(model, groups)
    assert _ids(groups["stem"]) == {id(model.embed.weight), id(model.pos)}
    assert _ids(groups["head"]) == _ids_of(model, "norm")


def test_split_model_accepts_a_tied_model_without_a_double_count() -> None:
    model = TinyLM(n_blocks=2, tie=True)
    groups = split_model(model)  # no splitter: the repeated-blocks rule
    assert [g.name for g in groups] == ["0.stem", "1.block0", "2.block1", "3.head"]
    assert sum(g.n_params for g in groups) == sum(p.numel() for p in model.parameters())


def test_a_model_without_ties_has_no_tied_parameters() -> None:
    assert tied_parameters(TinyLM(tie=False)) == []


# --------------------------------------------------------------------------------------------
# Arguments and errors
# --------------------------------------------------------------------------------------------


def test_block_splitter_pickles_and_says_what_it_does() -> None:
    splitter = BlockSplitter(trunk="layers", block_groups=2)
    restored = pickle.loads(pickle.dumps(splitter))
    assert restored == splitter
    assert "trunk='layers'" in repr(splitter) and "block_groups=2" in repr(splitter)


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"block_groups": 0}, ValueError, "block_groups must be an int >= 1"),
        ({"block_groups": 2.0}, TypeError, "block_groups must be an int"),
        ({"tied": "embeddings"}, ValueError, "tied must be 'head' or 'first'"),
        ({"names": ("a", "a", "b")}, ValueError, "three different names"),
        ({"trunk": 3}, TypeError, "trunk must be a module path"),
    ],
)
def test_bad_arguments_name_the_value_and_the_fix(kwargs: dict, exc: type, words: str) -> None:
    with pytest.raises(exc, match=words):
        BlockSplitter(**kwargs)


def test_a_trunk_that_is_not_there_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match=r"trunk='encoder\.layer': TinyLM has no such submodule"):
        BlockSplitter(trunk="encoder.layer")(TinyLM())
    with pytest.raises(ValueError, match="no children with parameters"):
        BlockSplitter(trunk="2")(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.ReLU()))


def test_a_model_without_a_trunk_says_how_to_name_one() -> None:
    with pytest.raises(ValueError, match=r"found no trunk; pass BlockSplitter\(trunk="):
        BlockSplitter()(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


@pytest.mark.parametrize("module", [difflr.groups.blocks, difflr.groups.hf], ids=lambda m: m.__name__)
def test_the_docstring_examples_run(module) -> None:
    results = doctest.testmod(module)
    assert results.attempted > 0 and results.failed == 0
