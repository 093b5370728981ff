"""Property tests: random MLP stacks and random tiny Llama configs.

References are independent of peftc: a float64 recomputation from the weights
(``conftest.reference_forward``), the model's own eager forward, and a fresh
``torch.export`` of the base model for the graph structure.
"""

from __future__ import annotations

import pytest
import torch
from conftest import aten_ops, make_llama, padded_batch, reference_forward
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.export import Dim

import peftc
from peftc.testing.strategies import TinyMLP

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# every linear form peftc adapts: nn.Linear, F.linear, x @ W ([in, out]) and x @ W.T ([out, in])
FORMS = ["linear", "flinear", "matmul", "matmul_t"]


@st.composite
def stacks(draw):
    depth = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(2, 12), min_size=depth + 1, max_size=depth + 1))
    forms = draw(st.lists(st.sampled_from(FORMS), min_size=depth, max_size=depth))
    biases = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    chosen = draw(st.sets(st.integers(0, depth - 1), min_size=1))
    return {
        "widths": widths, "forms": forms, "biases": biases, "chosen": sorted(chosen),
        "seed": draw(st.integers(0, 2**16)),
        "r": draw(st.integers(1, 6)),
        "alpha": draw(st.sampled_from([1, 2, 8, 16.5])),
        "lead": draw(st.sampled_from([(3,), (2, 5)])),
        "rslora": draw(st.booleans()),
    }


def build_stack(spec, dtype, init=False):
    model = TinyMLP(spec["widths"], spec["forms"], spec["biases"], seed=spec["seed"], dtype=dtype)
    torch.manual_seed(spec["seed"])
    x = torch.randn(*spec["lead"], spec["widths"][0], dtype=dtype)
    chosen = {f"layers.{i}" for i in spec["chosen"]}
    rule = peftc.LoRA(r=spec["r"], alpha=spec["alpha"], init=init, use_rslora=spec["rslora"]).on(
        peftc.linear() & peftc.where(lambda s: s.path in chosen, "chosen"))
    cm = peftc.compile(model, [rule], example_inputs=(x,), backend="eager")
    assert {p.path for p in cm.sites} == chosen
    return model, cm, x


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=8)
@given(spec=stacks())
def test_unmerged_matches_float64_reference(spec, dtype):
    model, cm, x = build_stack(spec, dtype)
    for p in cm.sites:
        assert p.state.lora_A.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    y = cm(x)
    assert y.dtype == dtype
    ref = reference_forward(model, cm, x)
    torch.testing.assert_close(y.double(), ref, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=8)
@given(spec=stacks())
def test_merged_equals_unmerged(spec, dtype):
    model, cm, x = build_stack(spec, dtype)
    y = cm(x)
    cm.merge()
    assert cm.merged
    torch.testing.assert_close(cm(x), y, atol=TOL[dtype], rtol=TOL[dtype])
    # the merged model's own forward (no graph at all) agrees as well
    torch.testing.assert_close(model(x), y, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=8)
@given(spec=stacks())
def test_unmerge_restores_base_weights(spec, dtype):
    model, cm, x = build_stack(spec, dtype)
    before = base_weights(model)
    y = cm(x)
    cm.merge()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "merge changed no weight"
    cm.unmerge()
    assert not cm.merged
    eps = torch.finfo(dtype).eps
    for name, p in model.named_parameters():
        scale = 1 + before[name].abs().max() + 4  # |W| plus a bound on |delta|
        assert (p - before[name]).abs().max() <= 8 * eps * scale, name
    torch.testing.assert_close(cm(x), y, atol=TOL[dtype], rtol=TOL[dtype])


@settings(max_examples=8)
@given(spec=stacks(), use_adamw=st.booleans(), lr=st.sampled_from([1e-2, 5e-2]), init=st.booleans())
def test_optimizer_steps_change_only_adapters(spec, use_adamw, lr, init):
    model, cm, x = build_stack(spec, torch.float32, init=init)
    cm.train()
    base = base_weights(model)
    adapters = {n: p.detach().clone() for n, p in cm.named_parameters() if n.startswith("peftc.")}
    trainable = [p for p in cm.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for n, p in cm.named_parameters() if n.startswith("peftc.")}
    opt = (torch.optim.AdamW if use_adamw else torch.optim.SGD)(trainable, lr=lr)
    target = torch.randn(*spec["lead"], spec["widths"][-1], generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss = (cm(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            assert p.grad is None
        opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, base[name]), f"base parameter {name} changed"
        assert not p.requires_grad
    for name, p in cm.named_parameters():
        if name in adapters:
            assert not torch.equal(p, adapters[name]), f"adapter parameter {name} did not change"


@settings(max_examples=8)
@given(spec=stacks())
def test_merged_graph_is_the_base_graph(spec):
    model = TinyMLP(spec["widths"], spec["forms"], spec["biases"], seed=spec["seed"])
    torch.manual_seed(spec["seed"])
    x = torch.randn(*spec["lead"], spec["widths"][0])
    dims = {d: Dim.AUTO for d in range(2)}
    reference = torch.export.export(model, (x,), dynamic_shapes={"x": dims}, strict=False).module()
    cm = peftc.compile(model, [peftc.LoRA(r=spec["r"], init=False).on(peftc.linear())],
                       example_inputs=(x,), backend="eager")
    adapted = aten_ops(cm.graph_module(x))
    assert any(op.startswith("get_attr peftc.") for op in adapted)
    cm.merge()
    merged = aten_ops(cm.graph_module(x))
    assert merged == aten_ops(reference)
    cm.unmerge()
    assert aten_ops(cm.graph_module(x)) == adapted


# -- half precision: merge in float32, round once -----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_rounds_once(dtype):
    model = TinyMLP([24, 40, 16], ["linear", "flinear"], [True, False], dtype=dtype)
    torch.manual_seed(0)
    x = torch.randn(4, 24, dtype=dtype)
    cm = peftc.compile(model, [peftc.LoRA(r=4, alpha=8, init=False).on(peftc.linear())],
                       example_inputs=(x,), backend="eager")
    for p in cm.sites:
        assert p.state.lora_A.dtype == torch.float32  # adapters train in float32, as PEFT's do
    y = cm(x)
    assert y.dtype == dtype
    ref = reference_forward(model, cm, x)
    torch.testing.assert_close(y.double(), ref, atol=5e-2, rtol=5e-2)

    before = {p.path: model.get_submodule(p.path).weight.detach().clone() for p in cm.sites}
    cm.merge()
    for p in cm.sites:
        w0 = before[p.path].double()
        delta = float(p.state.scaling) * p.state.lora_B.detach().double() @ p.state.lora_A.detach().double()
        expected = (w0 + delta).to(dtype)
        got = model.get_submodule(p.path).weight.detach()
        assert got.dtype == dtype
        exact = (got == expected).float().mean().item()
        assert exact >= 0.99, f"{p.path}: only {exact:.3%} of weights equal the once-rounded value"
        ulp = (2 * expected.double().abs() * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
        assert ((got.double() - expected.double()).abs() <= ulp).all()
    torch.testing.assert_close(cm(x).double(), ref, atol=5e-2, rtol=5e-2)


# -- random tiny Llama configs -----------------------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@settings(max_examples=3)
@given(
    r=st.integers(1, 8),
    alpha=st.sampled_from([1, 4, 16, 32]),
    targets=st.sets(st.sampled_from(TARGETS), min_size=1, max_size=4),
    kv_heads=st.sampled_from([1, 2, 4]),
    layers=st.sampled_from([1, 2]),
    rslora=st.booleans(),
)
def test_llama_merge_roundtrip(r, alpha, targets, kv_heads, layers, rslora):
    model = make_llama(num_key_value_heads=kv_heads, num_hidden_layers=layers)
    pattern = r".*\.(" + "|".join(sorted(targets)) + ")"
    cm = peftc.compile(model, [peftc.LoRA(r=r, alpha=alpha, init=False, use_rslora=rslora).on(
        peftc.linear(pattern))], backend="eager").eval()
    assert {p.path.rsplit(".", 1)[1] for p in cm.sites} == targets
    assert len(cm.sites) == layers * len(targets)
    for p in cm.sites:
        assert float(p.state.scaling) == pytest.approx(alpha / (r**0.5 if rslora else r), rel=1e-6)
    before = base_weights(model)
    ids, mask = padded_batch(seed=r)  # the signature compile traced: input_ids + attention_mask
    y = cm(input_ids=ids, attention_mask=mask).logits
    cm.merge()
    merged = cm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(merged, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, y, atol=1e-5, rtol=1e-5)
    cm.unmerge()
    for name, p in model.named_parameters():
        assert (p - before[name]).abs().max() <= 1e-6, name
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits, y, atol=1e-6, rtol=1e-6)


def test_llama_merged_graph_is_the_base_graph():
    model = make_llama()
    ids = torch.randint(1, 128, (2, 8))
    dims = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "use_cache": None}
    reference = torch.export.export(model, (), {"input_ids": ids, "use_cache": False},
                                    dynamic_shapes=dims, strict=False).module()
    cm = peftc.compile(model, [peftc.LoRA(r=4, init=False).on(peftc.linear(r".*(q|v|down)_proj"))],
                       example_inputs={"input_ids": ids}, backend="eager").eval()
    adapted = aten_ops(cm.graph_module(input_ids=ids))
    assert sum(op.startswith("get_attr peftc.") for op in adapted) >= 2 * 6
    cm.merge()
    assert aten_ops(cm.graph_module(input_ids=ids)) == aten_ops(reference)
    # a signature first seen while merged is a plain graph too
    cm.unmerge()
    assert aten_ops(cm.graph_module(input_ids=ids)) == adapted
