"""LoRA on convolutions (Conv1d/2d/3d), against PEFT 0.21's ``lora.Conv1d/2d/3d``.

PEFT wraps a deep copy with the same ``LoraConfig`` (``init_lora_weights=False``, so neither
matrix is zero); its tensors are copied into peftc, then outputs, gradients, trainable counts,
merge and checkpoints (both ways) are compared. The models: a small module with every
convolution form (1-, 2- and 3-D, stride, ``padding="same"``, groups, a pointwise kernel), and
a tiny transformers ResNet built from its config.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import OneModule, assert_unchanged, copy_peft_weights, snapshot
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

import peftc
from peftc.errors import MergeError, RuleError


class Convs(nn.Module):
    """Every convolution form PEFT's LoRA takes; ``groups=2`` at ``grouped`` unless told otherwise."""

    def __init__(self, groups: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding="same", groups=groups, bias=False)
        self.point = nn.Conv2d(4, 6, 1)
        self.c3 = nn.Conv3d(3, 4, (1, 2, 2), stride=(1, 2, 1))

    def forward(self, a, b, c):
        return (self.c1(a).flatten(1), self.point(torch.tanh(self.grouped(self.c2(b)))).flatten(1),
                self.c3(c).flatten(1))


TARGETS = ["c1", "c2", "grouped", "point", "c3"]


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 8, generator=g), torch.randn(batch, 3, 8, 8, generator=g),
            torch.randn(batch, 3, 3, 4, 4, generator=g))


def build(model: nn.Module, config: LoraConfig, example, training: bool = False):
    """``(peftc, PEFT)`` models of ``model`` with ``config``, peftc holding PEFT's tensors."""
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).train(training)
    cm = peftc.compile(model, config, example_inputs=example, backend="eager").train(training)
    copy_peft_weights(cm, pm)
    return cm, pm


def outputs(model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(*x)
    out = getattr(out, "logits", out)
    return torch.cat(out, 1) if isinstance(out, tuple) else out


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def pair():
    with pytest.warns(UserWarning, match="groups > 1"):  # PEFT's warning: no merge there
        return build(Convs(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                     inputs())


def test_sites_shapes_counts_and_outputs(pair):
    cm, pm = pair
    assert sorted(p.path for p in cm.sites) == sorted(TARGETS)
    assert {p.site.kind for p in cm.sites} == {"convolution"}
    sd = pm.state_dict()
    for p in cm.sites:  # PEFT's lora_A [r, in, *kernel] and pointwise lora_B [out, r / groups, 1...]
        for name, t in p.state.named_parameters():
            assert t.shape == sd[f"base_model.model.{p.path}.{name}.default.weight"].shape, (p.path, name)
    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    x = inputs(batch=3, seed=2)
    with pm.disable_adapter():
        base = outputs(pm, x)
    want = outputs(pm, x)
    assert (want - base).abs().max() > 1e-2  # the adapters matter
    close(outputs(cm, x), want)


def test_gradients_equal_peft():
    with pytest.warns(UserWarning, match="groups > 1"):
        cm, pm = build(Convs(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                       inputs(), training=True)
    x = inputs(batch=3, seed=3)
    sum(o.square().sum() for o in pm(*x)).backward()
    sum(o.square().sum() for o in cm(*x)).backward()
    layers = dict(pm.base_model.model.named_modules())
    for p in cm.sites:
        for name in ("lora_A", "lora_B"):
            theirs = getattr(layers[p.path], name)["default"].weight.grad
            torch.testing.assert_close(getattr(p.state, name).grad, theirs, atol=1e-5, rtol=1e-4)


def test_merge_folds_the_delta_as_peft_does():
    model = Convs(groups=1)
    cm, pm = build(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                                     use_rslora=True), inputs())
    before, weights = outputs(cm, inputs()), snapshot(model)
    cm.merge()
    pm.merge_adapter()
    try:
        for path in TARGETS:
            close(model.get_submodule(path).weight, pm.base_model.model.get_submodule(path).base_layer.weight, 1e-6)
        close(outputs(cm, inputs()), before)
        close(outputs(model, inputs()), before)  # the model's own forward, merged
    finally:
        cm.unmerge()
        pm.unmerge_adapter()
    for key, (value, _) in snapshot(model).items():
        close(value, weights[key][0], 1e-6)
    close(outputs(cm, inputs()), before)


def test_grouped_convolution_refuses_to_merge(pair):
    cm, _ = pair
    before = snapshot(cm.base_model)
    with pytest.raises(MergeError, match="grouped.*groups=2.*can't merge"):
        cm.merge()
    assert_unchanged(cm.base_model, before)


def test_checkpoints_both_ways(pair, tmp_path):
    cm, pm = pair
    pm.save_pretrained(tmp_path / "peft")
    cm.save_pretrained(tmp_path / "peftc")
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "peftc" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    with pytest.warns(UserWarning, match="groups > 1"):
        pm2 = PeftModel.from_pretrained(Convs(), tmp_path / "peftc").eval()
    cm2 = peftc.from_pretrained(Convs(), tmp_path / "peft", example_inputs=inputs(), backend="eager").eval()
    want = outputs(pm, inputs())
    close(outputs(pm2, inputs()), want)
    close(outputs(cm2, inputs()), want)


def test_tiny_resnet_equal_peft_merge_included():
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)).eval()
    x = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    cm, pm = build(model, LoraConfig(r=2, lora_alpha=4, target_modules=["convolution"], init_lora_weights=False), x)
    assert len(cm.sites) == 6  # the stem, the four block convolutions and the shortcut
    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    want = outputs(pm, x)
    close(outputs(cm, x), want)
    cm.merge()
    close(outputs(model, x), outputs(pm.merge_and_unload(), x))


def test_peftc_selectors_and_default_init():
    model = Convs(groups=1)
    before = outputs(model, inputs())
    cm = peftc.compile(model, [peftc.LoRA(r=2).on(peftc.convolution(r"c\d")),
                               peftc.LoRA(r=3, init="gaussian").on(peftc.module("point"))],
                       example_inputs=inputs(), backend="eager")
    assert sorted(p.path for p in cm.sites) == ["c1", "c2", "c3", "point"]
    assert all(torch.count_nonzero(p.state.lora_B) == 0 for p in cm.sites)
    close(outputs(cm, inputs()), before, 1e-6)  # B starts at zero: a no-op
    from_file = peftc.compile(Convs(groups=1), {"rules": [{"adapter": {"kind": "lora", "r": 2},
                                                           "select": {"convolution": "c.|point", "layers": None}}]},
                              example_inputs=inputs(), backend="eager")
    assert sorted(p.path for p in from_file.sites) == ["c1", "c2", "c3", "point"]


@pytest.mark.parametrize(("conv", "r", "match"), [
    (nn.ConvTranspose2d(4, 4, 3), 2, "conv.*no LoRA for transposed convolutions"),
    (nn.Conv2d(4, 4, 3, dilation=2), 2, "conv.*dilation"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 2, "conv.*padding_mode is 'reflect'"),
    (nn.Conv2d(4, 4, 3, groups=4), 2, "conv.*groups=4 don't divide the rank 2"),
], ids=["transposed", "dilation", "padding-mode", "rank-not-divisible-by-groups"])
def test_a_convolution_peft_refuses_raises(conv, r, match):
    model = OneModule(conv)
    before = snapshot(model)
    with pytest.raises(RuleError, match=match):
        peftc.compile(model, LoraConfig(r=r, target_modules=["conv"]), example_inputs=(torch.randn(1, 4, 6, 6),),
                      backend="eager")
    assert_unchanged(model, before)


def test_pissa_on_a_convolution_raises():
    model = OneModule(nn.Conv2d(4, 4, 3))
    with pytest.raises(RuleError, match="conv.*init='pissa' starts from linear weights only"):
        peftc.compile(model, [peftc.LoRA(r=2, init="pissa").on(peftc.convolution())],
                      example_inputs=(torch.randn(1, 4, 6, 6),), backend="eager")


def test_reserved_slots_take_smaller_ranks_but_not_on_grouped_convolutions(tmp_path):
    """A reserved slot pads a smaller rank with zeros; a grouped lora_B splits the rank by group,
    so there only the slot's own rank fits."""
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c1", "c2", "point"], init_lora_weights=False)
    peft.get_peft_model(Convs(groups=1), copy.deepcopy(config)).save_pretrained(tmp_path / "small")
    cm = peftc.compile(Convs(groups=1), [peftc.LoRA(r=4).on(peftc.convolution("c1|c2|point"))],
                       example_inputs=inputs(), backend="eager", reserve=peftc.Reserve(max_rank=4, slots=2))
    cm.load_adapter(tmp_path / "small", "small")
    cm.set_adapter("small")
    close(outputs(cm.eval(), inputs()), outputs(PeftModel.from_pretrained(Convs(groups=1), tmp_path / "small"),
                                                inputs()))
    grouped = peftc.compile(Convs(), [peftc.LoRA(r=4).on(peftc.convolution("grouped"))], example_inputs=inputs(),
                            backend="eager", reserve=peftc.Reserve(max_rank=4, slots=2))
    with pytest.raises(peftc.CapacityError, match="grouped.*groups=2.*reserve rank 2 exactly"):
        grouped.add_adapter("small", [peftc.LoRA(r=2).on(peftc.convolution("grouped"))])
