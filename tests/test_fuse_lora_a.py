"""Horizontal fusion of LoRA-A (passes/fuse_lora_a.py): fewer matmuls, the unfused graph's
outputs and gradients within float32 rounding, for mixed ranks and gated adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_llama

import peftc

aten = torch.ops.aten
ON = peftc.Optimize(fuse_lora_a=True)
OFF = peftc.Optimize(fuse_lora_a=False)


def _linears(gm) -> int:
    return sum(n.target is aten.linear.default for n in gm.graph.nodes)


def _two_adapters(optimize, dropout=0.0):
    """LoRA "default" (ranks 2 to 6 by pattern) on every projection and "other" (rank 3) on q/k/v."""
    rules = peftc.LoRA(r=4, init=False, dropout=dropout, rank_pattern={"k_proj": 2, "up_proj": 6}).on(
        peftc.linear(r".*(q|k|v|gate|up)_proj"))
    cm = peftc.compile(make_llama(), rules, backend="eager", optimize=optimize)
    cm.add_adapter("other", peftc.LoRA(r=3, init=False).on(peftc.linear(r".*(q|k|v)_proj")))
    return cm


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randint(1, VOCAB, (4, 7), generator=g)


@pytest.mark.parametrize("training", [True, False])
def test_fused_graph_equals_unfused(training):
    ids = _batch()
    fused, unfused = _two_adapters(ON), _two_adapters(OFF)
    unfused.load_state_dict(fused.state_dict())
    results = []
    for cm in (fused, unfused):
        cm.train(training)
        cm.set_adapter(["default", "other"])
        out = cm(input_ids=ids, labels=ids)
        mixed = cm(input_ids=ids, adapter_names=["default", "other", "__base__", "other"]).logits
        grads = {}
        if training:
            out.loss.backward()
            grads = {n: p.grad for n, p in cm.named_parameters() if p.requires_grad}
        results.append((out.loss, mixed, grads, _linears(cm.program_for(input_ids=ids, labels=ids).fn)))
    (loss_a, mixed_a, grads_a, n_a), (loss_b, mixed_b, grads_b, n_b) = results
    # per layer, training: default's q/k/v (3 -> 1) and gate/up (2 -> 1), other's q/k/v behind its own
    # gate (3 -> 1); eval, where no gate selects inputs: both adapters' q/k/v (6 -> 1) and gate/up (2 -> 1)
    layers = len(fused.base_model.model.layers)
    assert n_b - n_a == layers * (5 if training else 6)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(mixed_a, mixed_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0 or not training
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_nan_in_an_inactive_adapter_reaches_no_gradient():
    cm = _two_adapters(ON).train()
    with torch.no_grad():
        for p in cm.sites:
            if p.adapter_name == "other":
                p.state.lora_A.fill_(float("nan"))
    ids = _batch()
    cm(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in cm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_dropout_is_not_fused():
    cm = _two_adapters(ON, dropout=0.1).train()
    cm.set_adapter("default")
    ids = _batch()
    unfused = _two_adapters(OFF, dropout=0.1).train()
    # only "other" (no dropout) fuses: its q/k/v, 3 -> 1 per layer
    layers = len(cm.base_model.model.layers)
    assert _linears(unfused.program_for(input_ids=ids).fn) - _linears(cm.program_for(input_ids=ids).fn) == 2 * layers


def test_switching_it_on_later_relowers_built_graphs():
    cm = _two_adapters(OFF).eval()
    ids = _batch()
    before = cm(input_ids=ids).logits
    n = _linears(cm.program_for(input_ids=ids).fn)
    cm.programs.set_optimize(ON)
    assert _linears(cm.program_for(input_ids=ids).fn) < n
    torch.testing.assert_close(cm(input_ids=ids).logits, before)
