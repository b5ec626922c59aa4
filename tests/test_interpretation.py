"""ClassificationInterpretation and Interpretation: the confusion matrix is sklearn's on the
predictions, the top losses are torch's unreduced losses, and the figures draw those numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from difflr import ClassificationInterpretation, Interpretation, Learner
from tests.helpers import make_learner

# Several tests use a one-layer model on purpose: one layer group, which difflr warns about.
pytestmark = pytest.mark.filterwarnings("ignore:difflr found no layer groups")

N_CLASSES = 4
VOCAB = ["ant", "bee", "cat", "dog"]


def image_data(n: int = 60, seed: int = 0) -> TensorDataset:
    """``n`` one-channel 5x5 images in 4 classes, each class a bright quadrant, with noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    x = torch.randn(n, 1, 5, 5, generator=g)
    for i, label in enumerate(y.tolist()):
        row, col = divmod(label, 2)
        x[i, 0, row * 3 : row * 3 + 2, col * 3 : col * 3 + 2] += 1.5
    return TensorDataset(x, y)


def make_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(25, 8), nn.ReLU(), nn.Linear(8, N_CLASSES))


@pytest.fixture(scope="module")
def learn(tmp_path_factory) -> Learner:
    """A classifier trained a few steps, so that it is right about some items and wrong about
    others."""
    dataset = image_data()
    dl = DataLoader(dataset, batch_size=16)
    learn = make_learner(
        tmp_path_factory.mktemp("interp"),
        make_classifier(),
        (DataLoader(dataset, batch_size=16, shuffle=True), dl),
        splitter=None,
        vocab=VOCAB,
        checkpoint=False,
    )
    learn.fit_one_cycle(1, 3e-2)
    return learn


def by_hand(learn: Learner) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities, targets and per-item losses from a plain loop over the dataset."""
    x, y = learn.valid_dl.dataset.tensors
    with torch.no_grad():
        logits = learn.model.eval()(x)
    learn.model.train()
    return logits.softmax(1), y, F.cross_entropy(logits, y, reduction="none")


def test_the_confusion_matrix_is_sklearns_on_the_predictions(learn):
    interp = ClassificationInterpretation.from_learner(learn)
    probs, targets, _ = by_hand(learn)
    expected = confusion_matrix(targets, probs.argmax(1), labels=range(N_CLASSES))
    cm = interp.confusion_matrix()
    assert cm.dtype == np.int64 and cm.shape == (N_CLASSES, N_CLASSES)
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == len(targets)
    # The model is neither perfect nor hopeless here, so the checks below see something.
    assert 0 < np.trace(cm) < cm.sum()
    assert (cm - np.diag(np.diag(cm)) > 0).sum() >= 2
    torch.testing.assert_close(interp.preds, probs)
    assert torch.equal(interp.decoded, probs.argmax(1))


def test_an_act_that_is_not_callable_is_refused_before_predicting(learn, monkeypatch):
    def no_pass(*args, **kwargs):
        raise AssertionError("the prediction pass ran")

    monkeypatch.setattr(learn.runner, "predict", no_pass)
    with pytest.raises(TypeError, match="act"):
        ClassificationInterpretation.from_learner(learn, act="softmax")


def test_most_confused_lists_the_off_diagonal_cells_by_count(learn):
    interp = ClassificationInterpretation.from_learner(learn)
    cm = interp.confusion_matrix()
    cells = [
        (VOCAB[i], VOCAB[j], int(cm[i, j]))
        for i in range(N_CLASSES)
        for j in range(N_CLASSES)
        if i != j and cm[i, j] >= 1
    ]
    listed = interp.most_confused()
    assert sorted(listed) == sorted(cells)
    assert [count for *_, count in listed] == sorted((c for *_, c in cells), reverse=True)
    top = listed[0][2]
    assert interp.most_confused(min_val=top) == [c for c in listed if c[2] >= top]
    assert interp.most_confused(min_val=cm.max() + 1) == []
    with pytest.raises(ValueError, match="min_val"):
        interp.most_confused(min_val=-1)


def test_top_losses_are_the_largest_unreduced_losses(learn):
    interp = ClassificationInterpretation.from_learner(learn)
    _, _, losses = by_hand(learn)
    values, indices = interp.top_losses(5)
    expected = losses.topk(5)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(indices, expected.indices)
    assert torch.equal(interp.top_losses().indices, losses.argsort(descending=True))
    smallest = interp.top_losses(3, largest=False)
    assert torch.equal(smallest.indices, losses.argsort()[:3])
    assert len(interp.top_losses(1000).values) == len(losses)  # at most every item


def test_plot_confusion_matrix_draws_the_counts_or_the_fractions(learn):
    interp = ClassificationInterpretation.from_learner(learn)
    cm = interp.confusion_matrix()
    fig = interp.plot_confusion_matrix()
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), cm)
    assert [t.get_text() for t in ax.texts] == [str(v) for v in cm.flatten()]
    assert [t.get_text() for t in ax.get_xticklabels()] == VOCAB
    assert [t.get_text() for t in ax.get_yticklabels()] == VOCAB
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Predicted", "Actual")

    fig = interp.plot_confusion_matrix(normalize=True, norm_dec=3)
    fractions = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(fractions, cm / cm.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(fractions.sum(axis=1), 1.0)
    assert fig.axes[0].texts[0].get_text() == f"{fractions[0, 0]:.3f}"


def test_plot_top_losses_shows_the_images_with_prediction_actual_loss_probability(learn):
    interp = ClassificationInterpretation.from_learner(learn)
    probs, targets, losses = by_hand(learn)
    x = learn.valid_dl.dataset.tensors[0]
    fig = interp.plot_top_losses(5)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 5
    for ax, i in zip(shown, losses.topk(5).indices.tolist()):
        predicted = int(probs[i].argmax())
        assert ax.get_title() == (
            f"{VOCAB[predicted]} / {VOCAB[int(targets[i])]}\n"
            f"{losses[i]:.2f} / {probs[i, predicted]:.2f}"
        )
        image = x[i, 0].numpy()
        rescaled = (image - image.min()) / (image.max() - image.min())
        np.testing.assert_allclose(ax.images[0].get_array(), rescaled, rtol=1e-6, atol=1e-6)
    assert fig._suptitle.get_text() == "prediction / actual / loss / probability"


def test_plot_top_losses_of_inputs_that_are_not_images_is_a_bar_chart(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    learn = make_learner(tmp_path, model, (dl, dl), splitter=None)
    interp = ClassificationInterpretation.from_learner(learn)
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none")
    fig = interp.plot_top_losses(4)
    bars = fig.axes[0].patches
    np.testing.assert_allclose([b.get_width() for b in bars], losses.topk(4).values, rtol=1e-6)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert [label.split(":")[0] for label in labels] == [
        f"item {i}" for i in losses.topk(4).indices.tolist()
    ]
    assert interp.vocab is None and interp.most_confused()[0][0] in range(3)  # indices


class Stream(IterableDataset):
    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)


def test_inputs_of_a_stream_are_kept_so_its_images_can_be_shown(learn):
    stream = DataLoader(Stream(learn.valid_dl.dataset), batch_size=16)
    interp = ClassificationInterpretation.from_learner(learn, stream)
    assert torch.equal(interp.inputs, learn.valid_dl.dataset.tensors[0])
    kept = ClassificationInterpretation.from_learner(learn)
    assert kept.inputs is None  # read back from the dataset by index instead
    assert len([ax for ax in interp.plot_top_losses(2).axes if ax.images]) == 2


def test_a_regression_model_is_told_to_use_interpretation(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, generator=g), torch.randn(24, 2, generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    model = nn.Linear(6, 2)
    learn = make_learner(tmp_path, model, (dl, dl), F.mse_loss, splitter=None)
    with pytest.raises(ValueError, match=r"float32.*Interpretation\.from_learner\(learn\)"):
        ClassificationInterpretation.from_learner(learn)
    interp = Interpretation.from_learner(learn)
    with torch.no_grad():
        losses = F.mse_loss(model(x), y, reduction="none").mean(1)
    values, indices = interp.top_losses(3)
    torch.testing.assert_close(values, losses.topk(3).values)
    assert torch.equal(indices, losses.topk(3).indices)
    assert len(interp.plot_top_losses(3).axes[0].patches) == 3


def test_a_vocab_of_the_wrong_length_or_targets_out_of_range_are_refused():
    probs = torch.full((4, 3), 1 / 3)
    losses = torch.ones(4)
    with pytest.raises(ValueError, match="vocab has 2 names but the model gives 3"):
        ClassificationInterpretation(probs, torch.tensor([0, 1, 2, 0]), losses, vocab=["a", "b"])
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\); got values from 0 to 5"):
        ClassificationInterpretation(probs, torch.tensor([0, 1, 5, 0]), losses)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    interp = ClassificationInterpretation(logits, torch.tensor([0, 1]), torch.ones(2))
    torch.testing.assert_close(interp.preds, logits.softmax(1))  # scores become probabilities
