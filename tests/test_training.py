"""Real training on a learnable synthetic task, then merge; train/eval mode and LoRA dropout."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_llama, padded_batch, snapshot
from torch import nn

import peftc


def counting_batch(g: torch.Generator, batch: int = 8, length: int = 16) -> torch.Tensor:
    """Sequences that count up by one (mod vocab): the next token is always predictable."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    return (start + torch.arange(length)) % VOCAB


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama with LoRA on every projection and the head, trained for 60 steps."""
    model = make_llama().train()
    base = snapshot(model)
    params_before = {id(p) for p in model.parameters()}
    example = counting_batch(torch.Generator().manual_seed(123))
    cm = peftc.compile(model, [peftc.LoRA(r=8, alpha=16).on(peftc.linear(r".*_proj|lm_head"))],
                       example_inputs={"input_ids": example, "labels": example}, backend="eager")
    cm.train()
    trainable = [p for p in cm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses, grads_seen = [], set()
    for _ in range(60):
        ids = counting_batch(g)
        loss = cm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        grads_seen |= {n for n, p in cm.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return dict(model=model, cm=cm, base=base, losses=losses, grads_seen=grads_seen,
                params_before=params_before, trainable=trainable)


def test_loss_goes_down(trained):
    losses = trained["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 4.0  # about log(128) at the start: B is zero, the base model is random
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"


def test_gradients_reach_only_adapters(trained):
    cm = trained["cm"]
    adapter_names = {n for n, _ in cm.named_parameters() if n.startswith("peftc.adapters.default.")}
    assert trained["grads_seen"] == adapter_names
    assert {id(p) for p in trained["trainable"]} == {id(p) for p in cm.peftc.parameters()}
    assert len(cm.sites) == 2 * 7 + 1
    for p in cm.sites:
        assert torch.count_nonzero(p.state.lora_B) > 0, f"{p.path}: B never trained"


def test_base_weights_bit_identical_after_training(trained):
    model, base = trained["model"], trained["base"]
    for name, p in model.named_parameters():
        value, _ = base["param:" + name]
        assert torch.equal(p, value), f"{name} changed during training"
        assert not p.requires_grad


def test_merge_then_merge_and_unload(trained):
    """Runs last in this module: it merges the shared trained model."""
    model, cm = trained["model"], trained["cm"]
    cm.eval()
    ids, mask = padded_batch(batch=4, length=12, seed=3)
    with torch.no_grad():
        unmerged = cm(input_ids=ids, attention_mask=mask).logits
        cm.merge()
        merged = cm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)

    cm.unmerge()
    unloaded = cm.merge_and_unload()
    assert unloaded is model
    assert {id(p) for p in unloaded.parameters()} == trained["params_before"]
    assert type(unloaded).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        plain = unloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(plain, unmerged, atol=1e-5, rtol=1e-5)
    # the merged model predicts the task it learned
    ids = counting_batch(torch.Generator().manual_seed(99), batch=4)
    with torch.no_grad():
        pred = unloaded(input_ids=ids).logits.argmax(-1)
    assert (pred[:, 4:-1] == ids[:, 5:]).float().mean() > 0.9


# -- train / eval mode and LoRA dropout -------------------------------------------------------


@pytest.fixture(scope="module")
def dropout_cm():
    model = make_llama()
    cm = peftc.compile(model, [peftc.LoRA(r=4, alpha=8, dropout=0.5, init=False).on(
        peftc.linear(r".*(q|v)_proj"))], backend="eager")
    return cm


def test_lora_dropout_only_in_train_mode(dropout_cm):
    cm = dropout_cm
    assert cm.base_model.config.attention_dropout == 0.0  # the base model has no dropout of its own
    ids, mask = padded_batch()
    cm.eval()
    assert not cm.base_model.training
    with torch.no_grad():
        e1 = cm(input_ids=ids, attention_mask=mask).logits
        e2 = cm(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(e1, e2)
    cm.train()
    assert cm.base_model.training
    with torch.no_grad():
        t1 = cm(input_ids=ids, attention_mask=mask).logits
        t2 = cm(input_ids=ids, attention_mask=mask).logits
    assert (t1 - t2).abs().max() > 1e-4
    assert (t1 - e1).abs().max() > 1e-4
    cm.eval()
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits, e1, atol=0, rtol=0)


def test_dropout_with_zero_b_is_exactly_the_base_model(dropout_cm):
    """Whatever dropout draws, a zero B adds nothing: train mode equals the base model."""
    cm = dropout_cm
    ids, mask = padded_batch()
    cm.eval()
    with torch.no_grad():
        base = cm.base_model(input_ids=ids, attention_mask=mask).logits
    saved = [p.state.lora_B.detach().clone() for p in cm.sites]
    try:
        with torch.no_grad():
            for p in cm.sites:
                p.state.lora_B.zero_()
        cm.train()
        with torch.no_grad():
            out = cm(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(out, base, atol=1e-6, rtol=0)
    finally:
        cm.eval()
        with torch.no_grad():
            for p, b in zip(cm.sites, saved, strict=True):
                p.state.lora_B.copy_(b)


# -- modules_to_save and LoRA on one module --------------------------------------------------------


def test_lora_and_modules_to_save_on_one_module_trains_both():
    """A LoRA rule on a module that is also in modules_to_save: the graph reads the trainable copy
    and adds the LoRA term to it, so both train; the user's own layer stays frozen and untouched."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(3, 16)
    before = snapshot(m)
    cm = peftc.compile(m, [peftc.LoRA(r=2, init=False).on(peftc.linear("2"))], example_inputs=(x,),
                       backend="eager", modules_to_save=["2"])
    trainable = {n for n, p in cm.named_parameters() if p.requires_grad}
    assert trainable == {"peftc.adapters.default.2.lora_A", "peftc.adapters.default.2.lora_B",
                         "peftc.saved.default.2.weight", "peftc.saved.default.2.bias"}
    assert set(cm.saved_modules("default")) == {"2"}
    cm(x).pow(2).sum().backward()
    for name, p in cm.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} is trainable but unused"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    for name, p in m.named_parameters():
        assert torch.equal(p, before["param:" + name][0]) and not p.requires_grad, name
