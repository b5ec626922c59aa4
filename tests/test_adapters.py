"""Adapter models (LoRA through Hugging Face ``peft``): layer groups, freezing, LoRA+, save, export.

Every model is a tiny random LLaMA-like one built from a config in the test (no downloads), checked
against ``peft``'s own objects: its trainable-parameter set and the LRs of its LoRA+ optimizer
(``create_loraplus_optimizer``). Skipped when peft or transformers is not installed (both come
with the [dev] extra).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from difflr import Learner, Stage, layer_decay, split_model
from difflr.groups.adapters import (
    check_lora_plus_ratio,
    has_adapters,
    lora_plus_scales,
    merged_copy,
)
from difflr.groups.layers import LayerGroup
from difflr.optim.param_groups import build_param_groups, read_hypers, write_hypers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB, SEQ = 64, 8
CONFIG = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "vocab_size": VOCAB,
    "pad_token_id": 0,
}


def base_classifier(seed: int = 0, attention_bias: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**CONFIG, num_labels=3, attention_bias=attention_bias)
    )


def lora_classifier(seed: int = 0, attention_bias: bool = False, **lora) -> nn.Module:
    """LoRA on the attention's q and v projections, the classifier head trained in full."""
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["score"],
        task_type="SEQ_CLS",
        **lora,
    )
    model = peft.get_peft_model(base_classifier(seed, attention_bias), config)
    # peft starts every B matrix at zero; give them values so that merging changes the weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def lora_lm(seed: int = 0) -> nn.Module:
    """A causal LM given LoRA adapters in place (what transformers' ``add_adapter`` does), the
    token embeddings included."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"])
    return peft.inject_adapter_in_model(config, model)


class Tokens(Dataset):
    """Token ids whose class is the first token modulo 3: dict batches with ``labels``."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.labels = self.ids[:, 0] % 3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(Tokens(64, 0), batch_size=16), DataLoader(Tokens(32, 1), batch_size=32)


def learner(model: nn.Module, tmp_path, **kwargs) -> Learner:
    kwargs = {
        "path": tmp_path,
        "logger": False,
        "enable_progress_bar": False,
        "checkpoint": False,
        **kwargs,
    }
    return Learner(model, loaders(), **kwargs)


def peft_trainable(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


# ------------------------------------------------------------------------------------------------
# Layer groups
# ------------------------------------------------------------------------------------------------


def test_a_peft_model_gets_its_base_models_groups_holding_that_blocks_adapters() -> None:
    model = lora_classifier()
    trainable = peft_trainable(model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = split_model(model)
    assert [g.name for g in groups] == [g.name for g in split_model(base_classifier())]
    assert [g.name for g in groups] == ["0.embeddings", "1.layer0", "2.layer1", "3.head"]
    # The trainable set is exactly peft's, each adapter in the group of its layer.
    assert {id(p) for g in groups for p in g.tunable} == trainable
    for k in (0, 1):
        tunable = [names[id(p)] for p in groups[1 + k].tunable]
        assert len(tunable) == 4
        assert all(f"layers.{k}.self_attn." in n and ".lora_" in n for n in tunable)
    assert (
        groups[0].tunable == ()
    )  # no adapter on the embeddings: the group stays, and never trains
    assert [names[id(p)] for p in groups[3].tunable] == [
        "base_model.model.score.modules_to_save.default.weight"
    ]
    # Every other parameter is a fixed base weight of its block.
    for g in groups:
        assert {id(p) for p in g.fixed} == {id(p) for p in g.params} - trainable


def test_adapters_added_in_place_are_grouped_like_the_base_model() -> None:
    model = lora_lm()
    assert has_adapters(model) and not has_adapters(base_classifier())
    groups = split_model(model)
    assert [g.name for g in groups] == ["0.embeddings", "1.layer0", "2.layer1", "3.head"]
    assert {id(p) for g in groups for p in g.tunable} == peft_trainable(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in groups[0].tunable) == [
        "model.embed_tokens.lora_embedding_A.default",
        "model.embed_tokens.lora_embedding_B.default",
    ]
    assert groups[3].tunable == ()  # lm_head and the final norm: base weights


def test_a_model_without_adapters_has_no_fixed_parameters() -> None:
    assert all(g.fixed == () for g in split_model(base_classifier()))


def test_summary_counts_adapters_and_frozen_base_weights_per_group(tmp_path) -> None:
    model = lora_classifier()
    learn = learner(model, tmp_path)
    lines = learn.summary().splitlines()
    assert lines[0].split()[:6] == ["group", "adapters", "base", "(frozen)", "trainable", "lr"]
    for group, line in zip(learn.splits, lines[1:5]):
        base = sum(p.numel() for p in group.fixed)
        adapters = sum(p.numel() for p in group.tunable)
        assert line.split()[:3] == [group.name, f"{adapters:,}", f"{base:,}"]
    assert lines[1].split()[3] == "no"  # the embeddings hold no adapter
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        sum(p.numel() for p in g.tunable) for g in learn.splits
    )


# ------------------------------------------------------------------------------------------------
# Freezing never trains the base weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_bn", [True, False])
def test_freezing_moves_only_adapters_and_unfreeze_is_peft_trainable_set(
    tmp_path, train_bn: bool
) -> None:
    model = lora_classifier()
    trainable = peft_trainable(model)
    learn = learner(model, tmp_path, train_bn=train_bn)
    learn.freeze()
    # The head alone: the classifier copy; the base RMSNorms stay frozen even with train_bn.
    assert peft_trainable(model) == {id(p) for p in learn.splits[3].tunable}
    learn.freeze_to(2)
    assert peft_trainable(model) == {id(p) for g in learn.splits[2:] for p in g.tunable}
    learn.unfreeze()
    assert peft_trainable(model) == trainable
    # A base weight unfrozen by hand is frozen again by the next pattern.
    model.base_model.model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    learn.freeze_to(1)
    assert peft_trainable(model) == trainable


def test_a_splitter_that_puts_base_weights_in_the_head_cannot_make_them_train(tmp_path) -> None:
    model = lora_classifier()
    trainable = peft_trainable(model)
    inner = model.base_model.model
    learn = learner(
        model,
        tmp_path,
        splitter=lambda m: {
            "body": inner.model.layers,
            "head": [inner.model.embed_tokens, inner.model.norm, inner.score],
        },
    )
    assert [g.name for g in learn.splits] == ["0.body", "1.head"]
    learn.freeze()
    assert peft_trainable(model) == {id(p) for p in inner.score.modules_to_save.parameters()}
    learn.unfreeze()
    assert peft_trainable(model) == trainable


def test_the_optimizer_holds_adapters_only(tmp_path) -> None:
    model = lora_classifier()
    learn = learner(model, tmp_path)
    held = {id(p) for pg in learn.opt.param_groups for p in pg["params"]}
    assert held == peft_trainable(model)
    # The embeddings group has no adapter: an empty param group keeps its index and LR.
    assert [pg["name"] for pg in learn.opt.param_groups if not pg["params"]] == ["0.embeddings"]
    assert len(read_hypers(learn.opt)[0]) == learn.n_groups


def test_base_weights_are_bit_identical_without_state_or_grad_after_any_sequence(tmp_path) -> None:
    model = lora_classifier()
    base = base_weights(model)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    learn = learner(model, tmp_path)
    learn.freeze()
    learn.fit_one_cycle(1, 1e-2)
    learn.lr_find(num_it=8, show_plot=False)
    learn.unfreeze()
    learn.fit_one_cycle(1, slice(1e-3, 1e-2))
    learn.fit_stages([Stage(freeze_to=-2, epochs=1, lr_max=layer_decay(1e-2, 0.5))])
    learn.lr_find(num_it=8, show_plot=False)
    named = dict(model.named_parameters())
    for name, before in base.items():
        p = named[name]
        assert torch.equal(p, before), name
        assert p.grad is None and not p.requires_grad, name
        assert p not in learn.opt.state, name
    # ...while the adapters did train.
    assert any(not torch.equal(named[n], v) for n, v in adapters.items())


# ------------------------------------------------------------------------------------------------
# LoRA+
# ------------------------------------------------------------------------------------------------


def per_parameter_lrs(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: pg["lr"] for pg in optimizer.param_groups for p in pg["params"]}


@pytest.mark.parametrize(
    ("make", "lora"),
    [
        (lora_classifier, {}),
        (lora_classifier, {"bias": "lora_only", "attention_bias": True}),
        (lora_lm, {}),
    ],
    ids=["classifier", "lora-biases", "embedding-adapters"],
)
@pytest.mark.parametrize("ratio", [16, 2.5])
def test_lora_plus_with_one_group_gives_peft_loraplus_optimizer_lrs(
    tmp_path, make, lora, ratio
) -> None:
    model = make(**lora)
    lr = 3e-4
    theirs = create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_lr_embedding=lr
    )
    learn = learner(model, tmp_path, splitter=lambda m: [m], lr=lr, lora_plus_ratio=ratio)
    ours = per_parameter_lrs(model, learn.opt)
    expected = per_parameter_lrs(model, theirs)
    assert ours.keys() == expected.keys()
    assert ours == pytest.approx(expected, rel=1e-12)
    assert {v for v in ours.values()} == {lr, lr * ratio}
    if lora:  # the LoRA biases are one-dimensional: peft gives them the ratio too
        assert any(n.endswith("bias") and v == lr * ratio for n, v in ours.items())


def test_lora_plus_keeps_its_ratio_in_every_group_through_one_cycle_and_lr_find(tmp_path) -> None:
    model = lora_classifier()
    learn = learner(model, tmp_path, lora_plus_ratio=16)
    seen: list[list[tuple[int, float, float | None]]] = []
    learn.opt.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(
            [(pg["layer_group"], pg["lr"], pg.get("lr_scale")) for pg in opt.param_groups]
        )
    )

    def check(recorded: np.ndarray) -> None:
        assert len(seen) == len(recorded) > 0
        for step, groups in zip(recorded, seen):
            for index, lr, scale in groups:
                expected = step[index] * (16 if scale is not None else 1)
                assert lr == pytest.approx(expected, rel=1e-12)
            assert {scale for _, _, scale in groups} == {None, 16.0}

    learn.unfreeze()
    learn.fit_one_cycle(2, slice(1e-4, 1e-2))
    # The recorder and the preview speak of each group's LR, not of the B matrices' multiple.
    preview = learn.preview_one_cycle(2, slice(1e-4, 1e-2))
    np.testing.assert_allclose(learn.recorder.lrs, preview.lrs, rtol=1e-12)
    assert learn.recorder.lrs[:, -1].max() == pytest.approx(1e-2)
    check(learn.recorder.lrs)
    seen.clear()
    learn.lr_find(start_lr=slice(1e-6, 1e-4), end_lr=slice(1e-2, 1), num_it=10, show_plot=False)
    check(learn.recorder.lrs)
    np.testing.assert_allclose(learn.recorder.lrs[:, 3] / learn.recorder.lrs[:, 1], 100 ** (2 / 3))


def test_hypers_with_an_lr_multiplier_closed_form() -> None:
    a, b, c = (nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    groups = [LayerGroup("0.body", (a, b)), LayerGroup("1.head", (c,))]
    model = nn.Module()
    model.a, model.b, model.c = a, b, c
    pgs = build_param_groups(model, groups, lr_scales={id(b): 4.0, id(c): 3.0})
    assert [(pg["name"], pg.get("lr_scale")) for pg in pgs] == [
        ("0.body", None),
        ("0.body/lr_x4", 4.0),
        ("1.head/lr_x3", 3.0),
    ]
    opt = torch.optim.SGD(pgs, lr=0.1, momentum=0.9)
    write_hypers(opt, np.array([0.01, 0.2]), np.array([0.8, 0.7]), key="momentum")
    assert [pg["lr"] for pg in opt.param_groups] == pytest.approx([0.01, 0.04, 0.6])
    lrs, moms = read_hypers(opt)
    # The head has only a multiplied param group: its LR is read back divided.
    np.testing.assert_allclose(lrs, [0.01, 0.2])
    np.testing.assert_allclose(moms, [0.8, 0.7])


# ------------------------------------------------------------------------------------------------
# Saving and exporting
# ------------------------------------------------------------------------------------------------


def test_save_writes_only_the_adapters_and_load_reads_them_back(tmp_path) -> None:
    model = lora_classifier()
    learn = learner(model, tmp_path)
    learn.fit_one_cycle(1, 1e-2)
    file = learn.save("adapters")
    saved = torch.load(file, weights_only=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved["model"]) == trainable
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert adapters * 4 < file.stat().st_size < total * 4  # float32: the adapters', not the model's
    assert saved["opt"]["state"]  # the adapters' optimizer state goes with them

    kept = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = base_weights(model)
    learn.fit_one_cycle(1, 1e-2)
    learn.load("adapters")
    for name, p in model.named_parameters():
        assert torch.equal(p, kept[name]), name
    assert all(torch.equal(dict(model.named_parameters())[n], v) for n, v in base.items())

    # Into a fresh peft model with other base weights: the adapters arrive, its base stays.
    other = lora_classifier(seed=1)
    other_base = base_weights(other)
    learner(other, tmp_path).load("adapters")
    named = dict(other.named_parameters())
    assert all(torch.equal(named[n], kept[n]) for n in trainable)
    assert all(torch.equal(named[n], v) for n, v in other_base.items())


def test_load_refuses_a_state_of_other_adapters_before_changing_anything(tmp_path) -> None:
    learner(lora_classifier(), tmp_path).save("r4")
    other = peft.get_peft_model(
        base_classifier(), peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS")
    )
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match=r"missing|unexpected"):
        learner(other, tmp_path).load("r4", with_opt=False)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())


def test_export_merges_the_adapters_on_a_copy(tmp_path) -> None:
    model = lora_classifier()
    learn = learner(model, tmp_path)
    kept = {n: p.detach().clone() for n, p in model.named_parameters()}
    exported = torch.load(learn.export(), weights_only=False)
    assert type(exported) is transformers.LlamaForSequenceClassification
    assert not has_adapters(exported)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in exported.named_parameters())
    ids = Tokens(8, 3).ids
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(
            exported(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5
        )
    # The Learner's model keeps its adapters, bit for bit.
    assert isinstance(learn.model, peft.PeftModel) and has_adapters(learn.model)
    assert all(torch.equal(p, kept[n]) for n, p in model.named_parameters())
    # Not merged on request: the peft model as it is.
    as_is = torch.load(learn.export("raw.pt", merge_adapters=False), weights_only=False)
    assert isinstance(as_is, peft.PeftModel)


def test_merging_adapters_added_in_place_gives_the_same_outputs() -> None:
    model = lora_lm()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.1)
    merged = merged_copy(model)
    assert type(merged) is transformers.LlamaForCausalLM and not has_adapters(merged)
    ids = Tokens(4, 5).ids
    model.eval()
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits)
    assert has_adapters(model)


def test_a_peft_model_inside_a_wrapper_is_merged_in_place_of_the_wrapper_child() -> None:
    wrapper = nn.Sequential(lora_classifier())
    merged = merged_copy(wrapper)
    assert type(merged[0]) is transformers.LlamaForSequenceClassification
    assert not has_adapters(merged) and has_adapters(wrapper)
    ids = Tokens(4, 6).ids
    wrapper.eval()
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged[0](input_ids=ids).logits, wrapper[0](input_ids=ids).logits
        )


def test_export_with_merge_adapters_on_a_plain_model_is_refused(tmp_path) -> None:
    learn = learner(base_classifier(), tmp_path)
    with pytest.raises(ValueError, match="no peft adapters"):
        learn.export(merge_adapters=True)
    assert not (tmp_path / "export.pt").exists()


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, -16, float("nan"), float("inf")])
def test_a_ratio_that_is_not_finite_and_positive_is_refused(ratio) -> None:
    with pytest.raises(ValueError, match=r"lora_plus_ratio=.*finite and above 0"):
        check_lora_plus_ratio(ratio)


@pytest.mark.parametrize("ratio", ["16", True, [16]])
def test_a_ratio_that_is_not_a_number_is_refused(ratio) -> None:
    with pytest.raises(TypeError, match="lora_plus_ratio must be a number"):
        check_lora_plus_ratio(ratio)


def test_lora_plus_on_a_model_without_lora_matrices_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="needs LoRA B matrices"):
        learner(base_classifier(), tmp_path, lora_plus_ratio=16)
    ia3 = peft.get_peft_model(
        base_classifier(),
        peft.IA3Config(
            target_modules=["v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            task_type="SEQ_CLS",
        ),
    )
    with pytest.raises(ValueError, match="adapters are of another method"):
        learner(ia3, tmp_path, lora_plus_ratio=16)


def test_lora_plus_without_peft_installed_says_which_extra(monkeypatch) -> None:
    import importlib.util

    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.delitem(sys.modules, name)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    model = base_classifier()
    with pytest.raises(ModuleNotFoundError, match=r'pip install "difflr\[peft\]"'):
        lora_plus_scales(model, split_model(model), 16.0)


def test_importing_difflr_does_not_import_peft() -> None:
    code = "import sys, difflr, difflr.learner; assert 'peft' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------------
# DDP
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)
def test_under_ddp_the_replicas_agree_and_the_base_weights_stay(tmp_path) -> None:
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, str(root / "tests" / "adapters_ddp_script.py"), str(tmp_path)],
        cwd=root,
        env=env,
        check=True,
        timeout=600,
        capture_output=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name in ranks[0]["end"]:
        assert torch.equal(ranks[0]["end"][name], ranks[1]["end"][name]), name
    end, start, trainable = ranks[0]["end"], ranks[0]["start"], set(ranks[0]["trainable"])
    for name in start:
        assert torch.equal(end[name], start[name]) == (name not in trainable), name
    assert set(ranks[0]["with_state"]) == trainable
