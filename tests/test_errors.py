"""Bad inputs get a clear error, and the user's model is left exactly as it was."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_unchanged, make_llama, snapshot
from torch import nn

import peftc


@pytest.fixture(scope="module")
def llama_model():
    """One tiny Llama shared by the error tests: each checks it is left unchanged."""
    return make_llama()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))


class Small(nn.Module):
    """Embedding, norm and two linears: quick to trace, for errors that don't need a transformer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.q_proj = nn.Linear(8, 8)
        self.o_proj = nn.Linear(8, 8)

    def forward(self, ids):
        return self.o_proj(torch.relu(self.q_proj(self.norm(self.embed(ids)))))


@pytest.fixture
def small():
    return Small()


SMALL_INPUT = (torch.randint(0, 16, (2, 5)),)


def compile_fails(model, rules, error, match, **kwargs):
    """Compile must raise ``error`` whose message matches ``match``; the model must not change."""
    before = snapshot(model)
    kwargs.setdefault("backend", "eager")
    with pytest.raises(error, match=match) as info:
        peftc.compile(model, rules, **kwargs)
    assert_unchanged(model, before)
    return str(info.value)


# -- rules ------------------------------------------------------------------------------------


def test_rule_matching_nothing_names_nearest_paths(llama_model):
    msg = compile_fails(llama_model, [peftc.LoRA(r=4).on(peftc.linear(r".*\.q_prj"))],
                        peftc.RuleError, "matched no site")
    assert "q_prj" in msg
    assert re.search(r"model\.layers\.\d\.self_attn\.q_proj", msg), msg


def test_rule_matching_nothing_on_mlp():
    m = mlp()
    msg = compile_fails(m, [peftc.LoRA(r=4).on(peftc.linear("fc1"))], peftc.RuleError, "matched no site",
                        example_inputs=(torch.randn(2, 16),))
    # no path is close to "fc1", so the message lists the model's linear sites instead
    assert msg.endswith("matched no site. Some linear sites: 0, 2"), msg


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(r=0), "rank r=0 must be a positive integer"),
    (dict(r=-2), "r=-2"),
    (dict(r=2.5), "r=2.5"),
    (dict(r=True), "r=True"),
    (dict(alpha=0), "alpha=0 must be"),
    (dict(alpha=-1.0), "alpha=-1.0"),
    (dict(alpha=float("nan")), "alpha=nan"),
    (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    (dict(dropout=-0.1), "dropout=-0.1"),
    (dict(init="orthogonal"), "init='orthogonal'"),
    (dict(rank_pattern={"q_proj": 0}), "r=0"),
    (dict(alpha_pattern={"q_proj": -3}), "alpha=-3"),
])
def test_bad_lora_arguments(kwargs, match):
    with pytest.raises(peftc.RuleError, match=match):
        peftc.LoRA(**kwargs)


def test_bad_lora_in_a_rules_dict_leaves_model_unchanged(small):
    for adapter in ({"kind": "lora", "r": 0}, {"kind": "lora", "alpha": 0},
                    {"kind": "lora", "dropout": 1.0}):
        source = {"rules": [{"adapter": adapter, "select": {"linear": ".*q_proj"}}]}
        compile_fails(small, source, peftc.RuleError, "LoRA", example_inputs=SMALL_INPUT)


def test_two_rules_on_one_site(llama_model):
    rules = [peftc.LoRA(r=4).on(peftc.linear(r".*q_proj")),
             peftc.LoRA(r=2).on(peftc.linear(r".*layers\.0\..*"))]
    msg = compile_fails(llama_model, rules, peftc.RuleError, "both select")
    assert "model.layers.0.self_attn.q_proj" in msg
    # the documented way out: narrow the broad rule
    rules[1] = peftc.LoRA(r=2).on(peftc.linear(r".*layers\.0\..*") & ~peftc.module(r".*q_proj"))
    before = snapshot(llama_model)
    cm = peftc.compile(llama_model, rules, backend="eager")
    assert sum(p.path == "model.layers.0.self_attn.q_proj" for p in cm.sites) == 1
    _restore(llama_model, before)


def test_lora_on_unsupported_op_by_name(small):
    # LoRA on embeddings is supported (tests/test_lora_embedding.py); a normalisation is not
    compile_fails(small, [peftc.LoRA(r=4).on(peftc.op("aten.layer_norm"))], peftc.RuleError,
                  "LoRA supports linear-like ops .* embedding lookups, convolutions and stacks of experts, not aten.layer_norm",
                  example_inputs=SMALL_INPUT)


def test_lora_on_norm_weight_is_refused(small):
    msg = compile_fails(small, [peftc.LoRA(r=4).on(peftc.module("norm"))], peftc.RuleError, "norm",
                        example_inputs=SMALL_INPUT)
    assert "layer_norm" in msg


def test_modules_to_save_matching_nothing(small):
    compile_fails(small, [peftc.LoRA(r=4).on(peftc.linear(r".*q_proj"))], peftc.RuleError,
                  "no_such_head", modules_to_save=["no_such_head"], example_inputs=SMALL_INPUT)


def test_bad_selector_regex():
    with pytest.raises(peftc.RuleError, match="regular expression"):
        peftc.linear("q_proj(")


def test_not_a_rule():
    m = mlp()
    compile_fails(m, ["q_proj"], peftc.RuleError, "Rule", example_inputs=(torch.randn(2, 16),))
    compile_fails(m, [], peftc.RuleError, "no rules", example_inputs=(torch.randn(2, 16),))
    compile_fails(m, 42, peftc.RuleError, "int", example_inputs=(torch.randn(2, 16),))


# -- example inputs ---------------------------------------------------------------------------


def test_wrong_kwarg_name_for_llama(llama_model):
    ids = torch.randint(1, 128, (2, 8))
    msg = compile_fails(llama_model, [peftc.LoRA(r=4).on(peftc.linear(r".*q_proj"))], peftc.TraceError,
                        "LlamaForCausalLM", example_inputs={"input_idz": ids})
    assert "input_idz" in msg


def test_wrong_kwarg_name_for_mlp():
    m = mlp()
    msg = compile_fails(m, [peftc.LoRA(r=4).on(peftc.linear())], peftc.TraceError, "Sequential",
                        example_inputs={"x": torch.randn(2, 16)})
    assert "input" in msg  # the parameter the model's forward expects


def test_wrong_feature_size_for_mlp():
    m = mlp()
    msg = compile_fails(m, [peftc.LoRA(r=4).on(peftc.linear())], peftc.TraceError, "Sequential",
                        example_inputs=(torch.randn(4, 7),))
    assert "Tensor[4, 7]" in msg


def test_missing_example_inputs_for_plain_module():
    m = mlp()
    compile_fails(m, [peftc.LoRA(r=4).on(peftc.linear())], peftc.TraceError, "example_inputs")


def test_bad_example_inputs_type():
    m = mlp()
    compile_fails(m, [peftc.LoRA(r=4).on(peftc.linear())], peftc.TraceError, "example_inputs",
                  example_inputs="not a tensor")


# -- merge --------------------------------------------------------------------------------------


def _restore(model, before):
    with torch.no_grad():
        for key, (value, flag) in before.items():
            kind, name = key.split(":", 1)
            if kind == "param":
                p = model.get_parameter(name)
                p.copy_(value)
                p.requires_grad_(flag)


def test_safe_merge_with_nan_leaves_every_weight_untouched(llama_model):
    before = snapshot(llama_model)
    try:
        cm = peftc.compile(llama_model, [peftc.LoRA(r=4, init=False).on(peftc.linear(r".*(q|v)_proj"))],
                           backend="eager").eval()
        ids = torch.randint(1, 128, (2, 8))
        with torch.no_grad():
            y = cm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            cm.sites[-1].state.lora_B[0, 0] = float("nan")
        frozen = snapshot(llama_model)
        with pytest.raises(peftc.MergeError, match=re.escape(cm.sites[-1].path)) as info:
            cm.merge(safe=True)
        assert "no weight was changed" in str(info.value)
        assert not cm.merged
        assert_unchanged(llama_model, frozen)
        # the adapted graph still runs, with the other adapters intact
        with torch.no_grad():
            cm.sites[-1].state.lora_B[0, 0] = 0.0
            out = cm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert torch.isfinite(out).all()
        assert (out - y).abs().max() < 1.0
    finally:
        _restore(llama_model, before)


def test_safe_merge_with_inf_in_saved_copy():
    torch.manual_seed(0)
    m = mlp()
    x = torch.randn(2, 16)
    cm = peftc.compile(m, [peftc.LoRA(r=2).on(peftc.linear("0"))], example_inputs=(x,), backend="eager",
                       modules_to_save=["2"])
    with torch.no_grad():
        cm.peftc.saved.default.get_submodule("2").weight[0, 0] = float("inf")
    before = snapshot(m)
    with pytest.raises(peftc.MergeError, match="2.weight"):
        cm.merge(safe=True)
    assert_unchanged(m, before)
    assert not cm.merged


def test_merge_twice_and_unmerge_unmerged_warn():
    m = mlp()
    x = torch.randn(2, 16)
    cm = peftc.compile(m, [peftc.LoRA(r=2, init=False).on(peftc.linear())], example_inputs=(x,),
                       backend="eager")
    with pytest.warns(UserWarning, match="not merged"):
        cm.unmerge()
    cm.merge()
    merged = snapshot(m)
    with pytest.warns(UserWarning, match="already merged"):
        cm.merge()
    assert_unchanged(m, merged)


# -- rules dicts and files -----------------------------------------------------------------------


GOOD_RULE = {"adapter": {"kind": "lora", "r": 4}, "select": {"linear": ".*q_proj"}}


@pytest.mark.parametrize(("source", "match"), [
    ({"rules": [{"adapter": {"kind": "adalora", "r": 4}, "select": {"linear": ".*q_proj"}}]},
     "unknown adapter kind 'adalora'"),
    ({"rules": [{"adapter": {"r": 4}, "select": {"linear": ".*q_proj"}}]}, "unknown adapter kind None"),
    ({"rules": [{"adapter": {"kind": "lora", "rank": 4}, "select": {"linear": ".*"}}]}, "rank"),
    ({"rules": [{"adapter": {"kind": "lora", "r": 0}, "select": {"linear": ".*"}}]}, "rank"),
    ({"rules": [{"adapter": {"kind": "lora"}, "select": {"conv": ".*"}}]}, "unknown selector"),
    ({"rules": [{"adapter": {"kind": "lora"}, "select": {"linear": ".*", "layer": [0]}}]}, "layer"),
    ({"rules": [{"adapter": {"kind": "lora"}}]}, "rule 0"),
    ({"rulez": [GOOD_RULE]}, "rulez"),
    ({"rules": [GOOD_RULE], "bias": "some"}, "bias"),
    ({"peft_type": "LORA", "lora_bias": True, "target_modules": ["q_proj"]}, "lora_bias"),
])
def test_bad_rules_dict(small, source, match):
    compile_fails(small, source, peftc.RuleError, match, example_inputs=SMALL_INPUT)


def test_bad_selector_composition_dict():
    bad = {"rules": [{"adapter": {"kind": "lora"}, "select": {"any": []}}]}
    with pytest.raises(peftc.RuleError):
        peftc.load_rules(bad)


@pytest.mark.parametrize(("name", "text", "match"), [
    ("rules.yaml", "rules: [\n  {adapter: {kind: lora, r: 4}\n", "not valid YAML"),
    ("rules.json", '{"rules": [', "not valid JSON"),
    ("rules.toml", "[[rules]\nadapter = 1", "not valid TOML"),
    ("rules.txt", "rules: []", "unknown format"),
    ("rules.yaml", "rules:\n  - adapter: {kind: lorax, r: 4}\n    select: {linear: '.*q_proj'}\n", "lorax"),
])
def test_bad_rules_file(small, tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    compile_fails(small, str(path), peftc.RuleError, match, example_inputs=SMALL_INPUT)


def test_missing_rules_file(small, tmp_path):
    compile_fails(small, tmp_path / "nope.yaml", peftc.RuleError, "does not exist",
                  example_inputs=SMALL_INPUT)
