"""Subgraph-pattern selectors: ``Adapter(...).on(peftc.pattern(fn))``.

Patterns are traced to ATen and matched on use-def structure; these tests
build small hand-written models whose module names say nothing about what
they compute, and check what the patterns find, that adapters on pattern
sites run, merge, retrace and coexist with built-in sites, and that bad
patterns fail with clear errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import peftc
from peftc.pattern import PatternSite, pattern

aten = torch.ops.aten


# -- models and patterns -----------------------------------------------------------------


class Attn(nn.Module):
    def __init__(self, d=8, heads=2, divide=False):
        super().__init__()
        self.heads, self.divide = heads, divide
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        s = q.shape[-1]
        logits = q @ k.transpose(-1, -2) / math.sqrt(s) if self.divide else q @ k.transpose(-1, -2) * s**-0.5
        return self.o((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


class Mix(nn.Module):
    """A block whose feed-forward is raw parameters with obscure names."""

    def __init__(self, d=8, ff=12, act=F.gelu, bias=True, divide=False):
        super().__init__()
        self.zz = Attn(d, divide=divide)
        self.p, self.q = nn.Parameter(torch.randn(ff, d) / d**0.5), nn.Parameter(torch.randn(d, ff) / ff**0.5)
        self.pb = nn.Parameter(torch.randn(ff) * 0.1) if bias else None
        self.qb = nn.Parameter(torch.randn(d) * 0.1) if bias else None
        self.act = act

    def forward(self, x):
        x = x + self.zz(x)
        return x + F.linear(self.act(F.linear(x, self.p, self.pb)), self.q, self.qb)


class Net(nn.Module):
    def __init__(self, depth=2, seed=0, **kw):
        super().__init__()
        torch.manual_seed(seed)
        self.stack = nn.ModuleList(Mix(**kw) for _ in range(depth))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for m in self.stack:
            x = m(x)
        return self.head(x)


def attention_probs(q, k):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1)


def mlp_block(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))


class Shift(peftc.Adapter):
    """``y + s`` after the site's op (a test kind; ``s`` starts non-zero so it shows)."""

    kind = "test_pattern_shift"

    def init_state(self, site):
        state = nn.Module()
        state.s = nn.Parameter(torch.full((site.out_features or 1,), 0.5))
        return state

    def emit(self, b, site):
        return b.call(aten.add.Tensor, b.y, b.cast(b.param("s"), site.dtype))

    def config(self):
        return {"kind": self.kind}

    def __repr__(self):
        return "Shift()"


class Scale(peftc.Adapter):
    """``y * s`` after a linear-like op matched by a pattern; merges into the matched weight and bias."""

    kind = "test_pattern_scale"

    def init_state(self, site):
        state = nn.Module()
        state.s = nn.Parameter(torch.linspace(0.5, 1.5, site.out_features))
        return state

    def emit(self, b, site):
        return b.call(aten.mul.Tensor, b.y, b.param("s"))

    def _deltas(self, site, state, weights, factor):
        # weights: the site module's own parameters; the pattern's w2/b2 name two of them
        s = state.s.detach().float()
        out = {site.params["w2"]: weights[site.params["w2"]] * factor(s[:, None])}
        if "b2" in site.params:
            out[site.params["b2"]] = weights[site.params["b2"]] * factor(s)
        return out

    def merge_delta(self, site, state, weights):
        return self._deltas(site, state, weights, lambda s: s - 1)

    def unmerge_delta(self, site, state, weights):
        return self._deltas(site, state, weights, lambda s: 1 - 1 / s)

    def config(self):
        return {"kind": self.kind}

    def __repr__(self):
        return "Scale()"


def compile_(model, rules, x=X):
    return peftc.compile(model, rules, example_inputs=(x,), backend="eager")


@pytest.fixture(scope="module")
def net():
    """A Net and its graph, traced once as peftc traces (non-strict export, dynamic batch and length)."""
    model = Net()
    dims = {"x": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}}
    gm = torch.export.export(model, (X,), dynamic_shapes=dims, strict=False).module()
    return model, gm


def find(selector, net):
    model, gm = net
    return [s for s in selector.extra_sites(gm, model, "") if selector(s)]


# -- what patterns find ----------------------------------------------------------------------


def test_attention_pattern_finds_one_site_per_layer(net):
    sites = find(pattern(attention_probs), net)
    assert [s.path for s in sites] == ["stack.0.zz", "stack.1.zz"]
    for s in sites:
        assert isinstance(s, PatternSite) and s.kind == "pattern" and s.pattern == "attention_probs"
        assert s.op == "aten.softmax.int"
        assert s.weight_name == "attention_probs_0" and s.key == f"{s.path}.attention_probs_0"
        assert set(s.inputs) == {"q", "k"} and s.params == {}
        assert s.shapes["q"][1] == 2 and s.shapes["q"][-1] == 4  # heads, head size
        assert {"softmax", "matmul", "mul", "transpose"} <= set(s.matched)
        assert s.layer is None and s.dtype == torch.float32


def test_mlp_pattern_matches_structure_not_names(net):
    sites = find(pattern(mlp_block), net)
    assert [s.path for s in sites] == ["stack.0", "stack.1"]
    s = sites[0]
    assert s.op == "aten.linear.default" and s.in_features == 8 and s.out_features == 8
    assert s.params == {"w1": "p", "b1": "pb", "w2": "q", "b2": "qb"}
    assert s.shapes["w1"] == (12, 8)
    anchor = next(n for n in net[1].graph.nodes if n.name == s.nodes[0])
    assert anchor.args[1].target == "stack.0.q"  # the second linear, not the first


def test_bias_free_blocks_match_the_biased_pattern():
    cm = compile_(Net(bias=False), [Shift().on(pattern(mlp_block))])
    assert len(cm.sites) == 2
    assert cm.sites[0].site.inputs["b1"] is None and "b1" not in cm.sites[0].site.params


def test_other_activation_or_op_does_not_match():
    with pytest.raises(peftc.RuleError, match=r"pattern\(mlp_block\) \[the model's graph has no aten\.gelu\.default op\]\) matched no site"):
        compile_(Net(act=torch.relu, depth=1), [Shift().on(pattern(mlp_block))])
    model = Net(divide=True, depth=1)
    sel = pattern(attention_probs)
    assert sel.extra_sites(torch.export.export(model, (X,), strict=False).module(), model, "") == []
    assert sel.explain_miss() == "the model's graph has no aten.mul.Tensor op"


def test_module_pattern_and_literal_matching(net):
    seq = pattern(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)), name="seq mlp")
    sites = find(seq, net)
    assert [s.weight_name for s in sites] == ["seq_mlp_0", "seq_mlp_0"]
    assert sites[0].params == {"0.weight": "p", "0.bias": "pb", "2.weight": "q", "2.bias": "qb"}

    class E(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.einsum("bld,de->ble", x, self.w) + torch.einsum("bld,ed->ble", x, self.w)

    def proj(x, w):
        return torch.einsum("bld,de->ble", x, w)

    loose = pattern(proj).extra_sites(torch.export.export(E(), (X,), strict=False).module(), E(), "")
    strict = pattern(proj, ignore_literals=False)
    gm = torch.export.export(E(), (X,), strict=False).module()
    exact = strict.extra_sites(gm, E(), "")
    assert len(loose) == 2 and len(exact) == 1
    assert exact[0].params == {"w": "w"} and exact[0].weight_name == "proj_0"


def test_pattern_composes_with_other_selectors(net):
    assert [s.path for s in find(pattern(mlp_block) & peftc.module(r"stack\.0"), net)] == ["stack.0"]
    assert [s.path for s in find(pattern(mlp_block) & ~peftc.module(r"stack\.0"), net)] == ["stack.1"]
    assert find(pattern(mlp_block, name="a") & pattern(attention_probs, name="b"), net) == []
    both = find(pattern(mlp_block) | pattern(attention_probs), net)
    assert sorted(s.weight_path for s in both) == [
        "stack.0.mlp_block_0", "stack.0.zz.attention_probs_0", "stack.1.mlp_block_0", "stack.1.zz.attention_probs_0"]


def test_pattern_on_transformers_llama_mlp():
    from transformers import LlamaConfig, LlamaForCausalLM

    def swiglu(x, wg, wu, wd):
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 32, (1, 4))
    cm = peftc.compile(model, [Shift().on(pattern(swiglu))], example_inputs={"input_ids": ids}, backend="eager")
    assert [p.path for p in cm.sites] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [p.site.layer for p in cm.sites] == [0, 1]
    assert cm.sites[0].site.params == {"wg": "gate_proj.weight", "wu": "up_proj.weight", "wd": "down_proj.weight"}
    with torch.no_grad():
        assert not torch.allclose(cm(input_ids=ids).logits, model(input_ids=ids).logits)


# -- adapters on pattern sites ------------------------------------------------------------------


def test_pattern_adapter_output_and_retrace():
    model = Net()
    with torch.no_grad():
        base = model(X)
    cm = compile_(model, [Shift().on(pattern(mlp_block))])

    def reference(x):  # the same model with + 0.5 after each feed-forward block
        for m in model.stack:
            x = x + m.zz(x)
            x = x + F.linear(m.act(F.linear(x, m.p, m.pb)), m.q, m.qb) + 0.5
        return model.head(x)

    with torch.no_grad():
        torch.testing.assert_close(cm(X), reference(X))
        assert not torch.allclose(cm(X), base)
        cm.train()  # a new trace (training mode): its sites are found again under the same keys
        torch.testing.assert_close(cm(X), reference(X))
        x4 = torch.randn(3, 2, 5, 8)  # another rank: another trace
        torch.testing.assert_close(cm(x4.flatten(0, 1)), reference(x4.flatten(0, 1)))


def stacked_rules():
    lora = peftc.LoRA(r=2, init=False)
    return [lora.on(peftc.linear() & peftc.where(lambda s: s.weight_name == "q", "q")),
            Scale().on(pattern(mlp_block))]


def test_pattern_and_builtin_sites_stack_on_one_op():
    from peftc.testing import assert_merge_equivalent

    model = Net()
    cm = compile_(model, stacked_rules())
    kinds = sorted(type(p.adapter).__name__ for p in cm.sites)
    assert kinds == ["LoRA", "LoRA", "Scale", "Scale"]
    gm = cm.graph_module(X)
    adapter_nodes = sum("peftc" in n.meta for n in gm.graph.nodes)
    cm.merge()
    cm.unmerge()
    # unmerge re-inserted exactly the same adapters: no pattern matched the adapters' own nodes
    assert sum("peftc" in n.meta for n in cm.graph_module(X).graph.nodes) == adapter_nodes
    assert_merge_equivalent(Net(), stacked_rules(), (X,))


def test_stacked_multiplicative_unmerge_restores():
    from peftc.testing import assert_unmerge_restores

    assert_unmerge_restores(Net(), stacked_rules(), (X,))


def test_pattern_ignores_adapter_nodes():
    """A one-op pattern never matches the ops an adapter inserted (LoRA's own aten.linear)."""
    cm = compile_(Net(depth=1), [peftc.LoRA(r=2).on(peftc.linear())])
    gm = cm.graph_module(X)

    def lin(x, w, b):
        return F.linear(x, w, b)

    found = pattern(lin).find(gm)
    model_linears = [n for n in gm.graph.nodes if n.target == aten.linear.default and "peftc" not in n.meta]
    assert len(found) == len(model_linears) == 5  # qkv, o, the two raw F.linear, head; no LoRA linear
    for m in found:
        inner = [n for p, n in m.nodes_map.items() if p.op == "call_function"]
        assert inner and all("peftc" not in n.meta for n in inner)


def test_site_input_lookup_errors(net):
    site = find(pattern(attention_probs), net)[0]
    with pytest.raises(KeyError, match="has no argument 'v'"):
        site.input(None, "v")
    with pytest.raises(KeyError, match="has no node 'relu'"):
        site.matched_node(None, "relu")


# -- errors ---------------------------------------------------------------------------------------


def test_untraceable_pattern_names_the_function_and_the_fix():
    def branchy(x):
        return x.relu() if x.sum() > 0 else x.tanh()

    with pytest.raises(peftc.RuleError, match=r"'branchy' could not be traced.*example_inputs"):
        pattern(branchy)

    def needs_three_dims(x, w):
        return torch.einsum("abc,cd->abd", x, w)

    with pytest.raises(peftc.RuleError, match="check that example_inputs fit"):
        pattern(needs_three_dims, example_inputs=(torch.randn(4, 4), torch.randn(4, 4)))
    assert pattern(needs_three_dims, example_inputs=(torch.randn(2, 3, 4), torch.randn(4, 4))).ops


def test_pattern_that_computes_nothing_or_returns_two_values():
    with pytest.raises(peftc.RuleError, match="computes nothing"):
        pattern(lambda x: x)
    with pytest.raises(peftc.RuleError, match="exactly one tensor"):
        pattern(lambda x: (x.relu(), x.tanh()))
    with pytest.raises(peftc.RuleError, match="expected a function"):
        pattern(3)


def test_pattern_that_matches_nothing_says_why():
    def wired_differently(x):  # both ops exist in Net, but never in this order
        return F.gelu(torch.softmax(x, -1))

    with pytest.raises(peftc.RuleError, match=r"pattern\(wired_differently\) \[.*never wired.*\]\) matched no site"):
        compile_(Net(), [Shift().on(pattern(wired_differently))])
