"""``peftc.testing``, tested against itself and used on the built-in adapters.

- The built-in kinds that merge (LoRA, BitFit) pass the kit's property tests.
- Deliberately wrong merges (a missing transpose, a scaling off by r, no
  scaling, a multiplicative kind without its own unmerge) are caught, and
  hypothesis shrinks each to a small model: one layer, every width <= 4.
- Kinds that declare no parameters, can't merge, or do nothing are reported
  as such, and failure messages name the site and how far off it is.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from torch import nn

import peftc
from peftc.testing import assert_merge_equivalent, assert_roundtrip, assert_unmerge_restores
from peftc.testing import strategies as pst

aten = torch.ops.aten
# find(): the smallest generated case the predicate holds for, after shrinking. Derandomized, so
# every run searches the same cases; MLPs only (transformers would shrink to MLPs, more slowly).
# (No explain phase: it reruns ~100 variants of the result to annotate a report that find() never prints.)
FIND = settings(max_examples=15, database=None, deadline=None, derandomize=True,
                phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))


# float64 models get float64's tolerance (1e-10): a kind that computed its merge delta in float32
# would fail there (test_float64_tolerance_catches_a_float32_merge shows the kit catches it).
DTYPES = [torch.float32, torch.float64]


# -- the built-in kinds through the kit -----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=6)
@given(data=st.data())
def test_lora_merge_is_equivalent(data, dtype):
    case = data.draw(pst.cases(dtypes=(dtype,)))
    assert_merge_equivalent(*case)


@settings(max_examples=6)
@given(case=pst.cases())
def test_lora_unmerge_restores(case):
    assert_unmerge_restores(*case)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=5)
@given(data=st.data())
def test_bitfit_merge_is_equivalent(data, dtype):
    # BitFit folds into a linear's bias (creating one if needed); `x @ W` has no bias operand to fold into
    case = data.draw(pst.cases(adapters=st.just(peftc.BitFit()), dtypes=(dtype,), forms=("linear",)))
    assert_merge_equivalent(*case)


@settings(max_examples=5)
@given(case=pst.cases(adapters=st.just(peftc.BitFit()), forms=("linear",)))
def test_bitfit_unmerge_restores_and_removes_created_biases(case):
    assert_unmerge_restores(*case)


@settings(max_examples=3)
@given(case=pst.cases(pst.loras(use_rslora=False), dtypes=(torch.float32,), forms=("linear",)))
def test_lora_roundtrip(case):
    # one adapter can't mix rsLoRA and plain LoRA sites in PEFT's format (save_pretrained says so)
    assert_roundtrip(*case)


# -- deliberately wrong merges are caught and shrunk ------------------------------------------


class ForgetsTranspose(peftc.LoRA):
    """Merges ``B @ A`` as is, forgetting the transpose an ``[in, out]`` (``x @ W``) weight needs."""

    kind = "test_kit_forgets_transpose"

    def merge_delta(self, site, state, weights):
        return {site.weight_name: state.scaling.double() * (state.lora_B.double() @ state.lora_A.double())}


class ScalingTimesR(peftc.LoRA):
    """Merges with ``alpha`` instead of ``alpha / r``: a scaling off by r."""

    kind = "test_kit_scaling_times_r"

    def merge_delta(self, site, state, weights):
        return {k: v * state.r for k, v in super().merge_delta(site, state, weights).items()}


class NoScaling(peftc.LoRA):
    """Merges ``B @ A`` without the scaling."""

    kind = "test_kit_no_scaling"

    def merge_delta(self, site, state, weights):
        return {k: v / state.scaling.float() for k, v in super().merge_delta(site, state, weights).items()}


class OutputScale(peftc.Adapter):
    """``y * s``, merged right (``W s``) but without an ``unmerge_delta``: unmerge subtracts ``W' (s - 1)``."""

    kind = "test_kit_output_scale"

    def unsupported(self, site):
        return None if site.is_linear else "linear ops only"

    def init_state(self, site):
        state = nn.Module()
        state.s = nn.Parameter(torch.ones(site.out_features, dtype=site.dtype))
        return state

    def emit(self, b, site):
        return b.call(aten.mul.Tensor, b.y, b.param("s"))

    def merge_delta(self, site, state, weights):
        w = weights[site.weight_name]
        s = state.s.detach().to(w.dtype)
        out = {site.weight_name: w * ((s[:, None] if site.layout == "out_in" else s) - 1)}
        if site.has_bias and site.bias_name:
            out[site.bias_name] = weights[site.bias_name] * (s - 1)
        return out

    def config(self):
        return {"kind": self.kind}

    def __repr__(self):
        return "OutputScale()"


def wrong_loras(cls):
    return st.builds(cls, r=st.integers(1, 4), alpha=st.sampled_from([1, 2, 8, 16.5]), init=st.just(False))


def _fails(check):
    def predicate(case):
        try:
            check(*case)
        except AssertionError:
            return True
        return False
    return predicate


def _small(case):
    model = case.model
    assert isinstance(model, pst.TinyMLP), model
    assert len(model.layers) == 1, model
    assert max(model.spec["widths"]) <= 4, model


@pytest.mark.parametrize("cls", [ForgetsTranspose, ScalingTimesR, NoScaling])
def test_wrong_merge_is_caught_and_shrunk(cls):
    smallest = find(pst.cases(adapters=wrong_loras(cls), kinds=("mlp",)), _fails(assert_merge_equivalent),
                    settings=FIND)
    _small(smallest)
    adapter = smallest.rules[0].adapter
    if cls is ForgetsTranspose:
        assert smallest.model.spec["forms"] == ["matmul"]  # only [in, out] weights need the transpose
    if cls is ScalingTimesR:
        assert adapter.r == 2  # the smallest rank where alpha / r and alpha differ
    with pytest.raises(AssertionError) as info:
        assert_merge_equivalent(*smallest)
    message = str(info.value)
    assert "layers.0" in message and f"class {cls.__name__}" in message
    assert "off by" in message or "delta shape" in message


def test_wrong_unmerge_is_caught_and_shrunk():
    adapters = st.just(OutputScale())
    case = find(pst.cases(adapters=adapters, kinds=("mlp",), forms=("linear",)), _fails(assert_unmerge_restores),
                settings=FIND)
    _small(case)
    assert_merge_equivalent(*case)  # the merge itself is right
    with pytest.raises(AssertionError, match=r"parameter layers\.0\.(weight|bias) is off by .*OutputScale\(\) at layers\.0"):
        assert_unmerge_restores(*case)


def test_failure_message_names_the_first_site_off():
    model = pst.TinyMLP([3, 3, 3, 2], ["linear", "matmul", "linear"], [True, False, True], seed=1)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    rules = [peftc.LoRA(r=2, init=False).on(peftc.linear(r"layers\.[02]")),
             ForgetsTranspose(r=2, init=False).on(peftc.linear(r"layers\.1"))]
    with pytest.raises(AssertionError) as info:
        assert_merge_equivalent(model, rules, (x,))
    lines = str(info.value).splitlines()
    first = next(line for line in lines if "first site off" in line)
    assert "layers.1 [aten.matmul.default 3->3]" in first and "ForgetsTranspose" in first
    assert any("layers.0 [aten.linear.default" in line and "first site off" not in line for line in lines)
    assert "output is off by" in str(info.value) and "float32" in str(info.value)


def test_float64_tolerance_catches_a_float32_merge():
    """A delta rounded to float32 is invisible at float32's tolerance and caught at float64's."""

    class Float32Delta(peftc.LoRA):
        kind = "test_kit_float32_delta"

        def merge_delta(self, site, state, weights):
            delta = state.scaling.float() * (state.lora_B.float() @ state.lora_A.float())
            return {site.weight_name: (delta if site.layout == "out_in" else delta.T).double()}

    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = pst.TinyMLP([6, 6, 6], ["linear", "matmul"], [True, True], dtype=torch.float64)
    rules = [Float32Delta(r=4, init=False).on(peftc.linear())]
    with pytest.raises(AssertionError, match="float64"):
        assert_merge_equivalent(model, rules, (x,))
    assert_merge_equivalent(model, rules, (x,), atol=1e-5, rtol=1e-5)


# -- kinds the kit refuses -------------------------------------------------------------------------


class NoParams(peftc.Adapter):
    kind = "test_kit_no_params"

    def init_state(self, site):
        state = nn.Module()
        state.register_buffer("s", torch.ones(site.out_features))
        return state

    def emit(self, b, site):
        return b.call(aten.mul.Tensor, b.y, b.param("s"))

    def merge_delta(self, site, state, weights):
        return {}


class DoesNothing(peftc.Adapter):
    kind = "test_kit_does_nothing"

    def init_state(self, site):
        state = nn.Module()
        state.s = nn.Parameter(torch.zeros(site.out_features))
        return state

    def emit(self, b, site):
        b.param("s")
        return b.y  # forgot to return the new node

    def merge_delta(self, site, state, weights):
        return {}


class NoMerge(DoesNothing):
    kind = "test_kit_no_merge"
    merge_delta = peftc.Adapter.merge_delta


X = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))


def mlp():
    return pst.TinyMLP([3, 2], ["linear"], [True])


def test_kind_without_parameters_is_refused():
    with pytest.raises((AssertionError, peftc.RuleError), match="declares no parameters"):
        assert_merge_equivalent(mlp(), [NoParams().on(peftc.linear())], (X,))


def test_kind_that_cannot_merge_is_refused():
    with pytest.raises(AssertionError, match=r"\['NoMerge'\] define no merge_delta"):
        assert_merge_equivalent(mlp(), [NoMerge().on(peftc.linear())], (X,))


def test_kind_without_effect_is_refused():
    with pytest.raises(AssertionError, match="exactly unchanged"):
        assert_merge_equivalent(mlp(), [DoesNothing().on(peftc.linear())], (X,))
    assert_merge_equivalent(mlp(), [DoesNothing().on(peftc.linear())], (X,), require_effect=False)


def test_kit_leaves_the_model_alone():
    model = mlp()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    assert_merge_equivalent(model, [peftc.BitFit().on(peftc.linear())], (X,))
    assert_unmerge_restores(model, [peftc.BitFit().on(peftc.linear())], (X,))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]


# -- the strategies ---------------------------------------------------------------------------------


@settings(max_examples=15)
@given(data=st.data())
def test_strategies_make_working_models_rules_and_inputs(data):
    model = data.draw(pst.models())
    rules = data.draw(pst.rules(model, adapters=st.one_of(pst.loras(), st.just(peftc.BitFit()))))
    (x,) = data.draw(pst.inputs(model))
    assert x.dtype == next(model.parameters()).dtype
    assert 1 <= len(rules) <= 2 and all(isinstance(r, peftc.Rule) for r in rules)
    y = model(x)
    assert y.shape[:-1] == x.shape[:-1] and torch.isfinite(y).all()
    assert "dtype=" in repr(model) and "\n" not in repr(model)
    paths = pst.linear_paths(model)
    assert paths and all(isinstance(model.get_submodule(p).weight, nn.Parameter) for p in paths)
