"""The fused LM-head loss (passes/fused_loss.py, linear_cross_entropy.py): the loss and the
gradients of the unfused graph, against a float64 recomputation and against PEFT."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, copy_peft_weights, make_gpt2, make_llama
from torch import nn

import peftc
from peftc.linear_cross_entropy import linear_cross_entropy

aten = torch.ops.aten
UNFUSED = peftc.Optimize(fused_loss=False)


@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_kernel_matches_float64_cross_entropy(reduction, bias, chunk):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(23, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, 40, (23,), generator=g)
    t[::4] = -100
    inputs = [h, w] + ([b] if bias else [])
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="mean" if reduction == 1 else "sum")
    out = linear_cross_entropy(h, w, b, t, reduction=reduction, chunk=chunk, dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(2.5 * out, inputs), torch.autograd.grad(2.5 * ref, inputs),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_kernel_computes_only_the_gradients_asked_for():
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(7, 4)  # a frozen head
    loss = linear_cross_entropy(h, w, None, torch.randint(0, 7, (5,)))
    loss.backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        assert not linear_cross_entropy(h, w, None, torch.randint(0, 7, (5,))).requires_grad


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


def _pair(build, config, dtype=torch.float32):
    model = build().to(dtype)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).train()
    fused = peftc.compile(copy.deepcopy(model), config, backend="eager").train()
    unfused = peftc.compile(model, config, backend="eager", optimize=UNFUSED).train()
    copy_peft_weights(fused, pm)
    copy_peft_weights(unfused, pm)
    return pm, fused, unfused


def _loss_and_grads(model, ids, labels):
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n.split("peftc.")[-1]: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize(("build", "config"), [
    (make_llama, dict(r=4, target_modules="all-linear", init_lora_weights=False)),
    (make_llama, dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)),
    (lambda: make_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),  # train mode: no random dropout
     dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)),
], ids=["llama-all-linear", "llama-trained-head", "gpt2-tied-head"])
def test_fused_loss_equals_peft(build, config):
    pm, fused, unfused = _pair(build, peft.LoraConfig(**config))
    ids, labels = _batch()
    gm = fused.program_for(input_ids=ids, labels=labels).fn
    assert aten.cross_entropy_loss.default not in {n.target for n in gm.graph.nodes}
    assert linear_cross_entropy in {n.target for n in gm.graph.nodes}
    ref = pm(input_ids=ids, labels=labels)
    ref.loss.backward()
    want = sorted(p.grad.flatten().tolist()[:3] for p in pm.parameters() if p.requires_grad)
    for cm, logits in ((fused, False), (unfused, True)):
        out, grads = _loss_and_grads(cm, ids, labels)
        torch.testing.assert_close(out.loss, ref.loss)
        assert (out.logits is not None) is logits  # the unfused graph keeps them
        if logits:
            torch.testing.assert_close(out.logits, ref.logits)
        assert len(grads) == len(want)
        got = sorted(g.flatten().tolist()[:3] for g in grads.values())
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-6)


def test_fused_loss_equals_unfused_graph_of_a_float64_model():
    # transformers casts the logits to float32 for the loss, float64 model or not: so does the fused loss
    config = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = make_llama().double()
    fused = peftc.compile(copy.deepcopy(model), config, backend="eager",
                          optimize=peftc.Optimize(loss_chunk=5)).train()
    unfused = peftc.compile(model, config, backend="eager", optimize=UNFUSED).train()
    unfused.load_state_dict(fused.state_dict())
    ids, labels = _batch()
    a, ga = _loss_and_grads(fused, ids, labels)
    b, gb = _loss_and_grads(unfused, ids, labels)
    assert a.loss.dtype == b.loss.dtype == torch.float32
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert ga[name].dtype == torch.float64
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-7)


def test_sum_reduction_with_num_items_in_batch():
    pm, fused, unfused = _pair(make_llama, peft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    ids, labels = _batch()
    n = torch.tensor(11)
    ref = pm(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    gm = fused.program_for(input_ids=ids, labels=labels, num_items_in_batch=n).fn
    assert linear_cross_entropy in {node.target for node in gm.graph.nodes}
    torch.testing.assert_close(fused(input_ids=ids, labels=labels, num_items_in_batch=n).loss, ref)


def test_eval_mode_keeps_logits():
    pm, fused, _ = _pair(make_llama, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ids, labels = _batch()
    out = fused.eval()(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, pm.eval()(input_ids=ids).logits)


class HeadReadTwice(nn.Module):
    """A loss over logits that something else reads too: the logits must stay."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 12)

    def forward(self, x, labels):
        logits = self.head(self.body(x))
        return F.cross_entropy(logits.view(-1, 12), labels.view(-1)), logits.argmax(-1)


def test_logits_read_elsewhere_are_not_fused():
    x, labels = torch.randn(2, 3, 8), torch.randint(0, 12, (2, 3))
    cm = peftc.compile(HeadReadTwice().train(), peftc.LoRA(r=2).on(peftc.linear("body")), (x, labels),
                       backend="eager").train()
    gm = cm.program_for(x, labels).fn
    assert aten.cross_entropy_loss.default in {n.target for n in gm.graph.nodes}


def test_bad_chunk_is_refused():
    with pytest.raises(peftc.PeftcError, match="loss_chunk"):
        peftc.Optimize(loss_chunk=0)
