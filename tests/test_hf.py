"""Hugging Face transformers models: their layer groups, and fitting them with dict batches.

Every model is a tiny random one built from a config in the test (no downloads). The tests are
skipped when transformers is not installed (it comes with the [dev] and [transformers] extras).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from difflr import BlockSplitter, Learner, accuracy, expand_lrs, layer_decay
from difflr.groups.hf import is_transformers_model, transformers_trunk
from difflr.groups.splitters import describe_group, find_splitter, split_model
from tests.helpers import make_learner
from tests.test_learner import closed_form_one_cycle
from tests.test_lr_finder import _assert_same, _state

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB, SEQ, HIDDEN = 40, 6, 16
TEXT = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "vocab_size": VOCAB,
    "max_position_embeddings": 16,
}
GPT2 = {"n_embd": HIDDEN, "n_layer": 2, "n_head": 2, "vocab_size": VOCAB, "n_positions": 16}
GPT2_TOKENS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(**TEXT, num_labels=3))


def roberta() -> nn.Module:
    config = transformers.RobertaConfig(**TEXT, num_labels=3, pad_token_id=1)
    return transformers.RobertaForSequenceClassification(config)


def distilbert() -> nn.Module:
    config = transformers.DistilBertConfig(
        dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=32, vocab_size=VOCAB, num_labels=3
    )
    return transformers.DistilBertForSequenceClassification(config)


def gpt2_lm() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2, **GPT2_TOKENS))


def gpt2_classifier() -> nn.Module:
    config = transformers.GPT2Config(**GPT2, **GPT2_TOKENS, num_labels=3)
    return transformers.GPT2ForSequenceClassification(config)


def llama_config(**kwargs) -> object:
    return transformers.LlamaConfig(**TEXT, num_key_value_heads=1, pad_token_id=0, **kwargs)


def llama_lm() -> nn.Module:
    return transformers.LlamaForCausalLM(llama_config())


def llama_classifier() -> nn.Module:
    return transformers.LlamaForSequenceClassification(llama_config(num_labels=3))


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=8,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config)


# family: (model, where its layers may be (it moved between versions), embeddings, head)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...], list[str], list[str]]] = {
    "bert": (bert, ("bert.encoder.layer",), ["bert.embeddings"], ["bert.pooler", "classifier"]),
    "roberta": (roberta, ("roberta.encoder.layer",), ["roberta.embeddings"], ["classifier"]),
    "distilbert": (
        distilbert,
        ("distilbert.transformer.layer",),
        ["distilbert.embeddings"],
        ["pre_classifier", "classifier"],
    ),
    # The LM head is tied to the token embeddings: that one tensor trains with the head.
    "gpt2_lm": (gpt2_lm, ("transformer.h",), ["transformer.wpe"], ["transformer.ln_f", "lm_head"]),
    "gpt2_classifier": (
        gpt2_classifier,
        ("transformer.h",),
        ["transformer.wte", "transformer.wpe"],
        ["transformer.ln_f", "score"],
    ),
    "llama_lm": (llama_lm, ("model.layers",), ["model.embed_tokens"], ["model.norm", "lm_head"]),
    "llama_classifier": (
        llama_classifier,
        ("model.layers",),
        ["model.embed_tokens"],
        ["model.norm", "score"],
    ),
    "vit": (
        vit,
        ("vit.layers", "vit.encoder.layer"),
        ["vit.embeddings"],
        ["vit.layernorm", "classifier"],
    ),
}
NAMES = ["0.embeddings", "1.layer0", "2.layer1", "3.head"]


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _ids_of(model: nn.Module, paths: list[str]) -> set[int]:
    return _ids(p for path in paths for p in model.get_submodule(path).parameters())


def _layers_path(model: nn.Module, candidates: tuple[str, ...]) -> str:
    return next(path for path in candidates if _exists(model, path))


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request) -> tuple[nn.Module, str, list[str], list[str]]:
    make, layer_paths, embeddings, head = FAMILIES[request.param]
    torch.manual_seed(0)
    model = make()
    return model, _layers_path(model, layer_paths), embeddings, head


# --------------------------------------------------------------------------------------------
# Groups, per family
# --------------------------------------------------------------------------------------------


def test_groups_are_embeddings_each_layer_then_head(family) -> None:
    model, layers, embeddings, head = family
    groups = split_model(model)  # no splitter: the Hugging Face rule
    assert [g.name for g in groups] == NAMES
    assert _ids(groups[0].params) == _ids_of(model, embeddings)
    for k in range(2):
        assert _ids(groups[1 + k].params) == _ids_of(model, [f"{layers}.{k}"])
    assert _ids(groups[-1].params) == _ids_of(model, head)


def test_every_parameter_is_in_exactly_one_group(family) -> None:
    model = family[0]
    grouped = [id(p) for g in split_model(model) for p in g.params]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == _ids(model.parameters())


def test_the_trunk_is_the_list_of_layers_the_config_counts(family) -> None:
    model, layers, _, _ = family
    assert is_transformers_model(model)
    assert transformers_trunk(model) == layers
    assert len(model.get_submodule(layers)) == model.config.num_hidden_layers


def test_freeze_trains_only_the_head_and_a_slice_is_geometric_over_the_groups(
    family, tmp_path
) -> None:
    model = family[0]
    learn = _learner(tmp_path, model, train_bn=False)
    learn.freeze()
    trainable = _ids(p for p in model.parameters() if p.requires_grad)
    assert trainable == _ids(learn.splits[-1].params)
    learn.unfreeze()
    # Every step gives each group its geometric share of the head's LR.
    lrs = learn.preview_one_cycle(1, slice(1e-5, 1e-3)).lrs
    ratios = lrs / lrs[:, -1:]
    np.testing.assert_allclose(
        ratios, np.broadcast_to([1e-2, 1e-2 ** (2 / 3), 1e-2 ** (1 / 3), 1], ratios.shape)
    )


def test_the_general_rule_finds_the_same_groups(family) -> None:
    # BlockSplitter() is what a user passes to change the cut (block_groups=, tied=).
    model = family[0]
    assert [g.name for g in split_model(model, BlockSplitter())] == NAMES


def test_one_layer_models_are_grouped_too() -> None:
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(**{**TEXT, "num_hidden_layers": 1}, num_labels=3)
    )
    assert [g.name for g in split_model(model)] == ["0.embeddings", "1.layer0", "2.head"]


def test_block_groups_cuts_the_layers_into_fewer_groups() -> None:
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(**{**TEXT, "num_hidden_layers": 5}, num_labels=3)
    )
    groups = split_model(model, BlockSplitter(block_groups=2))
    assert [g.name for g in groups] == ["0.embeddings", "1.layer0-2", "2.layer3-4", "3.head"]
    layers = model.bert.encoder.layer
    assert _ids(groups[1].params) == _ids(p for k in range(3) for p in layers[k].parameters())


def test_a_model_held_by_a_wrapper_is_found_and_the_wrappers_head_joins_the_head() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = bert()
            self.extra = nn.Linear(3, 2)

    wrapper = Wrapper()
    groups = split_model(wrapper)
    assert [g.name for g in groups] == NAMES
    assert _ids(groups[-1].params) == _ids_of(
        wrapper, ["model.bert.pooler", "model.classifier", "extra"]
    )
    assert "transformers" in repr(find_splitter(wrapper))


@pytest.mark.parametrize(
    ("tied", "embeddings", "head"),
    [
        ("head", ["transformer.wpe"], ["transformer.wte", "transformer.ln_f"]),
        ("first", ["transformer.wte", "transformer.wpe"], ["transformer.ln_f"]),
    ],
)
def test_the_tied_lm_head_goes_where_tied_says(tied: str, embeddings, head) -> None:
    model = gpt2_lm()
    assert model.lm_head.weight is model.transformer.wte.weight
    groups = split_model(model, BlockSplitter(tied=tied))
    assert _ids(groups[0].params) == _ids_of(model, embeddings)
    assert _ids(groups[-1].params) == _ids_of(model, head)


def test_llama_with_tied_embeddings_has_no_separate_embeddings_group() -> None:
    model = transformers.LlamaForCausalLM(llama_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    groups = split_model(model)
    assert [g.name for g in groups] == ["0.layer0", "1.layer1", "2.head"]
    assert id(model.lm_head.weight) in _ids(groups[-1].params)


def test_an_encoder_decoder_has_no_single_layer_list_and_gets_the_general_rule() -> None:
    # T5 counts encoder and decoder layers apart: not one trunk. The repeated-blocks rule then
    # takes its two stacks as two stages; pass a splitter for a finer cut.
    config = transformers.T5Config(
        d_model=HIDDEN, d_ff=32, num_layers=2, num_heads=2, d_kv=8, vocab_size=VOCAB
    )
    model = transformers.T5ForConditionalGeneration(config)
    assert transformers_trunk(model) is None and find_splitter(model) is None
    groups = split_model(model)
    assert [g.name for g in groups] == ["0.block0", "1.block1", "2.head"]
    assert _ids(groups[0].params) == _ids_of(model, ["encoder.block", "encoder.final_layer_norm"])


def test_summary_shows_each_groups_modules_and_the_tied_weight(tmp_path) -> None:
    model = gpt2_lm()
    learn = _learner(tmp_path, model)
    lines = learn.summary().splitlines()
    assert lines[0].split() == ["group", "params", "trainable", "lr", "modules"]
    assert lines[1].split()[0] == "0.embeddings" and lines[1].endswith("transformer.wpe")
    assert lines[2].endswith("transformer.h.0")
    assert lines[4].endswith("transformer.wte, transformer.ln_f, lm_head")
    assert lines[5] == (
        "tied: transformer.wte.weight = lm_head.weight (one tensor, trained in 3.head)"
    )


# --------------------------------------------------------------------------------------------
# Fitting with dict batches and the model's own loss
# --------------------------------------------------------------------------------------------


class TokenData(Dataset):
    """Random token ids; the label says whether the first token is in the upper half."""

    def __init__(self, n: int = 48, seed: int = 0, lm: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.labels = self.ids if lm else (self.ids[:, 0] >= VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(SEQ, dtype=torch.long)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.labels[i]}


class PixelData(Dataset):
    def __init__(self, n: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = (self.x.mean(dim=(1, 2, 3)) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _loaders(model: nn.Module) -> tuple[DataLoader, DataLoader]:
    if isinstance(model, transformers.ViTForImageClassification):
        train, valid = PixelData(), PixelData(16, seed=1)
    else:
        lm = type(model).__name__.endswith("LMHeadModel") or "CausalLM" in type(model).__name__
        train, valid = TokenData(lm=lm), TokenData(16, seed=1, lm=lm)
    return DataLoader(train, batch_size=16), DataLoader(valid, batch_size=16)


def _learner(tmp_path, model: nn.Module, data=None, loss_func=None, **kwargs) -> Learner:
    """A quiet Learner over ``model`` (its built-in groups) and ``data``, else `_loaders`."""
    data = _loaders(model) if data is None else data
    return make_learner(tmp_path, model, data, loss_func, splitter=None, checkpoint=False, **kwargs)


def _one_cycle(lr_max: list[float], n_steps: int) -> np.ndarray:
    """Each step's LR per group under fit_one_cycle's defaults, in closed form."""
    return closed_form_one_cycle(lr_max, n_steps)[0]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_a_classifier_fits_from_dict_batches_with_its_own_loss(tmp_path) -> None:
    torch.manual_seed(0)
    model = bert()
    learn = _learner(tmp_path, model, metrics=accuracy, train_bn=False)
    learn.freeze()
    before = _weights(model)
    learn.fit_one_cycle(1, 1e-2)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {
        f"{path}.{n}" for path in ("bert.pooler.dense", "classifier") for n in ("weight", "bias")
    }

    learn.unfreeze()
    learn.fit_one_cycle(1, slice(1e-4, 1e-2))
    np.testing.assert_allclose(learn.recorder.lrs, _one_cycle(expand_lrs(slice(1e-4, 1e-2), 4), 3))
    row = learn.recorder.values[-1]
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["valid_loss"])
    assert 0 <= row["accuracy"] <= 1


def test_a_causal_lm_fits_with_layer_decay_and_lr_find_restores_it(tmp_path) -> None:
    torch.manual_seed(0)
    model = llama_lm()
    learn = _learner(tmp_path, model)
    learn.fit_one_cycle(1, layer_decay(1e-2, 0.5))
    np.testing.assert_allclose(learn.recorder.lrs, _one_cycle([1.25e-3, 2.5e-3, 5e-3, 1e-2], 3))
    before = _state(learn)
    learn.lr_find(num_it=8, show_plot=False)
    assert len(learn.recorder.losses) > 0 and np.isfinite(learn.recorder.losses[0])
    _assert_same(before, _state(learn))


def test_the_loss_is_the_models_own_and_metrics_get_the_logits(tmp_path) -> None:
    torch.manual_seed(0)
    model = bert()
    seen = []

    def first_logit(preds: torch.Tensor, targets: torch.Tensor) -> float:
        seen.append((preds.shape, targets.shape))
        return float(preds[0, 0])

    train, valid = _loaders(model)
    learn = _learner(tmp_path, model, (train, valid), metrics=first_logit)
    learn.fit(1, 1e-3)
    assert seen[-1] == (torch.Size([16, 3]), torch.Size([16]))
    model.eval()
    batch = next(iter(valid))
    with torch.no_grad():
        expected = model(**batch).loss
    assert learn.recorder.values[-1]["valid_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_an_explicit_loss_func_gets_the_logits_and_the_labels(tmp_path) -> None:
    torch.manual_seed(0)
    model = bert()
    calls = []

    def loss_func(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append((logits.shape, labels.shape))
        return nn.functional.cross_entropy(logits, labels)

    learn = _learner(tmp_path, model, loss_func=loss_func)
    learn.fit(1, 1e-3)
    assert calls and all(c == (torch.Size([16, 3]), torch.Size([16])) for c in calls)


def test_a_batch_without_labels_says_where_the_target_goes(tmp_path) -> None:
    model = bert()
    data = [{"input_ids": torch.randint(0, VOCAB, (4, SEQ))} for _ in range(2)]
    learn = _learner(tmp_path, model, (DataLoader(data, batch_size=None), None))
    with pytest.raises(TypeError, match=r"no \.loss when called without labels .* under 'labels'"):
        learn.fit(1, 1e-3)


def test_pairs_of_tensors_work_too(tmp_path) -> None:
    # (input_ids, labels) tuples: the ids go in positionally, the target as labels=.
    torch.manual_seed(0)
    model = bert()
    data = TokenData()
    pairs = DataLoader(torch.utils.data.TensorDataset(data.ids, data.labels), batch_size=16)
    learn = _learner(tmp_path, model, (pairs, None))
    before = _weights(model)
    learn.fit(1, 1e-3)
    assert len(learn.recorder.losses) == 3 and np.isfinite(learn.recorder.losses).all()
    assert not torch.equal(before["classifier.weight"], model.classifier.weight)


# --------------------------------------------------------------------------------------------
# The docs' table of groups per family is what split_model finds
# --------------------------------------------------------------------------------------------

BY_CLASS = {type(make()).__name__: make for make, *_ in FAMILIES.values()}


def _docs_table() -> list[list[str]]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "concepts.md").read_text()
    section = text.split("### Groups found for each family", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_the_docs_table_of_groups_per_family_is_what_split_model_finds() -> None:
    rows = _docs_table()
    assert {row[0].strip("`") for row in rows} == set(BY_CLASS)
    for name, layers, embeddings, head in rows:
        model = BY_CLASS[name.strip("`")]()
        groups = split_model(model)
        # A family whose layers moved between transformers versions lists both paths.
        paths = [path.format(i=0) for path in re.findall(r"`([^`]+)`", layers)]
        assert describe_group(model, groups[1]) in paths, name
        assert embeddings.strip("`") == describe_group(model, groups[0]), name
        assert head.split("` (")[0].strip("`") == describe_group(model, groups[-1]), name
