"""After the fit: validate, get_preds and predict agree with computations done by hand (a no-grad
loop in eval mode, torch's unreduced losses), in dataset order, and leave the Learner as it was."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset

from difflr import Learner, accuracy
from difflr.training.activations import (
    activation_for,
    exp_of_log_probs,
    identity,
    per_item_loss,
    sigmoid,
    softmax_over_classes,
)
from difflr.training.loaders import sequential_loader
from tests import helpers
from tests.helpers import make_loaders, make_model

# Several tests use a one-layer model on purpose: one layer group, which difflr warns about.
pytestmark = pytest.mark.filterwarnings("ignore:difflr found no layer groups")


def make_learner(data, learner_kwargs, loss_func=F.cross_entropy, model=None, **kwargs) -> Learner:
    """A quiet Learner with the accuracy metric (``metrics=None``: none)."""
    options = {"metrics": accuracy, **learner_kwargs, **kwargs}
    return helpers.make_learner(model=model, data=data, loss_func=loss_func, **options)


def eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs in eval mode, without a gradient, on a copy (the model is not touched)."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).eval()(x)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


# --------------------------------------------------------------------------------- validate
def test_validate_is_the_mean_loss_of_a_no_grad_loop_in_eval_mode(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    learn.module.train()  # as a fit leaves it: BatchNorm would use batch statistics
    before = snapshot(learn.model)
    result = learn.validate()

    y = loaders[1].dataset.tensors[1]
    model = learn.model
    total, correct = 0.0, 0
    model.eval()
    with torch.no_grad():
        for xb, yb in loaders[1]:
            out = model(xb)
            total += F.cross_entropy(out, yb, reduction="sum").item()
            correct += (out.argmax(1) == yb).sum().item()
    model.train()
    assert list(result) == ["valid_loss", "accuracy"]
    assert result["valid_loss"] == pytest.approx(total / len(y), rel=1e-6)
    assert result["accuracy"] == pytest.approx(correct / len(y))
    # Eval mode during the pass (running statistics untouched), the train mode given back.
    assert_same_state(before, learn.model)
    assert all(m.training for m in learn.model.modules())


def test_after_a_fit_validate_is_the_epoch_tables_last_row_and_changes_no_record(loaders, tmp_path):
    learn = helpers.make_learner(
        tmp_path, data=loaders, metrics=accuracy, logger=True, checkpoint=False
    )
    learn.fit_one_cycle(2, 1e-2)
    rec = learn.recorder
    recorded = (rec.lrs.copy(), rec.losses.copy(), [dict(r) for r in rec.values], rec.boundaries[:])
    offsets = (learn.logger.step_offset, learn.logger.epoch_offset)
    files = {p: p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()}
    assert any("tfevents" in p.name for p in files)

    result = learn.validate()
    learn.get_preds(with_loss=True)
    learn.logger.experiment.flush()

    row = rec.values[-1]
    assert result == {
        "valid_loss": pytest.approx(row["valid_loss"], rel=1e-6),
        "accuracy": pytest.approx(row["accuracy"]),
    }
    # Not a point of the training curves: no row, no step, no event written.
    np.testing.assert_array_equal(rec.lrs, recorded[0])
    np.testing.assert_array_equal(rec.losses, recorded[1])
    assert rec.values == recorded[2] and rec.boundaries == recorded[3]
    assert (learn.logger.step_offset, learn.logger.epoch_offset) == offsets
    assert {p: p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()} == files


def test_validate_counts_every_item_of_a_drop_last_loader_once(learner_kwargs):
    train_dl, _ = make_loaders()
    x, y = train_dl.dataset.tensors
    dl = DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16, shuffle=True, drop_last=True)
    learn = make_learner((train_dl, None), learner_kwargs)
    result = learn.validate(dl)
    expected = F.cross_entropy(eval_outputs(learn.model, x[:50]), y[:50]).item()
    assert result["valid_loss"] == pytest.approx(expected, rel=1e-6)
    assert dl.drop_last and len(dl) == 3  # the loader given is left as it was


def test_without_a_validation_set_validate_and_get_preds_say_how_to_give_one(learner_kwargs):
    train_dl, _ = make_loaders()
    learn = make_learner((train_dl, None), learner_kwargs)
    for call in (learn.validate, learn.get_preds):
        with pytest.raises(ValueError, match=r"dl=.*\(train_dl, valid_dl\)"):
            call()
    empty = DataLoader(TensorDataset(torch.zeros(0, 6), torch.zeros(0).long()), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        learn.validate(empty)
    with pytest.raises(ValueError, match="empty"):
        learn.get_preds(empty)
    with pytest.raises(TypeError, match="DataLoader"):
        learn.get_preds(torch.zeros(4, 6))


# --------------------------------------------------------------------------------- get_preds
def test_get_preds_returns_every_item_once_in_dataset_order(learner_kwargs):
    loaders = make_loaders(n=50)
    x, y = loaders[0].dataset.tensors
    learn = make_learner(loaders, learner_kwargs)
    learn.module.train()
    before = snapshot(learn.model)
    # Shuffled, dropping its last incomplete batch: rebuilt in order, without dropping.
    dl = DataLoader(loaders[0].dataset, batch_size=16, shuffle=True, drop_last=True)
    inputs, preds, targets, losses = learn.get_preds(dl, with_input=True, with_loss=True)

    outputs = eval_outputs(learn.model, x)
    assert torch.equal(inputs, x) and torch.equal(targets, y)
    torch.testing.assert_close(preds, outputs.softmax(dim=1))
    torch.testing.assert_close(losses, F.cross_entropy(outputs, y, reduction="none"))
    # Nothing to backpropagate, nothing changed.
    assert not preds.requires_grad and preds.grad_fn is None
    assert all(p.grad is None for p in learn.model.parameters())
    assert_same_state(before, learn.model)
    assert all(m.training for m in learn.model.modules())


def test_get_preds_without_dl_reads_the_validation_set_and_act_replaces_the_softmax(
    loaders, learner_kwargs
):
    learn = make_learner(loaders, learner_kwargs)
    x, y = loaders[1].dataset.tensors
    preds, targets = learn.get_preds(act=lambda out: out * 2)
    torch.testing.assert_close(preds, eval_outputs(learn.model, x) * 2)
    assert torch.equal(targets, y)


def test_get_preds_of_batches_without_targets(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    preds, targets = learn.get_preds(DataLoader(TensorDataset(x), batch_size=4))
    torch.testing.assert_close(preds, eval_outputs(learn.model, x).softmax(1))
    assert targets is None
    with pytest.raises(ValueError, match="no target"):
        learn.get_preds(DataLoader(TensorDataset(x), batch_size=4), with_loss=True)


class Stream(IterableDataset):
    """Items in a fixed order that is not the order of any index."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, order: list[int]) -> None:
        self.x, self.y, self.order = x, y, order

    def __iter__(self):
        return ((self.x[i], self.y[i]) for i in self.order)


def test_get_preds_of_an_iterable_dataset_keeps_its_order(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    x, y = loaders[1].dataset.tensors
    order = list(range(len(x)))[::-1]
    preds, targets = learn.get_preds(DataLoader(Stream(x, y, order), batch_size=10))
    assert torch.equal(targets, y[order])
    torch.testing.assert_close(preds, eval_outputs(learn.model, x[order]).softmax(1))


class Backwards(torch.utils.data.Sampler):
    """A batch sampler that visits the items last to first, in batches of 10."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        order = list(range(self.n))[::-1]
        return iter([order[i : i + 10] for i in range(0, self.n, 10)])

    def __len__(self) -> int:
        return math.ceil(self.n / 10)


@pytest.mark.filterwarnings("ignore:You are using a custom batch sampler")
def test_get_preds_puts_the_items_of_a_custom_batch_sampler_back_in_dataset_order(
    loaders, learner_kwargs
):
    learn = make_learner(loaders, learner_kwargs)
    dataset = loaders[1].dataset
    x, y = dataset.tensors
    inputs, preds, targets = learn.get_preds(
        DataLoader(dataset, batch_sampler=Backwards(len(dataset))), with_input=True
    )
    assert torch.equal(inputs, x) and torch.equal(targets, y)
    torch.testing.assert_close(preds, eval_outputs(learn.model, x).softmax(1))


class SkipFirst(torch.utils.data.Sampler):
    """A batch sampler that never yields item 0."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter([list(range(1, self.n))])

    def __len__(self) -> int:
        return 1


@pytest.mark.filterwarnings("ignore:You are using a custom batch sampler")
def test_get_preds_refuses_a_loader_that_skips_items(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    dataset = loaders[1].dataset
    dl = DataLoader(dataset, batch_sampler=SkipFirst(len(dataset)))
    with pytest.raises(ValueError, match=r"95 distinct items of a dataset of 96 \(1 never came"):
        learn.get_preds(dl)


# --------------------------------------------------------------------------------- loaders
def test_a_shuffling_or_drop_last_loader_is_rebuilt_with_its_other_arguments():
    def collate(items):
        return torch.stack([x for (x,) in items]) * 10

    dataset = TensorDataset(torch.arange(10.0))
    loader = DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True, collate_fn=collate)
    rebuilt = sequential_loader(loader)
    assert rebuilt is not loader and rebuilt.batch_size == 4 and rebuilt.collate_fn is collate
    assert [b.tolist() for b in rebuilt] == [[0, 10, 20, 30], [40, 50, 60, 70], [80, 90]]
    in_order = DataLoader(dataset, batch_size=4)
    assert sequential_loader(in_order) is in_order


def test_a_shuffling_dataloader_subclass_is_refused_with_the_reason():
    class MyLoader(DataLoader):
        pass

    loader = MyLoader(TensorDataset(torch.arange(10.0)), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match=r"MyLoader, a DataLoader subclass that samples with a "):
        sequential_loader(loader)
    kept = MyLoader(TensorDataset(torch.arange(10.0)), batch_size=4)
    assert sequential_loader(kept) is kept


# --------------------------------------------------------------------------------- activations
@pytest.mark.parametrize(
    ("loss_func", "expected"),
    [
        (F.cross_entropy, softmax_over_classes),
        (nn.CrossEntropyLoss(label_smoothing=0.1), softmax_over_classes),
        (functools.partial(F.cross_entropy, label_smoothing=0.1), softmax_over_classes),
        (F.binary_cross_entropy_with_logits, sigmoid),
        (nn.BCEWithLogitsLoss(), sigmoid),
        (F.nll_loss, exp_of_log_probs),
        (nn.NLLLoss(), exp_of_log_probs),
        (F.mse_loss, identity),
        (lambda preds, target: F.cross_entropy(preds, target), identity),
        (None, identity),
    ],
)
def test_the_default_activation_follows_the_loss(loss_func, expected):
    assert activation_for(loss_func) is expected


def test_a_loss_with_its_own_activation_attribute_gets_it():
    class Loss:
        activation = staticmethod(torch.tanh)

        def __call__(self, preds, target):
            return F.mse_loss(torch.tanh(preds), target)

    assert activation_for(Loss()) is torch.tanh


def test_the_activations_give_probabilities():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(softmax_over_classes(logits).sum(1), torch.ones(2))
    torch.testing.assert_close(exp_of_log_probs(logits.log_softmax(1)), logits.softmax(1))
    seg = torch.randn(2, 4, 3, 3)  # (N, C, H, W): classes on dim 1
    torch.testing.assert_close(softmax_over_classes(seg).sum(1), torch.ones(2, 3, 3))


# --------------------------------------------------------------------------------- per-item losses
def by_hand(loss_func, preds, target) -> torch.Tensor:
    """Each item's loss as a batch of one."""
    return torch.stack([loss_func(preds[i : i + 1], target[i : i + 1]) for i in range(len(preds))])


def test_per_item_losses_of_every_kind_of_loss_function():
    g = torch.Generator().manual_seed(0)
    logits, classes = torch.randn(7, 4, generator=g), torch.randint(0, 4, (7,), generator=g)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    calls = []

    def own(preds, target):  # no `reduction` argument
        calls.append(len(preds))
        return F.cross_entropy(preds, target) + preds.pow(2).mean()

    for loss_func in (F.cross_entropy, functools.partial(F.cross_entropy, label_smoothing=0.2)):
        torch.testing.assert_close(
            per_item_loss(loss_func, logits, (classes,)), by_hand(loss_func, logits, classes)
        )
    # The module's weight applies per item; the user's module keeps its reduction.
    expected = F.cross_entropy(logits, classes, weight=weighted.weight, reduction="none")
    torch.testing.assert_close(per_item_loss(weighted, logits, (classes,)), expected)
    assert weighted.reduction == "mean"
    torch.testing.assert_close(
        per_item_loss(own, logits, (classes,)), by_hand(own, logits, classes)
    )
    assert calls[:7] == [1] * 7  # called once per item
    # A loss over several outputs per item: the item's mean, as its batch of one gives.
    values, goal = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    torch.testing.assert_close(
        per_item_loss(F.mse_loss, values, (goal,)), by_hand(F.mse_loss, values, goal)
    )
    pixels, masks = (
        torch.randn(2, 4, 3, 3, generator=g),
        torch.randint(0, 4, (2, 3, 3), generator=g),
    )
    torch.testing.assert_close(
        per_item_loss(F.cross_entropy, pixels, (masks,)), by_hand(F.cross_entropy, pixels, masks)
    )


def test_a_loss_that_is_not_one_number_per_batch_is_refused():
    def vector_loss(preds, target):
        return (preds - target).abs()

    with pytest.raises(ValueError, match=r"Tensor\(1, 3\) for a batch of one"):
        per_item_loss(vector_loss, torch.zeros(2, 3), (torch.ones(2, 3),))


def test_get_preds_with_a_loss_function_without_reduction(loaders, learner_kwargs):
    def loss(preds, target):
        return F.cross_entropy(preds, target) * 2

    learn = make_learner(loaders, learner_kwargs, loss_func=loss)
    x, y = loaders[1].dataset.tensors
    preds, targets, losses = learn.get_preds(with_loss=True)
    outputs = eval_outputs(learn.model, x)
    assert torch.equal(targets, y)
    torch.testing.assert_close(losses, 2 * F.cross_entropy(outputs, y, reduction="none"))
    torch.testing.assert_close(preds, outputs)  # an unknown loss: no activation


def test_get_preds_with_binary_cross_entropy_gives_sigmoids(learner_kwargs):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 6, generator=g), (torch.rand(20, 3, generator=g) > 0.5).float()
    dl = DataLoader(TensorDataset(x, y), batch_size=8)
    learn = make_learner((dl, dl), learner_kwargs, nn.BCEWithLogitsLoss(), metrics=None)
    preds, targets, losses = learn.get_preds(with_loss=True)
    outputs = eval_outputs(learn.model, x)
    assert torch.equal(targets, y)
    torch.testing.assert_close(preds, torch.sigmoid(outputs))
    expected = F.binary_cross_entropy_with_logits(outputs, y, reduction="none").mean(1)
    torch.testing.assert_close(losses, expected)


# --------------------------------------------------------------------------------- LightningModule
class Classifier(pl.LightningModule):
    """A user's module: (x, y) batches, its own validation_step and names."""

    def __init__(self, with_predict_step: bool = False, with_loss_func: bool = True) -> None:
        super().__init__()
        self.net = make_model()
        self.with_predict_step = with_predict_step
        if with_loss_func:
            self.loss_func = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class WithPredictStep(Classifier):
    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self(x) + 100.0  # recognisably its own


@pytest.mark.filterwarnings("ignore:.*configure_optimizers is superseded")
def test_a_lightning_module_predicts_with_its_forward_or_its_own_predict_step(
    loaders, learner_kwargs
):
    x, y = loaders[1].dataset.tensors
    plain = make_learner(loaders, learner_kwargs, None, Classifier(), splitter=None, metrics=None)
    outputs = eval_outputs(plain.model, x)
    preds, targets, losses = plain.get_preds(with_loss=True)
    torch.testing.assert_close(preds, outputs.softmax(1))  # its loss_func is cross-entropy
    torch.testing.assert_close(losses, F.cross_entropy(outputs, y, reduction="none"))
    assert torch.equal(targets, y)
    assert plain.validate() == {"val_loss": pytest.approx(F.cross_entropy(outputs, y).item())}
    assert "predict_step" not in vars(plain.model)  # the forward shim is gone

    own = make_learner(
        loaders, learner_kwargs, None, WithPredictStep(), splitter=None, metrics=None
    )
    preds, _ = own.get_preds(act=identity)
    torch.testing.assert_close(preds, eval_outputs(own.model, x) + 100.0)


@pytest.mark.filterwarnings("ignore:.*configure_optimizers is superseded")
def test_per_item_losses_of_a_lightning_module_need_its_loss_func(loaders, learner_kwargs):
    learn = make_learner(
        loaders, learner_kwargs, None, Classifier(with_loss_func=False), splitter=None, metrics=None
    )
    with pytest.raises(TypeError, match=r"loss_func attribute"):
        learn.get_preds(with_loss=True)
    preds, _ = learn.get_preds()  # without a loss: no activation
    torch.testing.assert_close(preds, eval_outputs(learn.model, loaders[1].dataset.tensors[0]))


class ValidDataModule(pl.LightningDataModule):
    """Builds its datasets in setup, as datamodules do."""

    classes = ("low", "mid", "high")

    def setup(self, stage: str) -> None:
        self.train_set, self.valid_set = (dl.dataset for dl in make_loaders())

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.valid_set, batch_size=32)


def test_a_datamodules_validation_set_and_class_names_are_used(learner_kwargs):
    learn = make_learner(ValidDataModule(), learner_kwargs, metrics=None)
    assert learn.vocab == ["low", "mid", "high"]
    x, y = make_loaders()[1].dataset.tensors
    outputs = eval_outputs(learn.model, x)
    preds, targets = learn.get_preds()
    torch.testing.assert_close(preds, outputs.softmax(1))
    assert torch.equal(targets, y)
    assert learn.validate()["valid_loss"] == pytest.approx(F.cross_entropy(outputs, y).item())


# --------------------------------------------------------------------------------- predict
def test_predict_one_item_and_a_batch_in_eval_mode_with_class_names(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs, vocab=["low", "mid", "high"])
    learn.module.train()
    before = snapshot(learn.model)
    x = loaders[1].dataset.tensors[0][:5]
    probs = eval_outputs(learn.model, x).softmax(1)
    names = [["low", "mid", "high"][int(i)] for i in probs.argmax(1)]

    decoded, index, p = learn.predict(x[2])
    assert decoded == names[2] and index.ndim == 0 and int(index) == int(probs[2].argmax())
    torch.testing.assert_close(p, probs[2])
    decoded, index, p = learn.predict(x)
    assert decoded == names and torch.equal(index, probs.argmax(1))
    torch.testing.assert_close(p, probs)
    assert not p.requires_grad
    assert_same_state(before, learn.model)  # eval mode: BatchNorm's statistics untouched
    assert all(m.training for m in learn.model.modules())


def test_predict_without_a_vocab_gives_indices_and_a_regression_its_raw_output(learner_kwargs):
    train_dl, valid_dl = make_loaders()
    learn = make_learner((train_dl, valid_dl), learner_kwargs)
    x = valid_dl.dataset.tensors[0][0]
    decoded, index, _ = learn.predict(x)
    assert decoded == int(index) and isinstance(decoded, int)

    x_all = valid_dl.dataset.tensors[0]
    regression = DataLoader(TensorDataset(x_all, torch.randn(len(x_all), 3)), batch_size=16)
    reg = make_learner((regression, regression), learner_kwargs, F.mse_loss, metrics=None)
    torch.testing.assert_close(reg.predict(x), eval_outputs(reg.model, x[None])[0])
    torch.testing.assert_close(reg.predict(x_all[:4]), eval_outputs(reg.model, x_all[:4]))


def test_predict_with_binary_cross_entropy_lists_the_labels_above_one_half(learner_kwargs):
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(3))
    dl = DataLoader(TensorDataset(x, torch.zeros(12, 3)), batch_size=4)
    learn = make_learner(
        (dl, dl), learner_kwargs, nn.BCEWithLogitsLoss(), vocab=["a", "b", "c"], metrics=None
    )
    probs = torch.sigmoid(eval_outputs(learn.model, x))
    decoded, mask, p = learn.predict(x)
    torch.testing.assert_close(p, probs)
    assert torch.equal(mask, probs > 0.5)
    assert decoded == [[n for n, on in zip("abc", row) if on] for row in (probs > 0.5).tolist()]


def test_predict_refuses_what_it_cannot_read(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 6\).*items have shape \(6,\)"):
        learn.predict(torch.zeros(2, 3, 6))
    with pytest.raises(TypeError, match="is_batch"):
        learn.predict(torch.zeros(6), is_batch="yes")
    learn.vocab = ["only", "two"]
    with pytest.raises(ValueError, match="vocab has 2 names but the model gives 3"):
        learn.predict(torch.zeros(6))
    streaming = make_learner(
        (DataLoader(Stream(*loaders[0].dataset.tensors, [0, 1])), None), learner_kwargs
    )
    with pytest.raises(ValueError, match="pass is_batch=True or False"):
        streaming.predict(torch.zeros(6))
    assert streaming.predict(torch.zeros(1, 6), is_batch=True)[1].shape == (1,)


# --------------------------------------------------------------------------------- vocab
def test_vocab_is_found_in_the_dataset_and_checked_when_set(loaders, learner_kwargs):
    dataset = loaders[1].dataset
    dataset.classes = ["low", "mid", "high"]
    try:
        subset = DataLoader(Subset(dataset, range(10)), batch_size=4)
        learn = make_learner((loaders[0], subset), learner_kwargs)
        assert learn.vocab == ["low", "mid", "high"]  # through the Subset
        learn.vocab = ("a", "b", "c")
        assert learn.vocab == ["a", "b", "c"]
        learn.vocab = None
        assert learn.vocab == ["low", "mid", "high"]
    finally:
        del dataset.classes
    assert make_learner(loaders, learner_kwargs).vocab is None
    with pytest.raises(TypeError, match="sequence of class names"):
        learn.vocab = "abc"
    with pytest.raises(ValueError, match="repeats a name"):
        learn.vocab = ["a", "a", "b"]
    with pytest.raises(TypeError, match="sequence of class names"):
        make_learner(loaders, learner_kwargs, vocab={0: "a"})
