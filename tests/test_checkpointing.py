"""Activation (gradient) checkpointing as a graph pass, against PEFT's and against peftc without it.

The memory check (``peftc.testing.held_bytes``) counts what backward holds on
to: tensors saved for backward (seen by ``saved_tensors_hooks``) plus, under
PEFT's ``torch.utils.checkpoint``, the keyword inputs each checkpointed layer
keeps without the hooks seeing them (the mask and rotary tables).
Parameters and buffers are resident anyway and not counted.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import assert_unchanged, copy_peft_weights, make_llama, snapshot, two_adapter_llama
from torch import nn

import peftc
from peftc.testing import held_bytes

peft = pytest.importorskip("peft")

LORA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
IDS = torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[0, :5] = 0  # padding: PEFT's run builds an attention mask too (without, SDPA's causal flag needs none)
LABELS = IDS.masked_fill(MASK == 0, -100)
BATCH = dict(input_ids=IDS, attention_mask=MASK, labels=LABELS)


def step(model: nn.Module, **options) -> tuple[float, dict]:
    """One loss and backward on BATCH: the loss and every gradient, by parameter name (none when
    nothing trains: adapters disabled or merged)."""
    model.zero_grad(set_to_none=True)
    loss = model(**BATCH, **options).loss
    if loss.requires_grad:
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(a, b, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys()
    assert abs(la - lb) <= atol
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def pair():
    model = make_llama(num_hidden_layers=4).train()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA)).train()
    cm = peftc.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA), backend="eager").train()
    copy_peft_weights(cm, pm)
    return pm, cm


def test_checkpointing_keeps_gradients_and_holds_no_more_than_peft(pair):
    pm, cm = pair
    run = lambda m: (lambda: m(**BATCH))  # noqa: E731
    off, held_off = step(cm), held_bytes(cm, run(cm))
    program = cm.program_for(**BATCH)
    cm.gradient_checkpointing_enable()
    try:
        assert cm.is_gradient_checkpointing
        on, held_on = step(cm), held_bytes(cm, run(cm))
        assert cm.program_for(**BATCH) is program  # lowered again, not traced again
    finally:
        cm.gradient_checkpointing_disable()
    assert_same_step(on, off, atol=0)  # the same ops, recomputed: bit for bit
    assert not cm.is_gradient_checkpointing
    assert held_bytes(cm, run(cm)) == held_off
    pm.gradient_checkpointing_enable()
    try:
        layers = list(pm.get_base_model().model.layers)
        theirs = held_bytes(pm, run(pm), layers)
        peft_step = step(pm)
    finally:
        pm.gradient_checkpointing_disable()
    assert held_on <= theirs
    assert held_on < held_off / 4
    (lp, gp), (lc, gc) = peft_step, on
    assert abs(lp - lc) < 1e-5
    for p in cm.sites:
        for m in ("lora_A", "lora_B"):
            ours = gc[f"peftc.adapters.default.{p.key}.{m}"]
            torch.testing.assert_close(ours, gp[f"base_model.model.{p.path}.{m}.default.weight"], atol=1e-6, rtol=1e-5)


def test_every_n_layers_and_a_layers_pattern_checkpoint_fewer_layers():
    cm = peftc.compile(make_llama(num_hidden_layers=4), [peftc.LoRA(r=4, init=False).on(peftc.linear(r".*q_proj"))],
                       backend="eager").train()
    run = lambda: cm(**BATCH)  # noqa: E731
    off = step(cm), held_bytes(cm, run)
    held = {}
    for name, options in (("all", {}), ("every 2", {"every_n_layers": 2}), ("one", {"layers": r"model\.layers\.3"})):
        cm.activation_checkpointing_enable(**options)
        assert_same_step(step(cm), off[0], atol=0)
        held[name] = held_bytes(cm, run)
    cm.activation_checkpointing_disable()
    assert held["all"] < held["every 2"] < held["one"] < off[1]
    fresh = peftc.compile(make_llama(num_hidden_layers=4), [peftc.LoRA(r=4).on(peftc.linear(r".*q_proj"))],
                          backend="eager").train()
    fresh.activation_checkpointing_enable()  # before any graph is built: built checkpointed
    assert held_bytes(fresh, functools.partial(fresh, **BATCH)) == held["all"]


def test_checkpointing_follows_adapters_switched_disabled_merged_and_added():
    cm, _ = two_adapter_llama()
    cm.train()
    reference = {}

    def states():
        out = {}
        for name in ("default", "other"):
            cm.set_adapter(name)
            out[name] = step(cm)
        with cm.disable_adapter():
            out["disabled"] = step(cm)
        cm.set_adapter(["default", "other"])  # per row (the gates are resized: the regions must see it)
        out["mixed"] = step(cm, adapter_names=["other", "default", "__base__", "other"])
        cm.set_adapter("default")
        cm.merge()
        out["merged"] = step(cm)
        cm.unmerge()
        return out

    reference = states()
    assert reference["default"][1] and reference["other"][1]
    cm.gradient_checkpointing_enable({"use_reentrant": False})
    on = states()
    for name in reference:  # merge and unmerge round the base weights: float32 rounding apart
        assert_same_step(on[name], reference[name], atol=1e-6)
    cm.add_adapter("third", [peftc.LoRA(r=2, init=False).on(peftc.linear(r".*up_proj"))])
    cm.set_adapter("third")
    with_third = step(cm)
    cm.gradient_checkpointing_disable()
    assert_same_step(with_third, step(cm), atol=0)


def test_checkpointing_replays_dropout_masks_and_covers_prefix_tuning():
    model = make_llama(num_hidden_layers=2).train()
    for rules in ([peftc.LoRA(r=4, dropout=0.3, init=False).on(peftc.linear(r".*(q|v)_proj"))],
                  peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)):
        cm = peftc.compile(copy.deepcopy(model), rules, backend="eager").train()
        torch.manual_seed(1)
        off = step(cm), held_bytes(cm, functools.partial(cm, **BATCH))
        cm.gradient_checkpointing_enable()
        torch.manual_seed(1)
        on = step(cm), held_bytes(cm, functools.partial(cm, **BATCH))
        assert_same_step(on[0], off[0], atol=0)
        assert on[1] < off[1] / 2


def test_bad_checkpointing_options_are_refused_by_name():
    cm = peftc.compile(make_llama(), [peftc.LoRA(r=4).on(peftc.linear(r".*q_proj"))], backend="eager")
    before = snapshot(cm)
    with pytest.raises(peftc.PeftcError, match=r"\['chunks'\]"):
        cm.gradient_checkpointing_enable({"chunks": 2})
    with pytest.raises(peftc.PeftcError, match="offload=True"):
        cm.activation_checkpointing_enable(offload=True)
    with pytest.raises(peftc.PeftcError, match="every_n_layers"):
        cm.activation_checkpointing_enable(every_n_layers=0)
    with pytest.raises(peftc.PeftcError, match="no module path matches"):
        cm.activation_checkpointing_enable(layers=r"decoder\.\d+")
    assert not cm.is_activation_checkpointing
    assert_unchanged(cm, before)
    with pytest.warns(UserWarning, match="non-reentrantly"):
        cm.gradient_checkpointing_enable({"use_reentrant": True})
    assert cm.is_gradient_checkpointing


def test_a_model_without_transformers_layers_names_its_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
                          nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 2)).train()
    cm = peftc.compile(model, [peftc.LoRA(r=2, init=False).on(peftc.linear(r"[12]\.0"))], torch.randn(3, 8),
                       backend="eager")
    with pytest.raises(peftc.PeftcError, match="no GradientCheckpointingLayer.*layers="):
        cm.gradient_checkpointing_enable()
    x = torch.randn(64, 8)

    def grads():
        cm.zero_grad(set_to_none=True)
        cm(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in cm.named_parameters() if p.grad is not None}

    off, held_off = grads(), held_bytes(cm, lambda: cm(x))
    cm.gradient_checkpointing_enable(layers=r"[12]")
    on, held_on = grads(), held_bytes(cm, lambda: cm(x))
    assert off.keys() == on.keys() and off
    for name in off:
        torch.testing.assert_close(on[name], off[name], atol=0, rtol=0)
    assert held_on < held_off


def test_input_require_grads_as_transformers_hooks_them():
    model = make_llama().train()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA)).train()
    cm = peftc.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA), backend="eager").train()
    copy_peft_weights(cm, pm)
    plain = step(cm)
    for m in (pm, cm):
        m.requires_grad_(False)  # nothing trains: only the hook makes the outputs require grad
    ids = IDS[:2, :8]
    assert not pm(input_ids=ids).logits.requires_grad and not cm(input_ids=ids).logits.requires_grad
    pm.enable_input_require_grads()
    cm.enable_input_require_grads()
    cm.gradient_checkpointing_enable()
    theirs, ours = pm(input_ids=ids).logits, cm(input_ids=ids).logits
    assert theirs.requires_grad and ours.requires_grad
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.sum().backward()  # through the frozen, checkpointed layers
    cm.train()  # the active adapter trains again
    assert_same_step(step(cm), plain, atol=0)
    cm.disable_input_require_grads()
    cm.requires_grad_(False)
    assert not cm(input_ids=ids).logits.requires_grad


def test_input_require_grads_is_refused_under_compile():
    cm = peftc.compile(make_llama(), [peftc.LoRA(r=4).on(peftc.linear(r".*q_proj"))], backend="inductor")
    with pytest.raises(peftc.PeftcError, match="backend='eager'"):
        cm.enable_input_require_grads()
    assert cm.programs.input_grads is None
