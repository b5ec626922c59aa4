"""Tests for difflr.training.module: batches as tuples or dicts, outputs as tensors or objects with
``.loss`` / ``.logits``, and a Learner fitting a plain model from dict batches (no transformers)."""

from __future__ import annotations

import doctest
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import difflr.training.module
from difflr import ClassificationInterpretation, Learner, accuracy
from difflr.training.module import (
    computes_own_loss,
    forward_batch,
    make_module,
    output_loss,
    output_preds,
    unpack_batch,
)
from tests.helpers import make_learner
from tests.test_lr_finder import _assert_same, _state

X = torch.arange(12.0).reshape(4, 3)
Y = torch.tensor([0, 1, 1, 0])


@dataclass
class Output:
    """The shape of a Hugging Face ModelOutput, without transformers."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class KwargsNet(nn.Module):
    """Takes keyword inputs like a Hugging Face model, returns an output object with .logits and,
    given ``labels``, its own loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, labels=None) -> Output:
        logits = self.head(self.body(x if scale is None else x * scale))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return Output(loss, logits)

    def model_splits(self) -> list[nn.Module]:
        return [self.body, self.head]


class DictData(Dataset):
    def __init__(self, n: int = 64, seed: int = 0, key: str = "labels") -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        self.key = key

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "scale": torch.ones(1), self.key: self.y[i]}


def _loaders(key: str = "labels") -> tuple[DataLoader, DataLoader]:
    return DataLoader(DictData(key=key), batch_size=16), DataLoader(DictData(32, 1), batch_size=16)


def _learner(tmp_path, loss_func=None, key: str = "labels", **kwargs) -> Learner:
    """A quiet Learner over `KwargsNet` (its own two groups) and dict batches."""
    return make_learner(
        tmp_path, KwargsNet(), _loaders(key), loss_func, splitter=None, checkpoint=False, **kwargs
    )


# --------------------------------------------------------------------------------------------
# Batches and outputs, without a Trainer
# --------------------------------------------------------------------------------------------


def test_a_tuple_batch_is_inputs_then_the_target() -> None:
    parts = unpack_batch((X, X, Y))
    assert parts.args == (X, X) and parts.kwargs == {} and parts.target == (Y,)


@pytest.mark.parametrize("key", ["labels", "label", "label_ids"])
def test_a_dict_batch_is_keyword_inputs_and_its_labels(key: str) -> None:
    parts = unpack_batch({"input_ids": X, "attention_mask": X, key: Y})
    assert parts.args == ()
    assert list(parts.kwargs) == ["input_ids", "attention_mask"]
    assert parts.target == (Y,)


def test_labels_is_preferred_when_a_batch_has_several_target_keys() -> None:
    parts = unpack_batch({"x": X, "label": Y + 1, "labels": Y})
    assert parts.target[0] is Y and list(parts.kwargs) == ["x", "label"]


def test_a_dict_without_labels_is_refused_only_when_a_target_is_needed() -> None:
    assert unpack_batch({"x": X}, need_target=False).target == ()
    with pytest.raises(TypeError, match=r"under 'labels'.*got dict\{'x': Tensor\(4, 3\)"):
        unpack_batch({"x": X})


def test_a_single_tensor_batch_keeps_its_message() -> None:
    with pytest.raises(TypeError, match=r"a batch must be a tuple \(inputs\.\.\., target\)"):
        unpack_batch(X)


def test_outputs_give_their_logits_and_loss_and_anything_else_is_passed_through() -> None:
    loss, logits = torch.tensor(0.5), torch.ones(2, 2)
    assert (
        output_preds(Output(loss, logits)) is logits and output_loss(Output(loss, logits)) is loss
    )
    assert output_preds({"logits": logits}) is logits and output_loss({"loss": loss}) is loss
    assert output_preds(logits) is logits and output_loss(logits) is None
    pair = (logits, logits)  # a custom model's tuple is for its own loss_func to read
    assert output_preds(pair) is pair and output_loss(pair) is None


def test_forward_batch_with_a_loss_func_calls_the_model_without_the_target() -> None:
    model = KwargsNet()
    step = forward_batch(model, {"x": X, "labels": Y}, F.cross_entropy)
    assert step.output.loss is None  # no labels= went in
    assert torch.equal(step.loss, F.cross_entropy(step.preds, Y))
    assert step.preds is step.output.logits and step.target == (Y,)


def test_forward_batch_without_a_loss_func_uses_the_models_own_loss() -> None:
    model = KwargsNet()
    step = forward_batch(model, {"x": X, "label": Y}, None)  # "label" goes in as labels=
    assert step.loss is step.output.loss
    assert torch.equal(step.loss, F.cross_entropy(step.preds, Y))
    # A tuple batch: inputs positionally, the target as labels=.
    assert torch.equal(forward_batch(model, (X, Y), None).loss, step.loss)


def test_a_model_that_returns_no_loss_says_what_to_do() -> None:
    with pytest.raises(
        TypeError, match=r"KwargsNet returned Output with no \.loss .*without labels"
    ):
        forward_batch(KwargsNet(), {"x": X}, None)

    class Plain(nn.Linear):
        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            return super().forward(x)

    with pytest.raises(TypeError, match=r"Plain returned Tensor with no \.loss when called with"):
        forward_batch(Plain(3, 2), (X, Y), None)


def test_an_error_in_the_model_names_how_it_was_called() -> None:
    with pytest.raises(TypeError, match=r"called as model\(\*\*batch\) on a batch dict\{'y'"):
        forward_batch(KwargsNet(), {"y": X, "labels": Y}, F.cross_entropy)
    with pytest.raises(RuntimeError, match=r"called as model\(\*batch\[:-1\]\) on a batch tuple"):
        forward_batch(nn.Linear(5, 2), (X, Y), F.cross_entropy)


def test_a_model_whose_forward_takes_labels_needs_no_loss_func() -> None:
    assert computes_own_loss(KwargsNet()) and not computes_own_loss(nn.Linear(2, 2))
    assert make_module(KwargsNet(), None, None, lambda: None).loss_func is None
    with pytest.raises(TypeError, match="needs a loss_func"):
        make_module(nn.Linear(2, 2), None, None, lambda: None)


# --------------------------------------------------------------------------------------------
# A Learner on dict batches
# --------------------------------------------------------------------------------------------


def test_a_learner_fits_dict_batches_with_the_models_own_loss(tmp_path) -> None:
    learn = _learner(tmp_path, key="label", metrics=accuracy)
    learn.freeze()
    learn.fit_one_cycle(1, 1e-2)
    first = learn.recorder.values[-1]["valid_loss"]
    learn.unfreeze()
    learn.fit_one_cycle(2, slice(1e-3, 1e-2))
    assert learn.recorder.lrs.shape == (8, 2)
    np.testing.assert_allclose(learn.recorder.lrs[:, 0] / learn.recorder.lrs[:, 1], 0.1)
    row = learn.recorder.values[-1]
    assert row["valid_loss"] < first and 0 <= row["accuracy"] <= 1  # it learned something


def test_the_valid_loss_is_the_models_own_loss_over_the_validation_set(tmp_path) -> None:
    learn = _learner(tmp_path)
    learn.fit(1, 1e-3)
    learn.model.eval()
    valid = DictData(32, 1)  # the validation loader's data, in its order: two batches of 16
    with torch.no_grad():
        losses = [
            learn.model(
                x=valid.x[i : i + 16], scale=torch.ones(16, 1), labels=valid.y[i : i + 16]
            ).loss
            for i in (0, 16)
        ]
    assert learn.recorder.values[-1]["valid_loss"] == pytest.approx(float(sum(losses) / 2), 1e-5)


def test_lr_find_on_dict_batches_restores_everything(tmp_path) -> None:
    learn = _learner(tmp_path)
    learn.fit_one_cycle(1, 1e-2)  # optimizer state and BatchNorm statistics to restore
    before = _state(learn)
    suggestion = learn.lr_find(num_it=12, show_plot=False)
    assert len(learn.recorder.losses) > 0 and suggestion.valley > 0
    _assert_same(before, _state(learn))


def test_get_preds_and_interpretation_read_the_labels_of_dict_batches_as_fit_does(tmp_path):
    learn = _learner(tmp_path, F.cross_entropy)
    learn.fit(1, 1e-3)
    valid = DictData(32, 1)  # the validation loader's data, in its order
    learn.model.eval()
    with torch.no_grad():
        logits = learn.model(x=valid.x, scale=torch.ones(32, 1)).logits
    inputs, preds, targets, losses = learn.get_preds(with_input=True, with_loss=True)
    assert torch.equal(targets, valid.y)
    torch.testing.assert_close(preds, logits.softmax(1))
    torch.testing.assert_close(losses, F.cross_entropy(logits, valid.y, reduction="none"))
    assert sorted(inputs) == ["scale", "x"]  # the inputs without the target
    interp = ClassificationInterpretation.from_learner(learn)
    assert torch.equal(interp.targs, valid.y)
    expected = np.zeros((2, 2), dtype=np.int64)
    np.add.at(expected, (valid.y.numpy(), logits.argmax(1).numpy()), 1)
    np.testing.assert_array_equal(interp.confusion_matrix(), expected)


def test_the_docstring_examples_run() -> None:
    results = doctest.testmod(difflr.training.module)
    assert results.attempted > 0 and results.failed == 0


def fit_with(tmp_path, **kwargs) -> None:
    learn = make_learner(tmp_path, **{"checkpoint": False, **kwargs})
    learn.fit(1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        (
            {"loss_func": lambda p, t: F.cross_entropy(p, t, reduction="none")},
            ValueError,
            r"is a tensor of shape \(16,\), one loss per item.*reduction='mean'",
        ),
        ({"loss_func": lambda p, t: 1.0}, TypeError, r"is a float \(1\.0\), not a tensor"),
        (
            {"metrics": lambda p, t: "good"},
            TypeError,
            r"metric 'metric0' returned 'good' \(str\); a metric must return a number",
        ),
    ],
)
def test_a_wrong_loss_or_metric_says_what_to_return(tmp_path, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        fit_with(tmp_path, **kwargs)


def test_a_loss_of_shape_one_trains_and_is_recorded_as_a_number(tmp_path):
    # A (1,) loss used to pass the check, then broke the recorder's epoch end.
    one = lambda p, t: F.cross_entropy(p, t).reshape(1)  # noqa: E731
    learn = make_learner(tmp_path, loss_func=one, checkpoint=False)
    learn.fit(2, 1e-3)
    assert learn.recorder.losses.shape == (len(learn.recorder.lrs),)
    assert np.isfinite(learn.recorder.losses).all()
    assert np.isfinite(learn.recorder.values[-1]["train_loss"])


def _wrong_metric(preds):  # one argument: metrics get (preds, targets)
    return 0.0


def test_a_metric_that_cannot_take_preds_and_targets_is_refused_before_training(tmp_path):
    with pytest.raises(
        TypeError, match=r"metric '_wrong_metric' has the signature _wrong_metric\(preds\)"
    ):
        make_learner(tmp_path, metrics=[_wrong_metric])
    make_learner(tmp_path, metrics=[lambda preds, targets, *rest: 0.0])  # accepted


@pytest.mark.parametrize(
    ("loss_func", "n_out", "words"),
    [
        (F.mse_loss, 3, r"regression loss got integer class labels.*F\.cross_entropy"),
        (F.cross_entropy, 2, r"labels go up to 2 but the model has 2 outputs; give its head 3"),
    ],
)
def test_a_loss_that_fails_names_the_shapes_the_loss_and_the_fix(tmp_path, loss_func, n_out, words):
    model = nn.Sequential(nn.Linear(6, n_out))
    learn = make_learner(tmp_path, model=model, loss_func=loss_func, splitter=None)
    with pytest.raises((RuntimeError, ValueError, IndexError)) as caught:
        learn.fit(1)
    message = str(caught.value)
    assert re.search(words, message), message
    assert (
        f"the loss {loss_func.__name__}(preds, target) failed on the model's output Tensor("
        in message
    )
    assert ":int64" in message and "torch said:" in message
