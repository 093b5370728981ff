"""IA³ (``peftc.IA3``, PEFT's ``IA3Config``) against PEFT 0.21 with identical vectors.

Each case wraps a deep copy of a tiny model with ``peft.get_peft_model``, draws
PEFT's ``ia3_l`` vectors at random (ones would make every check trivial),
compiles the original with the same config, copies the vectors over, and compares.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import (
    BUILDERS,
    assert_matches_peft,
    assert_merges_to_base_graph,
    padded_batch,
    snapshot,
)
from conftest import (
    no_grad_logits as logits,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import IA3Config
from peft.tuners.ia3 import IA3Layer

import peftc
from peftc.testing import assert_merge_equivalent, assert_unmerge_restores
from peftc.testing import strategies as pst

ATOL = 1e-5
PREFIX = "base_model.model."


def randomise(pm, seed: int = 1, adapter: str = "default") -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith(f"ia3_l.{adapter}"):
                p.copy_(0.2 + 1.6 * torch.rand(p.shape, generator=g))


def copy_vectors(cm, pm, adapter: str = "default") -> None:
    sd = pm.state_dict()
    with torch.no_grad():
        for p in cm.sites:
            if p.adapter_name == adapter:
                p.state.ia3_l.copy_(sd[f"{PREFIX}{p.path}.ia3_l.{adapter}"])


def build_pair(arch: str, config: IA3Config, seed: int = 0, **overrides):
    model = BUILDERS[arch](seed=seed, **overrides)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).eval()
    randomise(pm)
    cm = peftc.compile(model, config, backend="eager").eval()
    copy_vectors(cm, pm)
    return model, pm, cm


CASES = [
    pytest.param("llama", dict(), id="llama-defaults"),
    pytest.param("llama", dict(target_modules=r".*\.(q_proj|v_proj|up_proj|down_proj)",
                               feedforward_modules=r".*\.(up|down)_proj"), id="llama-regex"),
    pytest.param("qwen2", dict(target_modules=["q_proj", "k_proj", "gate_proj"],
                               feedforward_modules=["gate_proj"]), id="qwen2-biases"),
    pytest.param("gpt2", dict(), id="gpt2-conv1d-defaults"),
    pytest.param("gpt2", dict(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_attn"],
                              exclude_modules=["h.0.attn.c_attn"]), id="gpt2-conv1d-ff-exclude"),
    pytest.param("bert", dict(task_type="SEQ_CLS"), id="bert-seq-cls-defaults"),
]


@pytest.mark.parametrize(("arch", "kwargs"), CASES)
def test_parity_with_peft(arch, kwargs, capsys):
    kwargs = {"task_type": "CAUSAL_LM", **kwargs}
    model, pm, cm = build_pair(arch, IA3Config(**kwargs))
    layers = {n.removeprefix(PREFIX): m for n, m in pm.named_modules() if isinstance(m, IA3Layer)}
    assert {p.path: p.adapter.feedforward for p in cm.sites} == {k: m.is_feedforward for k, m in layers.items()}
    assert {p.path for p in cm.sites if p.adapter.feedforward}  # every case has both kinds of site
    assert {p.path for p in cm.sites if not p.adapter.feedforward}

    assert_matches_peft(model, pm, cm, capsys)


def test_merged_graph_is_the_base_graph():
    assert_merges_to_base_graph(IA3Config(task_type="CAUSAL_LM"))


NO_DROPOUT = {"llama": {}, "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_match_peft(arch):
    _, pm, cm = build_pair(arch, IA3Config(task_type="CAUSAL_LM"), **NO_DROPOUT[arch])
    ids, mask = padded_batch()
    for m in (pm, cm):
        m.train()
        out = m(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for p in cm.sites:
        theirs = grads[f"{PREFIX}{p.path}.ia3_l.default"]
        torch.testing.assert_close(p.state.ia3_l.grad, theirs, atol=ATOL, rtol=1e-4)
        assert p.state.ia3_l.grad.abs().max() > 0
    assert all(p.grad is None for n, p in cm.base_model.named_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_checkpoints_both_ways(arch, tmp_path):
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    model, pm, cm = build_pair(arch, IA3Config(task_type=task))
    ids, mask = padded_batch()
    want = logits(pm, ids, mask)

    # peftc saves, PEFT loads
    cm.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    loaded = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, ids, mask), want, atol=ATOL, rtol=0)
    assert isinstance(peft.PeftConfig.from_peft_type(**cm.peft_config["default"]), IA3Config)

    # PEFT saves, peftc loads
    pm.save_pretrained(tmp_path / "theirs")
    ours = peftc.from_pretrained(BUILDERS[arch](), tmp_path / "theirs", backend="eager").eval()
    torch.testing.assert_close(logits(ours, ids, mask), want, atol=ATOL, rtol=0)
    assert {p.path: p.adapter.feedforward for p in ours.sites} == {p.path: p.adapter.feedforward for p in cm.sites}


def test_config_object_dict_and_native_constructor_agree():
    ids, mask = padded_batch()
    config = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"],
                       feedforward_modules=["down_proj"])
    as_object = peftc.compile(BUILDERS["llama"](), config, backend="eager")
    as_dict = peftc.compile(BUILDERS["llama"](), json.loads(json.dumps(config.to_dict(), default=list)),
                            backend="eager")
    native = peftc.compile(BUILDERS["llama"](), [peftc.IA3().on(peftc.linear(r".*k_proj")),
                                                 peftc.IA3(feedforward=True).on(peftc.linear(r".*down_proj"))],
                           backend="eager")
    for cm in (as_object, as_dict, native):
        with torch.no_grad():
            for p in cm.sites:
                p.state.ia3_l.copy_(torch.linspace(0.5, 1.5, p.state.ia3_l.numel()).view_as(p.state.ia3_l))
    sites = {(p.path, p.adapter.feedforward) for p in native.sites}
    assert {(p.path, p.adapter.feedforward) for p in as_object.sites} == sites
    assert {(p.path, p.adapter.feedforward) for p in as_dict.sites} == sites
    want = logits(native, ids, mask)
    torch.testing.assert_close(logits(as_object, ids, mask), want, atol=0, rtol=0)
    torch.testing.assert_close(logits(as_dict, ids, mask), want, atol=0, rtol=0)


def test_mixed_batch_and_nan_in_an_inactive_adapter():
    model = BUILDERS["llama"]()
    cm = peftc.compile(model, IA3Config(task_type="CAUSAL_LM"), backend="eager")
    cm.add_adapter("other", IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "up_proj"],
                                      feedforward_modules=["up_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cm.sites:
            p.state.ia3_l.copy_(0.5 + torch.rand(p.state.ia3_l.shape, generator=g))
    ids, mask = padded_batch(3, 7)
    outs = {}
    for name in ("default", "other"):
        cm.set_adapter(name)
        outs[name] = logits(cm, ids, mask)
    with cm.disable_adapter():
        outs["__base__"] = logits(cm, ids, mask)
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = cm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], outs[name][row], atol=1e-6, rtol=0)

    # NaN in the inactive adapter reaches neither the output nor a gradient
    cm.set_adapter("default")
    with torch.no_grad():
        for p in cm.sites:
            if p.adapter_name == "other":
                p.state.ia3_l.fill_(float("nan"))
    cm.train()
    out = cm(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)  # (a training call with labels returns no logits: the fused loss)
    assert all(torch.isfinite(p.state.ia3_l.grad).all() for p in cm.sites if p.adapter_name == "default")


def test_unmerging_a_zero_scale_is_refused():
    model = BUILDERS["llama"]()
    cm = peftc.compile(model, IA3Config(task_type="CAUSAL_LM"), backend="eager")
    with torch.no_grad():
        cm.sites[0].state.ia3_l[0] = 0.0
    cm.merge()
    merged = snapshot(model)
    with pytest.raises(peftc.MergeError, match="zero scale"):
        cm.unmerge()
    after = snapshot(model)
    assert all(torch.equal(after[k][0], v[0]) for k, v in merged.items())


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "not in target_modules"),
    (dict(target_modules=["k_proj"], feedforward_modules=[], init_ia3_weights="yes"), "init_ia3_weights"),
])
def test_bad_configs_are_rule_errors(kwargs, match):
    model = BUILDERS["llama"]()
    before = snapshot(model)
    with pytest.raises(peftc.RuleError, match=match):
        peftc.compile(model, {"peft_type": "IA3", "task_type": "CAUSAL_LM", **kwargs}, backend="eager")
    after = snapshot(model)
    assert all(torch.equal(after[k][0], v[0]) and after[k][1] == v[1] for k, v in before.items())


def test_no_default_for_an_unknown_model_type():
    with pytest.raises(peftc.RuleError, match="no target_modules.*set target_modules"):
        peftc.compile(pst.TinyMLP([4, 4], ["linear"], [True]), {"peft_type": "IA3"},
                      example_inputs=(torch.randn(2, 4),), backend="eager")
    with pytest.raises(peftc.RuleError, match="must be True or False"):
        peftc.IA3(feedforward="yes")


@settings(max_examples=10, deadline=None)
@given(case=pst.cases(adapters=st.builds(peftc.IA3, feedforward=st.booleans()), kinds=("mlp",)))
def test_merge_and_unmerge_properties(case):
    assert_merge_equivalent(case.model, case.rules, case.inputs)
    assert_unmerge_restores(case.model, case.rules, case.inputs)
