"""DoRA (``peftc.DoRA``, PEFT's ``LoraConfig(use_dora=True)``) against PEFT 0.21 with identical weights.

Each case wraps a deep copy of a tiny model with ``peft.get_peft_model``, draws
PEFT's ``lora_B`` and ``lora_magnitude_vector`` at random (B zeros and the
magnitude at the weight's norms would make DoRA a no-op), compiles the original
with the same config, copies the tensors over, and compares.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import (
    BUILDERS,
    assert_merges_to_base_graph,
    assert_unchanged,
    one_layer,
    padded_batch,
    snapshot,
)
from conftest import no_grad_logits as logits
from hypothesis import given, settings
from peft import LoraConfig

import peftc
from peftc.testing import assert_merge_equivalent, assert_roundtrip, assert_unmerge_restores
from peftc.testing import strategies as pst

ATOL = 1e-5
PREFIX = "base_model.model."


def randomise(pm, seed: int = 1, adapter: str = "default") -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith(f"lora_B.{adapter}.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(f"lora_magnitude_vector.{adapter}.weight"):
                p.mul_(0.5 + torch.rand(p.shape, generator=g))


def copy_tensors(cm, pm, adapter: str = "default") -> None:
    sd = pm.state_dict()
    with torch.no_grad():
        for p in cm.sites:
            if p.adapter_name == adapter:
                key = f"{PREFIX}{p.path}."
                p.state.lora_A.copy_(sd[f"{key}lora_A.{adapter}.weight"])
                p.state.lora_B.copy_(sd[f"{key}lora_B.{adapter}.weight"])
                p.state.lora_magnitude_vector.copy_(sd[f"{key}lora_magnitude_vector.{adapter}.weight"])


def build_pair(arch: str, config: LoraConfig, seed: int = 0, train_inputs: dict | None = None, **overrides):
    """(model, PEFT's model, peftc's) on a one-layer ``arch`` with PEFT's random tensors in both, in
    eval mode; in training mode with ``train_inputs``, which peftc's first trace is then of."""
    model = BUILDERS[arch](seed=seed, **{**one_layer(arch), **overrides}).train(train_inputs is not None)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).train(model.training)
    cm = peftc.compile(model, config, train_inputs, backend="eager").train(model.training)
    # the magnitude starts at the weight's row norms, as PEFT's does (B is zero: A doesn't matter)
    for p in cm.sites:
        theirs = pm.state_dict()[f"{PREFIX}{p.path}.lora_magnitude_vector.default.weight"]
        torch.testing.assert_close(p.state.lora_magnitude_vector.detach(), theirs, atol=1e-6, rtol=1e-6)
    randomise(pm)
    copy_tensors(cm, pm)
    return model, pm, cm


CASES = [
    pytest.param("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"]), id="llama"),
    pytest.param("qwen2", dict(target_modules=["q_proj", "k_proj", "gate_proj"], use_rslora=True),
                 id="qwen2-biases-rslora"),
    pytest.param("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), id="gpt2-conv1d"),
    pytest.param("bert", dict(task_type="SEQ_CLS", target_modules=["query", "value", "output.dense"]),
                 id="bert-seq-cls"),
]


@pytest.mark.parametrize(("arch", "kwargs"), CASES)
def test_parity_with_peft(arch, kwargs, capsys):
    kwargs = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "use_dora": True, **kwargs}
    model, pm, cm = build_pair(arch, LoraConfig(**kwargs))
    original = snapshot(model)
    assert {type(p.adapter) for p in cm.sites} == {peftc.DoRA}
    ids, mask = padded_batch()
    want = logits(pm, ids, mask)
    torch.testing.assert_close(logits(cm, ids, mask), want, atol=ATOL, rtol=0)
    with pm.disable_adapter():
        base = logits(pm, ids, mask)
    assert (want - base).abs().max() > 10 * ATOL  # the adapter matters, beyond the tolerance
    with cm.disable_adapter():
        torch.testing.assert_close(logits(cm, ids, mask), base, atol=ATOL, rtol=0)

    cm.print_trainable_parameters()
    pm.print_trainable_parameters()
    ours, theirs = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs

    # merged: PEFT's merge_and_unload; unmerged: the weights as they were
    cm.merge()
    merged_peft = pm.merge_and_unload()
    torch.testing.assert_close(logits(cm, ids, mask), logits(merged_peft, ids, mask), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(model, ids, mask), logits(merged_peft, ids, mask), atol=ATOL, rtol=0)
    cm.unmerge()
    torch.testing.assert_close(logits(cm, ids, mask), want, atol=ATOL, rtol=0)
    for key, (value, _) in snapshot(model).items():
        torch.testing.assert_close(value, original[key][0], atol=1e-6, rtol=1e-5)


def test_merged_graph_is_the_base_graph():
    adapted = assert_merges_to_base_graph([peftc.DoRA(init=False).on(peftc.linear())])
    assert "aten.linalg_vector_norm.default" in adapted


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_match_peft(arch):
    no_dropout = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}.get(arch, {})
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    ids, mask = padded_batch()
    _, pm, cm = build_pair(arch, LoraConfig(task_type="CAUSAL_LM", r=4, use_dora=True, target_modules=targets,
                                            fan_in_fan_out=arch == "gpt2"),
                           train_inputs=dict(input_ids=ids, attention_mask=mask, labels=ids), **no_dropout)
    for m in (pm, cm):
        m.train()
        m(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for p in cm.sites:
        for ours, theirs in ((p.state.lora_A, "lora_A.default.weight"), (p.state.lora_B, "lora_B.default.weight"),
                             (p.state.lora_magnitude_vector, "lora_magnitude_vector.default.weight")):
            torch.testing.assert_close(ours.grad, grads[f"{PREFIX}{p.path}.{theirs}"], atol=ATOL, rtol=1e-4)
            assert ours.grad.abs().max() > 0
    assert all(p.grad is None for p in cm.base_model.parameters())


def test_dropout_in_training_matches_peft():
    # one adapted linear, so both draw their one dropout mask from the same generator state
    model = pst.TinyMLP([6, 5], ["linear"], [True])
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, use_dora=True, target_modules=["layers.0"])
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    cm = peftc.compile(model, config, example_inputs=(torch.randn(4, 6),), backend="eager")
    randomise(pm)
    copy_tensors(cm, pm)
    pm.train()
    cm.train()
    x = torch.randn(4, 6)
    torch.manual_seed(3)
    want = pm(x)
    torch.manual_seed(3)
    got = cm(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert not torch.allclose(got, cm.eval()(x))  # dropout did something


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoints_both_ways(arch, tmp_path):
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    model, pm, cm = build_pair(arch, LoraConfig(task_type="CAUSAL_LM", r=4, use_dora=True, target_modules=targets,
                                                fan_in_fan_out=arch == "gpt2"))
    ids, mask = padded_batch()
    want = logits(pm, ids, mask)

    cm.save_pretrained(tmp_path / "ours")  # peftc saves, PEFT loads
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    pm.save_pretrained(tmp_path / "theirs")
    assert keys.keys() == load_file(tmp_path / "theirs" / "adapter_model.safetensors").keys()
    loaded = peft.PeftModel.from_pretrained(BUILDERS[arch](**one_layer(arch)), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, ids, mask), want, atol=ATOL, rtol=0)

    ours = peftc.from_pretrained(BUILDERS[arch](**one_layer(arch)), tmp_path / "theirs", backend="eager").eval()  # and back
    assert {type(p.adapter) for p in ours.sites} == {peftc.DoRA}
    torch.testing.assert_close(logits(ours, ids, mask), want, atol=ATOL, rtol=0)


def test_config_and_native_constructor_agree():
    ids, mask = padded_batch()
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    from_config = peftc.compile(BUILDERS["llama"](**one_layer("llama")), config, backend="eager")
    native = peftc.compile(BUILDERS["llama"](**one_layer("llama")), [peftc.DoRA(r=4, alpha=8).on(peftc.linear(r".*\.(q|v)_proj"))],
                           backend="eager")
    for cm in (from_config, native):
        with torch.no_grad():
            for p in cm.sites:
                p.state.lora_B.fill_(0.01)
                p.state.lora_A.fill_(0.02)
                p.state.lora_magnitude_vector.mul_(1.5)
    assert {p.path for p in from_config.sites} == {p.path for p in native.sites}
    torch.testing.assert_close(logits(from_config, ids, mask), logits(native, ids, mask), atol=0, rtol=0)


def test_adapters_switch_mix_and_disable():
    model = BUILDERS["llama"](**one_layer("llama"))
    cm = peftc.compile(model, [peftc.DoRA(r=2, init=False).on(peftc.linear(r".*\.(q|v)_proj"))], backend="eager")
    cm.add_adapter("other", [peftc.DoRA(r=3, init=False).on(peftc.linear(r".*\.(k|v)_proj"))])
    with torch.no_grad():
        for p in cm.sites:
            p.state.lora_magnitude_vector.mul_(1.3)
    ids, mask = padded_batch(3, 7)
    outs = {}
    for name in ("default", "other"):
        cm.set_adapter(name)
        outs[name] = logits(cm, ids, mask)
    with cm.disable_adapter():
        outs["__base__"] = logits(cm, ids, mask)
    assert (outs["default"] - outs["other"]).abs().max() > 1e-3
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = cm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], outs[name][row], atol=ATOL, rtol=0)


def test_disable_while_merged_and_merge_of_a_zero_magnitude():
    model = BUILDERS["llama"](**one_layer("llama"))
    cm = peftc.compile(model, [peftc.DoRA(init=False).on(peftc.linear(r".*q_proj"))], backend="eager")
    ids, mask = padded_batch()
    want = logits(cm, ids, mask)
    with cm.disable_adapter():
        base = logits(cm, ids, mask)
    cm.merge()
    with cm.disable_adapter():  # takes the merged DoRA out and puts it back
        torch.testing.assert_close(logits(cm, ids, mask), base, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(cm, ids, mask), want, atol=ATOL, rtol=0)
    cm.unmerge()
    with torch.no_grad():
        cm.sites[0].state.lora_magnitude_vector[0] = 0.0
    cm.merge()
    merged = snapshot(model)
    with pytest.raises(peftc.MergeError, match="zero magnitude"):
        cm.unmerge()
    assert_unchanged(model, merged)


@pytest.mark.parametrize(("config", "match"), [
    (dict(use_dora=True, target_modules=["embed_tokens"]), "DoRA supports linear-like ops"),
    (dict(use_dora=True, target_modules=["q_proj"], init_lora_weights="pissa"), "DoRA with init='pissa'"),
    (dict(use_dora=True, target_modules=["q_proj"], lora_bias=True), "lora_bias"),
])
def test_unsupported_dora_is_a_rule_error(config, match):
    model = BUILDERS["llama"](**one_layer("llama"))
    before = snapshot(model)
    with pytest.raises(peftc.RuleError, match=match):
        peftc.compile(model, {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, **config}, backend="eager")
    assert_unchanged(model, before)


def test_dora_adapters_cant_be_combined_by_concatenation():
    model = BUILDERS["llama"](**one_layer("llama"))
    with pytest.raises(peftc.RuleError, match="can't combine"):
        cm = peftc.compile(model, [peftc.DoRA().on(peftc.linear(r".*q_proj"))], backend="eager")
        cm.add_adapter("b", [peftc.DoRA().on(peftc.linear(r".*q_proj"))])
        cm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "ab", combination_type="cat")


@settings(max_examples=8, deadline=None)
@given(case=pst.cases(adapters=pst.doras(), kinds=("mlp",)))
def test_merge_and_unmerge_properties(case):
    assert_merge_equivalent(case.model, case.rules, case.inputs)
    assert_unmerge_restores(case.model, case.rules, case.inputs)


@settings(max_examples=3, deadline=None)
@given(case=pst.cases(adapters=pst.doras(), dtypes=(torch.float32,), forms=("linear",), kinds=("mlp",)))
def test_roundtrip_property(case):
    assert_roundtrip(case.model, case.rules, case.inputs)


def test_greedy_generation_equals_peft():
    # prefill and decode graphs adapt each linear op as the forward does; every step's logits within 1e-5
    _, pm, cm = build_pair("llama", LoraConfig(task_type="CAUSAL_LM", r=4, use_dora=True,
                                               target_modules=["q_proj", "v_proj", "down_proj"]))
    ids, mask = padded_batch()
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = pm.generate(input_ids=ids, attention_mask=mask, **greedy)
    out = cm.generate(input_ids=ids, attention_mask=mask, **greedy)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
