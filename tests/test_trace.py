"""Tracing: dynamic shapes, input signatures, shared weights, meta-device planning, plain modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, dense_of, lora_term, make_llama, padded_batch
from torch import nn

import peftc
from peftc.testing.strategies import FunctionalLinear, MatMulLinear, MatMulTLinear


def copy_states(src, dst):
    for a, b in zip(src.sites, dst.sites, strict=True):
        b.state.lora_A.copy_(a.state.lora_A)
        b.state.lora_B.copy_(a.state.lora_B)


def lora_rules(pattern=r".*\.(q|v)_proj", **kw):
    kw = {"r": 4, "alpha": 8, "init": False, **kw}
    return [peftc.LoRA(**kw).on(peftc.linear(pattern))]


@pytest.fixture(scope="module")
def llama_cm():
    """A tiny Llama with LoRA (non-zero B) on q/v, and an eager copy of the same weights."""
    model = make_llama()
    cm = peftc.compile(model, lora_rules(), backend="eager").eval()
    return cm


def manual_logits(cm, ids, mask=None):
    """The adapted model evaluated eagerly: merge into a copy of the weights (float32)."""
    import copy

    model = copy.deepcopy(cm.base_model)
    with torch.no_grad():
        for p in cm.sites:
            w = model.get_submodule(p.path).weight
            w += float(p.state.scaling) * p.state.lora_B.double().matmul(p.state.lora_A.double()).float()
        return model(input_ids=ids, attention_mask=mask).logits


# -- dynamic shapes and signatures ------------------------------------------------------------


def test_one_trace_serves_many_batch_sizes_and_lengths(llama_cm):
    cm = llama_cm
    gms = set()
    for batch in (2, 3, 5):
        for length in (7, 13):
            ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch))
            mask = torch.ones_like(ids)
            mask[0, : length // 3] = 0
            with torch.no_grad():
                out = cm(input_ids=ids, attention_mask=mask).logits
            assert out.shape == (batch, length, VOCAB)
            torch.testing.assert_close(out, manual_logits(cm, ids, mask), atol=1e-5, rtol=1e-5)
            gms.add(id(cm.graph_module(input_ids=ids, attention_mask=mask)))
    assert len(gms) == 1


def test_kwarg_sets_share_adapter_state(llama_cm):
    cm = llama_cm
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            a = cm(input_ids=ids, attention_mask=mask).logits
            b = cm(input_ids=ids).logits  # attention_mask omitted
            c = cm(input_ids=ids, attention_mask=mask, labels=ids)  # labels added
        return a, b, c

    a, b, c = run()
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.logits, a, atol=1e-5, rtol=1e-5)
    expected_loss = F.cross_entropy(a[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(c.loss, expected_loss, atol=1e-5, rtol=1e-5)

    # three graphs, each reading the very same adapter parameters
    graphs = [cm.graph_module(input_ids=ids, attention_mask=mask), cm.graph_module(input_ids=ids),
              cm.graph_module(input_ids=ids, attention_mask=mask, labels=ids)]
    assert len({id(g) for g in graphs}) == 3
    states = {id(p) for s in cm.sites for p in s.state.parameters()}
    for gm in graphs:
        read = {id(gm.get_parameter(n.target)) for n in gm.graph.nodes
                if n.op == "get_attr" and n.target.endswith(("lora_A", "lora_B"))}
        assert read == states

    # perturb one lora_B in place: every signature sees it
    site = cm.sites[0]
    before = site.state.lora_B.detach().clone()
    try:
        with torch.no_grad():
            site.state.lora_B.add_(0.5)
        a2, b2, c2 = run()
        for new, old in ((a2, a), (b2, b), (c2.logits, c.logits)):
            assert (new - old).abs().max() > 1e-3
        torch.testing.assert_close(b2, a2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c2.logits, a2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a2, manual_logits(cm, ids, mask), atol=1e-5, rtol=1e-5)
    finally:
        with torch.no_grad():
            site.state.lora_B.copy_(before)


def test_tensor_example_inputs_and_positional_calls(llama_cm):
    """example_inputs may be a bare tensor; the compiled model then takes it positionally."""
    cm = llama_cm
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    other = peftc.compile(make_llama(), lora_rules(), example_inputs=ids, backend="eager").eval()
    assert [p.path for p in other.sites] == [p.path for p in cm.sites]
    with torch.no_grad():
        copy_states(cm, other)
        by_pos = other(ids).logits
        by_kw = cm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(by_pos, by_kw, atol=1e-5, rtol=1e-5)


def test_base_weights_are_shared_not_copied(llama_cm):
    cm = llama_cm
    model = cm.base_model
    ids, mask = padded_batch()
    gm = cm.graph_module(input_ids=ids, attention_mask=mask)
    model_params = dict(model.named_parameters(remove_duplicate=False))
    seen = 0
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in model_params:
            t = gm.get_parameter(n.target)
            assert t is model_params[n.target] or t.data_ptr() == model_params[n.target].data_ptr()
            seen += 1
    assert seen == len(model_params)  # every weight the forward reads, none copied
    # cm's own parameters: the model's (same objects) plus the adapters, nothing else
    cm_params = list(cm.parameters())
    model_ids = {id(p) for p in model.parameters()}
    adapter_numel = sum(p.num_params for p in cm.sites)
    assert model_ids <= {id(p) for p in cm_params}
    assert sum(p.numel() for p in cm_params) == sum(p.numel() for p in model.parameters()) + adapter_numel
    assert cm.get_nb_trainable_parameters() == (adapter_numel, sum(p.numel() for p in cm_params))


def test_meta_device_planning_matches_real_model():
    real = make_llama()
    with torch.device("meta"):
        meta = make_llama()
    assert next(meta.parameters()).is_meta
    rules = [peftc.LoRA(r=4, alpha=8).on(peftc.linear(r".*(q|k|v|o)_proj")),
             peftc.LoRA(r=2).on(peftc.linear(r".*mlp\..*", layers=[1]))]
    cm_meta = peftc.compile(meta, rules, backend="eager")
    cm_real = peftc.compile(real, rules, backend="eager")

    def plan(cm):
        return [(p.path, p.op, p.site.in_features, p.site.out_features, p.site.layout, p.num_params,
                 p.state.lora_A.shape, p.state.lora_B.shape) for p in cm.sites]

    assert plan(cm_meta) == plan(cm_real)
    assert cm_meta.get_nb_trainable_parameters() == cm_real.get_nb_trainable_parameters()
    assert all(p.state.lora_A.is_meta for p in cm_meta.sites)


# -- plain nn.Modules ---------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def mlp_reference(m: MLP, cm, x):
    out = x.double()
    by_path = {p.path: p for p in cm.sites}
    for name, act in (("fc1", True), ("fc2", True), ("head", False)):
        layer = getattr(m, name)
        y = out @ layer.weight.double().T + layer.bias.double()
        if name in by_path:
            y = y + lora_term(out, by_path[name].state)
        out = F.gelu(y) if act else y
    return out


def test_plain_mlp():
    torch.manual_seed(0)
    m = MLP()
    x = torch.randn(5, 16)
    cm = peftc.compile(m, [peftc.LoRA(r=4, init=False).on(peftc.linear("fc1|fc2"))],
                       example_inputs=(x,), backend="eager")
    assert [p.path for p in cm.sites] == ["fc1", "fc2"]
    assert [p.site.in_features for p in cm.sites] == [16, 32]
    for batch in (5, 2, 9):
        xb = torch.randn(batch, 16)
        torch.testing.assert_close(cm(xb).double(), mlp_reference(m, cm, xb), atol=1e-5, rtol=1e-5)
    assert len({id(cm.graph_module(torch.randn(b, 16))) for b in (5, 2, 9)}) == 1


def test_conv_model_lora_on_linear_head_only():
    torch.manual_seed(0)
    m = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 5))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(peftc.RuleError, match="transposed convolutions"):
        peftc.compile(m, [peftc.LoRA(r=4).on(peftc.module("0"))], example_inputs=(x,), backend="eager")
    assert all(p.requires_grad for p in m.parameters())
    cm = peftc.compile(m, [peftc.LoRA(r=4, init=False).on(peftc.linear())], example_inputs=(x,),
                       backend="eager")
    assert [(p.path, p.site.in_features, p.site.out_features) for p in cm.sites] == [("3", 400, 5)]
    with torch.no_grad():
        feats = m[2](m[1](m[0](x))).double()
        ref = feats @ m[3].weight.double().T + m[3].bias.double() + lora_term(feats, cm.sites[0].state)
    torch.testing.assert_close(cm(x).double(), ref, atol=1e-5, rtol=1e-5)
    assert not m[0].weight.requires_grad


class OwnParams(nn.Module):
    """F.linear, x @ W and x @ W.T on its own parameters, in one module each."""

    def __init__(self):
        super().__init__()
        self.a = FunctionalLinear(8, 12)
        self.b = MatMulLinear(12, 10)
        self.c = MatMulTLinear(10, 6)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def own_params_reference(m, cm, x):
    """OwnParams' forward with LoRA added where cm placed it, in float64 from the weights."""
    states = {p.path: p.state for p in cm.sites}
    h = x.double()
    for name in ("a", "b", "c"):
        w, b = dense_of(getattr(m, name))
        y = h @ w.detach().double().T
        if b is not None:
            y = y + b.detach().double()
        if name in states:
            y = y + lora_term(h, states[name])
        h = torch.tanh(y) if name != "c" else y
    return h


@pytest.mark.parametrize("x_shape", [(4, 8), (2, 3, 8)])
def test_f_linear_and_matmul_on_own_params(x_shape):
    torch.manual_seed(0)
    m = OwnParams()
    x = torch.randn(*x_shape)
    cm = peftc.compile(m, [peftc.LoRA(r=3, alpha=5, init=False).on(peftc.linear("a|b"))],
                       example_inputs=(x,), backend="eager")
    sites = {p.path: p for p in cm.sites}
    assert sites["a"].op == "aten.linear.default" and sites["a"].site.layout == "out_in"
    assert sites["b"].op.startswith(("aten.matmul", "aten.mm")) and sites["b"].site.layout == "in_out"
    assert (sites["b"].site.in_features, sites["b"].site.out_features) == (12, 10)
    torch.testing.assert_close(cm(x).double(), own_params_reference(m, cm, x), atol=1e-5, rtol=1e-5)
    y = cm(x)
    cm.merge()
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x_shape", [(4, 8), (2, 3, 8)])
def test_lora_reaches_x_matmul_w_transposed(x_shape):
    torch.manual_seed(0)
    m = OwnParams()
    x = torch.randn(*x_shape)
    cm = peftc.compile(m, [peftc.LoRA(r=3, alpha=5, init=False).on(peftc.linear())],
                       example_inputs=(x,), backend="eager")
    sites = {p.path: p for p in cm.sites}
    assert set(sites) == {"a", "b", "c"}
    assert sites["c"].site.layout == "out_in"
    assert (sites["c"].site.in_features, sites["c"].site.out_features) == (10, 6)
    torch.testing.assert_close(cm(x).double(), own_params_reference(m, cm, x), atol=1e-5, rtol=1e-5)


def test_state_dict_parameters_train_eval():
    torch.manual_seed(0)
    m = MLP()
    x = torch.randn(3, 16)
    cm = peftc.compile(m, [peftc.LoRA(r=2, alpha=4, init=False).on(peftc.linear("fc2|head"))],
                       example_inputs=(x,), backend="eager")
    sd = cm.state_dict()
    base_keys = {f"base_model.{k}" for k in m.state_dict()}
    adapter_keys = {f"peftc.adapters.default.{path}.{k}" for path in ("fc2", "head")
                    for k in ("lora_A", "lora_B")}
    assert base_keys | adapter_keys <= set(sd)
    assert all(k.startswith("peftc.") for k in set(sd) - base_keys)
    for k, v in m.state_dict().items():
        assert sd[f"base_model.{k}"].data_ptr() == v.data_ptr()
    assert {n for n, _ in cm.named_parameters()} == base_keys | adapter_keys
    assert {n for n, p in cm.named_parameters() if p.requires_grad} == adapter_keys

    # train()/eval() propagate to the user's model, and both modes give the same output here (no dropout)
    cm.train()
    assert m.training and all(mod.training for mod in m.modules())
    y_train = cm(x)
    cm.eval()
    assert not m.training
    torch.testing.assert_close(cm(x), y_train)

    # a state_dict round-trip restores adapter values
    saved = {k: v.clone() for k, v in cm.state_dict().items()}
    with torch.no_grad():
        for p in cm.sites:
            p.state.lora_B.zero_()
    assert (cm(x) - y_train).abs().max() > 1e-4
    cm.load_state_dict(saved)
    torch.testing.assert_close(cm(x), y_train)


def test_to_float64():
    torch.manual_seed(0)
    m = MLP()
    x = torch.randn(3, 16)
    cm = peftc.compile(m, [peftc.LoRA(r=2, alpha=4, init=False).on(peftc.linear())],
                       example_inputs=(x,), backend="eager")
    y32 = cm(x)
    cm.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in cm.parameters())
    y64 = cm(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, mlp_reference(m, cm, x.double()), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y64.float(), y32, atol=1e-5, rtol=1e-5)


def test_bare_linear_as_the_model():
    torch.manual_seed(0)
    m = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    cm = peftc.compile(m, [peftc.LoRA(r=2, init=False).on(peftc.linear())], example_inputs=(x,),
                       backend="eager")
    assert [p.path for p in cm.sites] == [""]
    ref = x.double() @ m.weight.double().T + m.bias.double() + lora_term(x.double(), cm.sites[0].state)
    torch.testing.assert_close(cm(x).double(), ref, atol=1e-5, rtol=1e-5)


class TwoWeights(nn.Module):
    """One module with two linear weights; the one not called ``weight`` is used first."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(8, 8) / 3)
        self.weight = nn.Parameter(torch.randn(4, 8) / 3)

    def forward(self, x):
        return F.linear(x @ self.proj, self.weight)


class HoldsTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = TwoWeights()

    def forward(self, x):
        return self.fc(x)


def test_two_weights_in_one_module():
    torch.manual_seed(0)
    m = HoldsTwo()
    x = torch.randn(3, 8)
    cm = peftc.compile(m, [peftc.LoRA(r=2, init=False).on(peftc.linear())], example_inputs=(x,),
                       backend="eager")
    assert sorted(p.site.weight_name for p in cm.sites) == ["proj", "weight"]
    assert cm.get_nb_trainable_parameters()[0] == sum(p.num_params for p in cm.sites)
    sites = {p.site.weight_name: p.state for p in cm.sites}
    h = x.double() @ m.fc.proj.double() + lora_term(x.double(), sites["proj"])
    ref = h @ m.fc.weight.double().T + lora_term(h, sites["weight"])
    torch.testing.assert_close(cm(x).double(), ref, atol=1e-5, rtol=1e-5)


class ReadsItsWeight(nn.Module):
    """A linear layer whose weight is also read by a non-linear op (a weight-norm style term)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) + self.fc.weight.pow(2).sum()


class HoldsReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = ReadsItsWeight()

    def forward(self, x):
        return self.m(x)


def test_weight_also_read_by_a_non_linear_op():
    torch.manual_seed(0)
    m = HoldsReader()
    x = torch.randn(3, 8)
    cm = peftc.compile(m, [peftc.LoRA(r=2, init=False).on(peftc.linear())], example_inputs=(x,),
                       backend="eager")
    assert [p.path for p in cm.sites] == ["m.fc"]
    fc = m.m.fc
    with torch.no_grad():
        ref = (x.double() @ fc.weight.double().T + fc.bias.double() + lora_term(x, cm.sites[0].state)
               + fc.weight.double().pow(2).sum())
    torch.testing.assert_close(cm(x).double(), ref, atol=1e-5, rtol=1e-5)
