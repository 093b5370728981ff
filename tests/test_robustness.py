"""Robustness: failures leave everything as it was, and an inactive adapter never reaches the output.

- gates select, never multiply: NaN/inf in an inactive or disabled adapter can't leak (NaN * 0 = NaN);
- merge / unmerge are all-or-nothing, even when interrupted while writing;
- raw exceptions (re.error, FileExistsError) become PeftcErrors naming the argument and the fix;
- save_pretrained replaces the config and the weights together or not at all;
- a config can't make peftc run code (no trust_remote_code passed to a tokenizer).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_llama, padded_batch
from torch import nn
from torch.nn import functional as F

import peftc
from peftc.testing.strategies import TinyMLP

aten = torch.ops.aten
QV = peftc.linear(r".*\.(q|v)_proj")


def _exactly(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"differ by up to {(a - b).abs().max().item()}"


# -- 1. gates select: an inactive adapter's values never reach the output -------------------------


def _poison(cm, adapter: str) -> None:
    """NaN and inf in every parameter of ``adapter``."""
    with torch.no_grad():
        for p in cm.sites:
            if p.adapter_name == adapter:
                for i, t in enumerate(p.state.parameters()):
                    t.fill_(float("nan") if i % 2 == 0 else float("inf"))


@pytest.fixture(scope="module")
def two_llama_adapters():
    model = make_llama()
    base = copy.deepcopy(model)
    cm = peftc.compile(model, [peftc.LoRA(r=4, init=False).on(QV)], backend="eager").eval()
    # "other" shares q_proj with "default" (stacked on one op) and adds BitFit on the MLP
    cm.add_adapter("other", [peftc.LoRA(r=2, alpha=4, init=False).on(peftc.linear(r".*\.(q|k|o)_proj")),
                             peftc.BitFit().on(peftc.linear(r".*mlp\..*"))])
    with torch.no_grad():
        for p in cm.sites:
            if hasattr(p.state, "bias"):
                p.state.bias.normal_()
    return cm, base


def test_non_finite_inactive_or_disabled_adapters_never_reach_the_output(two_llama_adapters):
    cm, base = two_llama_adapters
    cm = copy.deepcopy(cm)
    ids, mask = padded_batch(3, 7)
    run = lambda **kw: cm(input_ids=ids, attention_mask=mask, **kw).logits  # noqa: E731
    names = ["default", "__base__", "other"]
    active, mixed = run(), run(adapter_names=names)
    with cm.disable_adapter():
        disabled = run()
    torch.testing.assert_close(disabled, base(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)

    _poison(cm, "other")  # inactive: LoRA A/B and the BitFit bias all NaN or inf
    _exactly(run(), active)
    poisoned_mixed = run(adapter_names=names)
    _exactly(poisoned_mixed[:2], mixed[:2])  # the rows running "default" and the base model
    _poison(cm, "default")  # now every adapter is non-finite
    with cm.disable_adapter():
        _exactly(run(), disabled)
    _exactly(run(adapter_names=["__base__"] * 3), disabled)
    cm.set_adapter("other")
    with cm.disable_adapter():
        _exactly(run(), disabled)


def test_non_finite_inactive_adapter_never_reaches_the_gradients():
    """Training: the inactive adapter's rows of its own branch get no gradient either, so a
    NaN in its A or B can't reach the active adapter's gradients (0 @ NaN is NaN)."""
    torch.manual_seed(0)
    cm = peftc.compile(make_llama(), [peftc.LoRA(r=4, init=False, dropout=0.1).on(QV)], backend="eager")
    cm.add_adapter("other", [peftc.LoRA(r=2, init=False).on(peftc.linear(r".*\.(q|k)_proj"))])
    cm.train()
    ids, mask = padded_batch(3, 7)

    def grads():
        torch.manual_seed(1)  # the same dropout masks each time
        cm.zero_grad(set_to_none=True)
        loss = cm(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.state.lora_A.grad for p in cm.sites if p.adapter_name == "default"]

    loss, before = grads()
    _poison(cm, "other")
    poisoned_loss, after = grads()
    _exactly(poisoned_loss, loss)
    for a, b in zip(after, before, strict=True):
        _exactly(a, b)


def test_non_finite_inactive_bitfit_never_reaches_the_output():
    model = TinyMLP([6, 8, 5], ["linear", "matmul"], [False, True])
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    cm = peftc.compile(model, [peftc.BitFit().on(peftc.linear())], example_inputs=(x,), backend="eager")
    with cm.disable_adapter():
        base = cm(x)
    _exactly(base, model.layers[1](torch.tanh(model.layers[0](x))))
    with torch.no_grad():
        for p in cm.sites:
            p.state.bias.fill_(float("nan"))
    assert cm(x).isnan().all()
    with cm.disable_adapter():
        _exactly(cm(x), base)


def test_active_lora_output_is_bit_identical_to_its_formula():
    """Selecting instead of multiplying leaves an active adapter's arithmetic alone: the graph's
    output is exactly ``y + (x A^T B^T) * scaling`` in the model's dtype, per row in a mixed batch."""
    model = TinyMLP([6, 10, 5], ["linear", "flinear"], [True, False])
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    cm = peftc.compile(model, [peftc.LoRA(r=3, alpha=5, init=False).on(peftc.linear())],
                       example_inputs=(x,), backend="eager")
    cm.add_adapter("b", [peftc.LoRA(r=2, alpha=3, init=False).on(peftc.linear(r"layers\.1"))])
    states = {(p.adapter_name, p.path): p.state for p in cm.sites}

    def formula(adapters):
        h = x
        for i, layer in enumerate(model.layers):
            w, bias = (layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer.dense()
            y = F.linear(h, w, bias)
            for name in adapters:
                s = states.get((name, f"layers.{i}"))
                if s is not None:
                    y = y + F.linear(F.linear(h, s.lora_A), s.lora_B) * s.scaling
            h = torch.tanh(y) if i == 0 else y
        return h

    with torch.no_grad():
        _exactly(cm(x), formula(["default"]))
        cm.set_adapter(["default", "b"])
        _exactly(cm(x), formula(["default", "b"]))
        cm.set_adapter("default")
        mixed = cm(x, adapter_names=["b", "default", "__base__", "b"])
        for row, names in enumerate([["b"], ["default"], [], ["b"]]):
            _exactly(mixed[row], formula(names)[row])
