"""The examples in ``examples/custom/``: each runs, trains, and does what its docstring says.

Each example is imported from its file and its ``main()`` run with few steps.
IA³ (the one custom kind that merges) is also property-tested through
``peftc.testing`` on random models.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peftc
from peftc.testing import assert_merge_equivalent, assert_unmerge_restores
from peftc.testing import strategies as pst

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "custom"


def load(name: str):
    if f"custom_example_{name}" in sys.modules:
        return sys.modules[f"custom_example_{name}"]
    spec = importlib.util.spec_from_file_location(f"custom_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_examples_use_only_the_public_api():
    public = {"peftc", "peftc.pattern", "peftc.testing"}
    for path in EXAMPLES.glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import) (peftc[\w.]*)", path.read_text(), re.M)
        assert imports and set(imports) <= public, (path.name, imports)
    assert (EXAMPLES / "README.md").is_file()


# -- 1. IA3 ----------------------------------------------------------------------------------


def test_ia3_example(capsys):
    ia3 = load("ia3")
    out = ia3.main(steps=3)
    assert out["sites"] == 6  # k_proj, v_proj, down_proj in 2 layers
    assert out["losses"][-1] < out["losses"][0]
    assert out["merge_gap"] < 1e-4
    assert "assert_merge_equivalent: passed" in capsys.readouterr().out


def test_ia3_fits_in_60_lines():
    source = (EXAMPLES / "ia3.py").read_text()
    start = source.index("class IA3(")
    body = source[start:source.index("\n\n\n", start)]
    assert len(body.splitlines()) < 60


IA3_RULES = st.sampled_from(["kv", "ff", "both"])


def ia3_rules(ia3, which):
    rules = []
    if which in ("kv", "both"):
        rules.append(ia3.IA3().on(peftc.linear(r".*\.(k|v)_proj")))
    if which in ("ff", "both"):
        rules.append(ia3.IA3(feedforward=True).on(peftc.linear(r".*\.down_proj")))
    return rules


@settings(max_examples=3)
@given(data=st.data(), which=IA3_RULES)
def test_ia3_merge_property_on_transformers(data, which):
    ia3 = load("ia3")
    model = data.draw(pst.models(kinds=("transformer",)))
    inputs = data.draw(pst.inputs(model))
    assert_merge_equivalent(model, ia3_rules(ia3, which), inputs)
    assert_unmerge_restores(model, ia3_rules(ia3, which), inputs)


@settings(max_examples=4)
@given(data=st.data(), feedforward=st.booleans())
def test_ia3_merge_property_on_mlps(data, feedforward):
    """Every layer form: nn.Linear ([out, in]) and x @ W ([in, out]), with and without bias."""
    ia3 = load("ia3")
    case = data.draw(pst.cases(adapters=st.just(ia3.IA3(feedforward=feedforward)), kinds=("mlp",)))
    assert_merge_equivalent(*case)
    assert_unmerge_restores(*case)


# -- 2. LoRA on einsum and x @ W -------------------------------------------------------------


def test_einsum_lora_example():
    ex = load("einsum_lora")
    out = ex.main(steps=5)
    assert sorted(out["sites"]) == ["aten.einsum.default"] * 2 + ["aten.matmul.default"] * 2
    assert out["losses"][-1] < out["losses"][0]
    assert out["merge_gap"] < 1e-4


def test_einsum_lora_merges_into_the_einsum_weight_in_float64():
    ex = load("einsum_lora")
    model = ex.EinsumModel().double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    assert_merge_equivalent(model, ex.rules(), (x,))  # float64 tolerance: 1e-10
    assert_unmerge_restores(model, ex.rules(), (x,))


# -- 3. Houlsby -----------------------------------------------------------------------------------


def test_houlsby_example():
    ex = load("houlsby")
    out = ex.main(steps=5)
    assert out["sites"] == ["blocks.0", "blocks.1"]  # one per MLP block, found by structure
    assert out["start_gap"] < 1e-5  # up-projection starts at zero
    assert out["losses"][-1] < out["losses"][0]
    cm = out["cm"]
    assert all(p.site.op == "aten.linear.default" and p.site.params["w2"] == "w2" for p in cm.sites)
    with pytest.raises(peftc.MergeError, match="can't be folded"):
        cm.merge()


# -- 4. temperature -------------------------------------------------------------------------------


def test_temperature_example():
    ex = load("temperature")
    out = ex.main(steps=5)
    cm = out["cm"]
    assert [p.path for p in cm.sites] == ["layers.0", "layers.1"]
    assert all(p.site.op == "aten.softmax.int" and p.num_params == 4 for p in cm.sites)  # one per head
    assert out["start_gap"] == 0.0  # exp(0) = 1: the base model's attention, exactly
    assert out["losses"][-1] < out["losses"][0]
    assert any(abs(t - 1) > 1e-3 for temps in out["temperatures"] for t in temps)


# -- what custom kinds get for free ----------------------------------------------------------------


def test_custom_kinds_switch_mix_merge_and_compile():
    """Two custom kinds as two named adapters: switching, per-row mixing, disabling, merging,
    all through torch.compile (``aot_eager``: dynamo and AOT autograd, no code generation)."""
    temperature, ia3 = load("temperature"), load("ia3")
    model = temperature.TinyEncoder(depth=1)
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(x)
    from peftc.pattern import pattern

    cm = peftc.compile(model, [temperature.Temperature().on(pattern(temperature.attention_probs))],
                       example_inputs=(x,), backend="aot_eager")
    cm.add_adapter("ia3", [ia3.IA3().on(peftc.linear(r".*\.out"))])
    with torch.no_grad():
        for p in cm.peftc.adapters.parameters():
            p.add_(0.3 * torch.randn_like(p))
        y_temp = cm(x)
        cm.set_adapter("ia3")
        y_ia3 = cm(x)
        with cm.disable_adapter():
            torch.testing.assert_close(cm(x), base)
        with cm.mixed_batch(["default", "ia3", "__base__", "ia3"], 4):
            y_mix = cm(x)
        for row, want in enumerate([y_temp, y_ia3, base, y_ia3]):
            torch.testing.assert_close(y_mix[row], want[row])
        assert (y_temp - base).abs().max() > 1e-3 and (y_ia3 - base).abs().max() > 1e-3
        cm.merge()  # the active adapter, IA3, merges; the temperature adapter is not active
        torch.testing.assert_close(cm(x), y_ia3, atol=1e-5, rtol=1e-5)
        cm.unmerge()
        cm.set_adapter("default")
        torch.testing.assert_close(cm(x), y_temp)


def test_testing_section_snippet_runs(monkeypatch):
    """The README's "Testing your own adapter" snippet runs as written."""
    text = (EXAMPLES.parent.parent / "README.md").read_text()
    assert "## Testing your own adapter" in text, "the README lost its 'Testing your own adapter' section"
    section = text[text.index("## Testing your own adapter"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    assert len(code.strip().splitlines()) <= 15
    module = type(sys)("my_adapters")
    module.IA3 = load("ia3").IA3
    monkeypatch.setitem(sys.modules, "my_adapters", module)
    namespace: dict = {}
    exec(compile(re.sub(r"max_examples=\d+", "max_examples=2", code), "snippet", "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_")]
    assert len(tests) == 1
    tests[0]()


def test_custom_kind_roundtrip():
    from peftc.testing import assert_roundtrip

    ia3 = load("ia3")
    model = pst.TinyMLP([3, 4, 2], ["linear", "matmul"], [True, False])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert_roundtrip(model, [ia3.IA3().on(peftc.linear())], (x,))
