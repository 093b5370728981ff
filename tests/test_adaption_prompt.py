"""AdaptionPrompt (PEFT's AdaptionPromptConfig, LLaMA-Adapter): PEFT's numbers, counts and files,
both ways; zero-initialised gates; adapters, mixed batches, generation; errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    BUILDERS,
    assert_counts_like_peft,
    assert_greedy_like_peft,
    assert_unchanged,
    make_gpt2,
    make_llama,
    padded_batch,
    snapshot,
)
from safetensors.torch import load_file

import peftc

peft = pytest.importorskip("peft")

def _config(layers: int = 1, length: int = 3):
    return peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=length, adapter_layers=layers)


def _trained(pm, seed: int = 0):
    """PEFT's adapter with the gates opened (zero-initialised, they would hide everything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if n.endswith("adaption_gate"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return pm


def _load_peft_state(cm, pm, name: str = "default"):
    state = peft.get_peft_model_state_dict(pm)
    with torch.no_grad():
        for p in cm.sites:
            if p.adapter_name == name:
                for attr in ("adaption_prompt", "adaption_gate"):
                    getattr(p.state, attr).copy_(state[f"base_model.model.{p.key}.{attr}"])


@pytest.mark.parametrize("name", ["llama", "mistral"])  # Mistral: grouped-query attention
def test_matches_peft(name, capsys):
    """Same prompts and gates -> same logits and loss as PEFT; same trainable counts and line."""
    model = BUILDERS[name]()
    pm = _trained(peft.get_peft_model(copy.deepcopy(model), _config(layers=2))).eval()
    cm = peftc.compile(model, _config(layers=2), backend="eager").eval()
    assert [p.key for p in cm.sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    _load_peft_state(cm, pm)
    ids, mask = padded_batch(3, 7)
    for kwargs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask, "labels": ids}):
        ref, out = pm(**kwargs), cm(**kwargs)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert_counts_like_peft(cm, pm, capsys)


def test_zero_gates_leave_the_model_unchanged_and_train():
    """A new adapter is the base model (zero gates); the gate gets a gradient, then the prompt does."""
    model = make_llama()
    base = copy.deepcopy(model)
    cm = peftc.compile(model, [peftc.AdaptionPrompt(4, adapter_layers=1)], backend="eager")
    ids, mask = padded_batch(2, 6)
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits,
                               base(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    state = cm.sites[0].state
    assert cm.sites[0].key == "model.layers.1.self_attn" and not state.adaption_gate.any()
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for step in range(3):
        loss = cm(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        assert state.adaption_gate.grad.abs().sum() > 0
        prompt_grad = state.adaption_prompt.grad
        assert (prompt_grad.abs().sum() > 0) if step else not prompt_grad.any(), "no gradient through a shut gate"
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters(), strict=True))


def test_roundtrip_both_ways(tmp_path):
    model = make_llama()
    pm = _trained(peft.get_peft_model(copy.deepcopy(model), _config())).eval()
    pm.save_pretrained(tmp_path / "from_peft")
    ids, mask = padded_batch(3, 8)
    ref = pm(input_ids=ids, attention_mask=mask).logits

    cm = peftc.from_pretrained(copy.deepcopy(model), tmp_path / "from_peft", backend="eager")
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-5, rtol=0)
    cm.save_pretrained(tmp_path / "from_peftc")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "from_peftc").eval()
    torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-5, rtol=0)
    theirs = load_file(tmp_path / "from_peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "from_peftc" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) == ["base_model.model.model.layers.1.self_attn.adaption_gate",
                                              "base_model.model.model.layers.1.self_attn.adaption_prompt"]

    # sites PEFT's rule (the top N modules of one name) can't find are saved in peftc's format
    odd = peftc.compile(copy.deepcopy(model), [peftc.AdaptionPrompt(2).on(peftc.attention(layers=[0]))],
                        backend="eager")
    odd.save_pretrained(tmp_path / "odd")
    again = peftc.from_pretrained(copy.deepcopy(model), tmp_path / "odd", backend="eager")
    assert [p.key for p in again.sites] == ["model.layers.0.self_attn"]


def test_adapters_mixed_batch_and_generation():
    """set_adapter / disable_adapter / mixed batches row by row, and greedy generation equal to PEFT's."""
    model = make_llama()
    base = copy.deepcopy(model)
    pm = _trained(peft.get_peft_model(copy.deepcopy(model), _config(layers=2))).eval()
    cm = peftc.compile(model, _config(layers=2), backend="eager").eval()
    _load_peft_state(cm, pm)
    cm.add_adapter("top", [peftc.AdaptionPrompt(2, adapter_layers=1)])
    with torch.no_grad():
        cm.peftc.adapters.top.get_submodule("model.layers.1.self_attn").adaption_gate.fill_(1.0)
    ids, mask = padded_batch(3, 7)
    mask[1] = 1  # left padding only, as generation wants
    assert_greedy_like_peft(pm, cm, ids, mask)

    rows = {}
    for name in ("default", "top"):
        cm.set_adapter(name)
        rows[name] = cm(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(rows["default"], rows["top"])
    with cm.disable_adapter():
        rows["__base__"] = cm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(rows["__base__"], base(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
    names = ["top", "__base__", "default"]
    mixed = cm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], rows[name][row], atol=1e-6, rtol=0)


def test_top_layers_selector():
    model = make_llama(num_hidden_layers=4)
    cm = peftc.compile(model, [peftc.AdaptionPrompt(2).on(peftc.attention(top=3) & ~peftc.attention(layers=[2]))],
                       backend="eager")
    assert [p.site.layer for p in cm.sites] == [1, 3]
    assert repr(peftc.attention(top=3)) == "attention(top=3)"


def test_errors():
    for bad, match in [(dict(adapter_len=0), "num_virtual_tokens=0"),
                       (dict(adapter_len=2, adapter_layers=0), "adapter_layers=0")]:
        with pytest.raises(peftc.RuleError, match=match):
            peftc.AdaptionPrompt(**bad)
    cases = [
        (make_gpt2(), [peftc.AdaptionPrompt(2, 1)], "one fused projection .*c_attn"),
        (make_llama(attention_bias=True), _config(), "adds a bias, which PEFT's AdaptionPrompt adds a second time"),
        (make_llama(), _config(layers=3), "asks for 3 layers, but the model has 2"),
        (make_llama(), [peftc.AdaptionPrompt(2).on(peftc.linear(r".*q_proj"))], "goes on attention ops"),
        (make_llama(), [peftc.AdaptionPrompt(2, 2).on(peftc.attention(layers=[1]))], "was put on 1 attention op"),
        (make_llama(), {**_config().to_dict(), "adapter_len": None}, "needs adapter_len and adapter_layers"),
    ]
    for model, rules, match in cases:
        before = snapshot(model)
        with pytest.raises(peftc.RuleError, match=match):
            peftc.compile(model, rules, backend="eager")
        assert_unchanged(model, before)
    cm = peftc.compile(make_llama(), [peftc.AdaptionPrompt(2, 1)], backend="eager")
    with pytest.raises(peftc.MergeError, match="can.t be folded into weights"):
        cm.merge_and_unload()
