"""backend="inductor" on a tiny Llama: forward, a training step, and merge, against eager."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_llama, padded_batch

import peftc

pytestmark = pytest.mark.slow

RULES = [peftc.LoRA(r=4, alpha=8, init=False).on(peftc.linear(r".*\.(q|v)_proj"))]


def twins(example_inputs=None, train=False):
    """The same one-layer model and adapter weights compiled with inductor and with eager."""
    model = make_llama(num_hidden_layers=1).train(train)
    eager = peftc.compile(copy.deepcopy(model), RULES, example_inputs, backend="eager")
    inductor = peftc.compile(model, RULES, example_inputs, backend="inductor")
    with torch.no_grad():
        for a, b in zip(eager.sites, inductor.sites, strict=True):
            b.state.lora_A.copy_(a.state.lora_A)
            b.state.lora_B.copy_(a.state.lora_B)
    return eager, inductor


def test_inductor_forward_and_merge_match_eager():
    eager, inductor = twins()
    eager.eval()
    inductor.eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        ye = eager(input_ids=ids, attention_mask=mask).logits
        yi = inductor(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(yi, ye, atol=1e-5, rtol=1e-5)
        # another batch size and length through the same (dynamic) compiled graph
        ids2 = torch.randint(1, 128, (5, 11), generator=torch.Generator().manual_seed(1))
        mask2 = torch.ones_like(ids2)
        torch.testing.assert_close(inductor(input_ids=ids2, attention_mask=mask2).logits,
                                   eager(input_ids=ids2, attention_mask=mask2).logits, atol=1e-5, rtol=1e-5)
        inductor.merge()
        ym = inductor(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ym, ye, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inductor.base_model(input_ids=ids, attention_mask=mask).logits, ye,
                               atol=1e-5, rtol=1e-5)


def test_inductor_training_step_matches_eager():
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    eager, inductor = twins({"input_ids": ids, "labels": ids}, train=True)
    loss_e = eager(input_ids=ids, labels=ids).loss
    loss_i = inductor(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_i, loss_e, atol=1e-5, rtol=1e-5)
    loss_e.backward()
    loss_i.backward()
    for a, b in zip(eager.sites, inductor.sites, strict=True):
        assert b.state.lora_A.grad is not None and b.state.lora_B.grad is not None
        torch.testing.assert_close(b.state.lora_A.grad, a.state.lora_A.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b.state.lora_B.grad, a.state.lora_B.grad, atol=1e-5, rtol=1e-4)
    for p in inductor.base_model.parameters():
        assert p.grad is None
    # one optimizer step moves only the adapters, and the compiled graph sees the new values
    opt = torch.optim.SGD([p for p in inductor.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    with torch.no_grad():
        for a, b in zip(eager.sites, inductor.sites, strict=True):
            a.state.lora_A.copy_(b.state.lora_A)
            a.state.lora_B.copy_(b.state.lora_B)
    # (grad mode stays on, so the compiled training graph is reused rather than recompiled)
    new_i = inductor(input_ids=ids, labels=ids).loss.detach()
    new_e = eager(input_ids=ids, labels=ids).loss.detach()
    torch.testing.assert_close(new_i, new_e, atol=1e-5, rtol=1e-5)
    assert new_i < loss_i.detach()


def test_inductor_checkpointed_training_step_matches_eager_and_saves_less():
    """The checkpointing pass under inductor: checkpoint lowers to a recomputed region."""
    ids = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    model = make_llama(num_hidden_layers=2).train()
    eager = peftc.compile(copy.deepcopy(model), RULES, backend="eager").train()
    inductor = peftc.compile(model, RULES, backend="inductor").train()
    inductor.peftc.load_state_dict(eager.peftc.state_dict())

    def step(cm):
        cm.zero_grad(set_to_none=True)
        resident = {t.untyped_storage().data_ptr() for t in (*cm.parameters(), *cm.buffers())}
        sizes = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in resident:
                sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = cm(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [(p.state.lora_A.grad, p.state.lora_B.grad) for p in cm.sites], sum(sizes.values())

    _, _, off = step(inductor)
    inductor.gradient_checkpointing_enable()
    loss_i, grads_i, on = step(inductor)
    loss_e, grads_e, _ = step(eager)
    torch.testing.assert_close(loss_i, loss_e, atol=1e-5, rtol=1e-5)
    for gi, ge in zip(grads_i, grads_e, strict=True):
        for a, b in zip(gi, ge, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert on < off / 2


def test_inductor_reserved_slots_load_and_swap_without_compiling():
    """With a Reserve, adding, hot-swapping and switching adapters under inductor compiles nothing
    more, and the outputs equal the eager twin's."""
    from torch._dynamo.utils import counters

    model = make_llama(num_hidden_layers=1).eval()
    reserve = peftc.Reserve(max_rank=8, slots=2)
    twins = []
    for backend in ("eager", "inductor"):
        torch.manual_seed(0)  # the same random adapter weights in both
        twins.append(peftc.compile(copy.deepcopy(model), RULES, backend=backend, reserve=reserve).eval())
    ids, mask = padded_batch()

    def outputs():
        with torch.no_grad():
            return [m(input_ids=ids, attention_mask=mask).logits for m in twins]

    for m in twins:
        torch.manual_seed(0)
        m.add_adapter("b", [peftc.LoRA(r=6, init=False).on(peftc.linear(r".*\.q_proj"))])
    outputs()
    graphs = counters["stats"]["unique_graphs"]
    for m in twins:
        m.set_adapter("b")
    torch.testing.assert_close(*reversed(outputs()), atol=1e-5, rtol=1e-5)
    for m in twins:
        m.delete_adapter("b")
        torch.manual_seed(1)
        m.add_adapter("c", [peftc.LoRA(r=2, alpha=5, init=False).on(peftc.linear(r".*\.(q|v)_proj"))])
        m.set_adapter(["default", "c"])
    torch.testing.assert_close(*reversed(outputs()), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs, "inductor compiled again"
