"""Shared tiny models and helpers for the peftc test suite.

Every transformers model here is built from a tiny config with random weights
(hidden 32, 2 layers, vocab 128): no model hub, no network.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from typing import TYPE_CHECKING

import pytest
import torch
from torch import fx, nn

if TYPE_CHECKING:
    from peftc.testing.strategies import TinyMLP

VOCAB = 128

# The models here are tiny (hidden 32): intra-op threads only add synchronisation, which costs
# 3-4x wall time when the 2 cores are shared with other processes. One thread is fastest.
torch.set_num_threads(1)

# Shared hypothesis settings: few examples, no deadline, no example database on disk.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "peftc",
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run: CI never flakes on a new draw
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        print_blob=True,
    )
    # ``make fuzz``: PEFTC_FUZZ_EXAMPLES examples of each property, new draws every run (what
    # tests/test_state_machine.py runs with; the other tests fix their own max_examples)
    settings.register_profile(
        "peftc-fuzz",
        parent=settings.get_profile("peftc"),
        derandomize=False,
        max_examples=int(os.environ.get("PEFTC_FUZZ_EXAMPLES") or 1),
        stateful_step_count=60,
    )
    settings.load_profile("peftc-fuzz" if os.environ.get("PEFTC_FUZZ_EXAMPLES") else "peftc")
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


def pytest_configure(config):
    for line in (
        "ignore::FutureWarning",
        "ignore::DeprecationWarning",
        "ignore:.*fan_in_fan_out.*:UserWarning",
        "ignore:.*Failed to fetch module.*:UserWarning",
        "ignore:.*Model config.*:UserWarning",
    ):
        config.addinivalue_line("filterwarnings", line)


# -- tiny transformers models ------------------------------------------------------


_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64)


def _decoder(config_name: str, model_name: str, seed: int, kv_heads: int, overrides: dict) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**_DECODER, "num_key_value_heads": kv_heads, **overrides})
    return getattr(transformers, model_name)(config).eval()


def make_llama(seed: int = 0, **overrides) -> nn.Module:
    return _decoder("LlamaConfig", "LlamaForCausalLM", seed, 4, overrides)


def make_qwen2(seed: int = 0, **overrides) -> nn.Module:
    """Qwen2: grouped-query attention (4 query heads, 2 key/value heads) and q/k/v biases."""
    return _decoder("Qwen2Config", "Qwen2ForCausalLM", seed, 2, overrides)


def make_mistral(seed: int = 0, **overrides) -> nn.Module:
    return _decoder("MistralConfig", "MistralForCausalLM", seed, 2, overrides)


def make_gpt2(seed: int = 0, **overrides) -> nn.Module:
    """GPT-2: Conv1D layers (``addmm`` with an [in, out] weight) and a tied lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
              bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**kw)).eval()


def make_bert_cls(seed: int = 0, num_labels: int = 3, **overrides) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels)
    kw.update(overrides)
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**kw)).eval()


def one_layer(arch: str) -> dict:
    """A builder's overrides for a one-layer model of ``arch``: its trace (what most tests spend
    their time on) costs about 3/4 of the two-layer model's. For checks that don't depend on depth."""
    return {"n_layer": 1} if arch == "gpt2" else {"num_hidden_layers": 1}


BUILDERS = {
    "llama": make_llama,
    "qwen2": make_qwen2,
    "mistral": make_mistral,
    "gpt2": make_gpt2,
    "bert": make_bert_cls,
}


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def qwen2():
    return make_qwen2()


@pytest.fixture
def mistral():
    return make_mistral()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture
def bert_cls():
    return make_bert_cls()


def padded_batch(batch: int = 3, length: int = 9, seed: int = 0):
    """Token ids and an attention mask with left padding (row 0) and right padding (row 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    if batch > 1:
        mask[1, -2:] = 0
    return ids, mask


def seq2seq_batch(seed: int = 0) -> dict:
    """An encoder-decoder batch: ids with a left-padded row and decoder labels of another length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=torch.randint(3, VOCAB, (2, 4), generator=g))


def assert_seq2seq_like_peft(cm, pm, batch: dict):
    """``cm``'s logits and loss on ``batch`` equal PEFT model ``pm``'s (1e-5); returns PEFT's output."""
    with torch.no_grad():
        ours, theirs = cm(**batch), pm(**batch)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    return theirs


def two_adapter_rules(other=r".*\.(k|o)_proj") -> tuple[list, list]:
    """The rules of :func:`two_adapter_llama`'s adapters "default" and "other"."""
    import peftc

    return ([peftc.LoRA(r=4, init=False).on(peftc.linear(r".*\.(q|v)_proj"))],
            [peftc.LoRA(r=2, alpha=4, init=False).on(peftc.linear(other)),
             peftc.BitFit().on(peftc.linear(r".*mlp\..*"))])


def two_adapter_llama(other=r".*\.(k|o)_proj", backend="eager"):
    """A Llama compiled with LoRA "default" on q/v and "other" (LoRA on ``other``, BitFit on the
    MLP, random bias deltas), and a copy of the base model."""
    import peftc

    model = make_llama()
    base = copy.deepcopy(model)
    default_rules, other_rules = two_adapter_rules(other)
    cm = peftc.compile(model, default_rules, backend=backend).eval()
    cm.add_adapter("other", other_rules)
    with torch.no_grad():
        for p in cm.sites:
            if hasattr(p.state, "bias"):
                p.state.bias.normal_()
    return cm, base


# -- PEFT interop ---------------------------------------------------------------------


def make_t5(seed: int = 0) -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config).eval()


def make_bart(seed: int = 0) -> torch.nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=None)
    return BartForConditionalGeneration(config).eval()


def copy_peft_weights(cm, pm, adapter: str = "default") -> None:
    """Copy PEFT's LoRA matrices and modules_to_save copies into a peftc CompiledModel."""
    sd = pm.state_dict()
    with torch.no_grad():
        for p in cm.sites:
            p.state.lora_A.copy_(sd[f"base_model.model.{p.path}.lora_A.{adapter}.weight"])
            p.state.lora_B.copy_(sd[f"base_model.model.{p.path}.lora_B.{adapter}.weight"])
        saved = cm.peftc.saved[adapter] if adapter in cm.peftc.saved else None
        if saved is not None:
            for name, param in saved.named_parameters():
                path, _, pname = name.rpartition(".")
                param.copy_(sd[f"base_model.model.{path}.modules_to_save.{adapter}.{pname}"])


# -- model state snapshots ------------------------------------------------------------


def assert_counts_like_peft(cm, pm, capsys) -> None:
    """peftc's trainable/all counts and ``print_trainable_parameters`` line are PEFT's."""
    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    capsys.readouterr()
    pm.print_trainable_parameters()
    cm.print_trainable_parameters()
    theirs, ours = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs


def assert_greedy_like_peft(pm, cm, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """peftc's greedy generation is PEFT's: the same tokens, every step's logits within 1e-5."""
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        ref = pm.generate(input_ids=ids, attention_mask=mask, **greedy)
        out = cm.generate(input_ids=ids, attention_mask=mask, **greedy)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def snapshot(model: nn.Module) -> dict:
    """Every parameter and buffer (cloned) with its requires_grad flag."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out["param:" + name] = (p.detach().clone(), p.requires_grad)
    for name, b in model.named_buffers(remove_duplicate=False):
        out["buffer:" + name] = (b.detach().clone(), None)
    return out


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, (value, flag) in before.items():
        new_value, new_flag = after[key]
        assert new_flag == flag, f"{key}: requires_grad changed from {flag} to {new_flag}"
        assert new_value.dtype == value.dtype, key
        assert torch.equal(new_value, value) or (
            value.is_floating_point() and torch.equal(new_value.isnan(), value.isnan())
            and torch.equal(torch.nan_to_num(new_value), torch.nan_to_num(value))
        ), f"{key} changed"


def no_grad_logits(model, ids, mask, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def assert_matches_peft(model: nn.Module, pm, cm, capsys, atol: float = 1e-5) -> None:
    """``cm`` (compiled from ``model``) against PEFT's ``pm`` holding the same adapter tensors:
    the same logits, an adapter that matters beyond ``atol``, the same
    ``print_trainable_parameters`` line, merged logits equal to ``merge_and_unload``'s (through
    the compiled model and the model's own forward), and unmerging restores logits and weights."""
    original = snapshot(model)
    ids, mask = padded_batch()
    want = no_grad_logits(pm, ids, mask)
    torch.testing.assert_close(no_grad_logits(cm, ids, mask), want, atol=atol, rtol=0)
    with pm.disable_adapter():
        base = no_grad_logits(pm, ids, mask)
    assert (want - base).abs().max() > 10 * atol  # the adapter matters, beyond the tolerance

    cm.print_trainable_parameters()
    pm.print_trainable_parameters()
    ours, theirs = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs

    cm.merge()
    merged_peft = no_grad_logits(pm.merge_and_unload(), ids, mask)
    torch.testing.assert_close(no_grad_logits(cm, ids, mask), merged_peft, atol=atol, rtol=0)
    torch.testing.assert_close(no_grad_logits(model, ids, mask), merged_peft, atol=atol, rtol=0)
    cm.unmerge()
    torch.testing.assert_close(no_grad_logits(cm, ids, mask), want, atol=atol, rtol=0)
    for key, (value, _) in snapshot(model).items():
        torch.testing.assert_close(value, original[key][0], atol=1e-6, rtol=1e-5)


@functools.cache
def _merged_lora_ops() -> tuple[str, ...]:
    """The ops of a one-layer Llama with a merged LoRA on every linear op: the base graph
    (computed once)."""
    import peftc

    ids, mask = padded_batch()
    lora = peftc.compile(make_llama(**one_layer("llama")), [peftc.LoRA(init=False).on(peftc.linear())],
                         backend="eager")
    lora.merge()
    return tuple(aten_ops(lora.graph_module(input_ids=ids, attention_mask=mask)))


def assert_merges_to_base_graph(rules) -> list[str]:
    """A (one-layer) Llama compiled with ``rules`` has adapter nodes; merged, its graph is the
    base graph op for op (that of a merged LoRA on every linear op); unmerged, the adapted graph
    again. Returns the adapted graph's ops."""
    import peftc

    model = make_llama(**one_layer("llama"))
    ids, mask = padded_batch()
    cm = peftc.compile(model, rules, backend="eager")
    adapted = aten_ops(cm.graph_module(input_ids=ids, attention_mask=mask))
    assert any(op.startswith("get_attr peftc.") for op in adapted)
    cm.merge()
    merged = aten_ops(cm.graph_module(input_ids=ids, attention_mask=mask))
    assert tuple(merged) == _merged_lora_ops()
    cm.unmerge()
    assert aten_ops(cm.graph_module(input_ids=ids, attention_mask=mask)) == adapted
    return adapted


# -- graph structure --------------------------------------------------------------------


def aten_ops(gm: fx.GraphModule) -> list[str]:
    """The ATen ops and tensor attributes a graph module reads, in order.

    Higher-order ops (``wrap_with_set_grad_enabled`` regions) are expanded in
    place, so graphs that differ only in whether such a region was inlined compare equal.
    """
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator):
            for a in n.args:
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    sub = getattr(gm, a.target, None) if "." not in a.target else None
                    if isinstance(sub, fx.GraphModule):
                        out += aten_ops(sub)
        elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            out.append(str(n.target))
        elif n.op == "get_attr":
            obj = gm
            try:
                for part in n.target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                obj = None
            if isinstance(obj, torch.Tensor):
                out.append("get_attr " + n.target)
    return out


# -- small plain models: peftc.testing.strategies' builders ------------------------------
#
# TinyMLP (``layers.i`` with tanh between) and its layer forms ``linear`` (nn.Linear), ``flinear``
# (F.linear), ``matmul`` (x @ W, [in, out]) and ``matmul_t`` (x @ W.T, [out, in]) come from the
# testing kit, so the suite and the kit's users build the same models.


def dense_of(layer: nn.Module):
    """(weight [out, in], bias or None) of an ``nn.Linear`` or a kit layer (``dense()``)."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias
    return layer.dense()


def lora_term(h: torch.Tensor, state) -> torch.Tensor:
    """``scaling * (h A^T) B^T`` in float64, from a LoRA state's tensors."""
    a, b = state.lora_A.detach().double(), state.lora_B.detach().double()
    return float(state.scaling) * (h.double() @ a.T) @ b.T


def reference_forward(model: TinyMLP, cm, x: torch.Tensor) -> torch.Tensor:
    """``model``'s forward with every adapted layer's LoRA added, all in float64.

    Computed from the weights directly: ``y = x W^T + b + scaling * (x A^T) B^T``.
    """
    by_path = {p.path: p for p in cm.sites}
    h = x.double()
    for i, layer in enumerate(model.layers):
        w, b = dense_of(layer)
        y = h @ w.detach().double().T
        if b is not None:
            y = y + b.detach().double()
        p = by_path.get(f"layers.{i}")
        if p is not None:
            y = y + lora_term(h, p.state)
        h = torch.tanh(y) if i < len(model.layers) - 1 else y
    return h


def clone_model(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model)


class OneModule(nn.Module):
    """``module`` at the path ``conv``, called on the input: a target for refusal tests."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.conv = module

    def forward(self, x):
        return self.conv(x)
