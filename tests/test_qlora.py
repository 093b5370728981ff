"""QLoRA: a 4-bit frozen base (bitsandbytes, on the CPU) with LoRA on top, against PEFT's QLoRA.

Every comparison runs PEFT 0.21 on the *same* packed weights: a deep copy of
the model peftc quantized (or transformers quantized), so the two differ only
in how they compute.
"""

from __future__ import annotations

import copy
import gc
import sys
import weakref

import pytest
import torch
from conftest import (
    VOCAB,
    assert_unchanged,
    copy_peft_weights,
    make_gpt2,
    make_llama,
    one_layer,
    snapshot,
)
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import peftc  # noqa: E402

QV = r".*\.(q|v)_proj"


def llama():
    """A one-layer Llama: what's checked here holds at any depth, and a trace costs less."""
    return make_llama(**one_layer("llama"))


def _rules(init=False):
    return [peftc.LoRA(r=4, alpha=8, init=init).on(peftc.linear(QV))]


def _peft(model, kbit: bool = True):
    if kbit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    return ids, torch.ones_like(ids)


def _hf_quantized(tmp_path, **config):
    """A tiny Llama quantized the way users get one: transformers' from_pretrained with a BitsAndBytesConfig."""
    llama().save_pretrained(tmp_path / "float")
    kw = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
              bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32,
                                                quantization_config=BitsAndBytesConfig(**{**kw, **config})).eval()


def _training_step_like_peft(cm, pm, ids, mask):
    """One SGD step of both in training mode: losses within 1e-3, LoRA-A gradients within 1e-5."""
    cm.train()
    pm.train()
    opt_c = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.1)
    opt_p = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    loss_c = cm(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss_p = pm(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert abs(loss_c.item() - loss_p.item()) < 1e-3
    loss_c.backward()
    loss_p.backward()
    grads = dict(pm.named_parameters())
    for p in cm.sites:
        want = grads[f"base_model.model.{p.path}.lora_A.default.weight"].grad
        torch.testing.assert_close(p.state.lora_A.grad, want, atol=1e-5, rtol=1e-4)
    opt_c.step()
    opt_p.step()


def _packed(model) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


# -- quantizing ------------------------------------------------------------------------------


def test_quantize_default_selection_is_every_linear_but_the_head_and_frees_float_weights():
    model = llama()
    q_weight = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    head = model.lm_head.weight
    peftc.compile(model, _rules(), backend="eager", quantize="nf4")
    gc.collect()
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(_packed(model)) == sorted(p for p in linears if p != "lm_head")
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is head
    assert q_weight() is None  # the float weight is gone, not held by a trace
    packed = _packed(model)["model.layers.0.mlp.up_proj"].weight
    assert packed.dtype == torch.uint8 and packed.numel() * 2 == 32 * 64
    assert model.is_loaded_in_4bit


def test_quantize_in_a_rules_file_with_its_own_selector(tmp_path):
    import json

    rules = {"rules": [{"adapter": {"kind": "lora", "r": 4}, "select": {"linear": QV}}],
             "quantize": {"quant_type": "fp4", "double_quant": False, "blocksize": 128,
                          "select": {"linear": r".*mlp\..*"}}}
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    model = llama()
    peftc.compile(model, str(tmp_path / "rules.json"), backend="eager")
    packed = _packed(model)
    assert sorted(packed) == sorted(f"model.layers.{i}.mlp.{n}_proj" for i in range(model.config.num_hidden_layers)
                           for n in ("gate", "up", "down"))
    state = packed["model.layers.0.mlp.up_proj"].weight.quant_state
    assert (state.quant_type, state.nested, state.blocksize) == ("fp4", False, 128)


@pytest.mark.parametrize("spec", ["nf4", peftc.Quantize("fp4", double_quant=False, blocksize=32),
                                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True)])
def test_compiled_qlora_matches_peft_forward_and_training_step(spec):
    model = llama()
    cm = peftc.compile(model, _rules(), backend="eager", quantize=spec)
    pm = _peft(copy.deepcopy(model))
    copy_peft_weights(cm, pm)
    ids, mask = _batch()
    with torch.no_grad():
        assert (cm(input_ids=ids, attention_mask=mask).logits
                - pm(input_ids=ids, attention_mask=mask).logits).abs().max() < 1e-4
    before = snapshot(model)
    _training_step_like_peft(cm, pm, ids, mask)
    assert_unchanged(model, before)  # the step changed adapter parameters only
    assert all(p.state.lora_A.grad is not None for p in cm.sites)


def test_linear_4bit_saves_no_float_weight_and_its_gradient_is_the_dequantized_one():
    """Autograd keeps the packed bytes for the input's gradient, as bitsandbytes' MatMul4Bit does."""
    model = llama()
    peftc.compile(model, _rules(), backend="eager", quantize="nf4")
    module = _packed(model)["model.layers.0.mlp.up_proj"]
    saved = []
    x = torch.randn(2, 9, 32, dtype=torch.float64).float().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = torch.ops.peftc.linear_4bit(x, *_op_args(module))
    assert not any(t.is_floating_point() and t.numel() >= 64 * 32 for t in saved)
    grad = torch.randn_like(y)
    y.backward(grad)
    weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    torch.testing.assert_close(y, x @ weight.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, grad @ weight, atol=1e-5, rtol=1e-5)


def _op_args(module):
    from peftc.storage import parts

    state = module.weight.quant_state
    p = parts(module.weight)
    return (p["packed"], p["absmax"], state.blocksize, state.quant_type, list(state.shape), state.dtype, None,
            p.get("absmax2"), p.get("code2"), p.get("offset"))


# -- models quantized by transformers ---------------------------------------------------------


@pytest.mark.parametrize("config", [{}, {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}])
def test_transformers_quantized_model_compiles_on_its_own_storage(tmp_path, config):
    model = _hf_quantized(tmp_path, **config)
    pm = _peft(copy.deepcopy(model))
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    cm = peftc.compile(model, _rules(), backend="eager")
    copy_peft_weights(cm, pm)
    ids, mask = _batch(1)
    gm = cm.graph_module(input_ids=ids, attention_mask=mask)
    q = _packed(model)["model.layers.0.self_attn.q_proj"].weight
    held = gm.get_buffer("peftc_kbit.model_layers_0_self_attn_q_proj_weight.packed")
    assert held.data_ptr() == q.data_ptr()  # the graph reads the model's bytes, never a copy
    assert gm.get_buffer("peftc_kbit.model_layers_0_self_attn_q_proj_weight.absmax") is q.quant_state.absmax
    with torch.no_grad():
        assert (cm(input_ids=ids, attention_mask=mask).logits
                - pm(input_ids=ids, attention_mask=mask).logits).abs().max() < 1e-4
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())


def _hf_8bit(tmp_path, **config):
    llama().save_pretrained(tmp_path / "float")
    config = BitsAndBytesConfig(load_in_8bit=True, **config)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32, quantization_config=config)


@pytest.mark.parametrize("threshold", [6.0, 0.0])  # LLM.int8() with outliers in float16, and without
def test_8bit_model_matches_peft_forward_training_step_and_merge(tmp_path, threshold):
    model = _hf_8bit(tmp_path, llm_int8_threshold=threshold).eval()
    pm = _peft(copy.deepcopy(model)).eval()
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    cm = peftc.compile(model, _rules(), backend="eager").eval()
    copy_peft_weights(cm, pm)
    ids, mask = _batch()
    gm = cm.graph_module(input_ids=ids, attention_mask=mask)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert gm.get_buffer("peftc_kbit.model_layers_0_self_attn_q_proj_weight.int8").data_ptr() == q.data_ptr()
    with torch.no_grad():
        unmerged = cm(input_ids=ids, attention_mask=mask).logits
        assert (unmerged - pm(input_ids=ids, attention_mask=mask).logits).abs().max() < 1e-4
    _training_step_like_peft(cm, pm, ids, mask)
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    cm.eval()
    pm.eval()
    with torch.no_grad():
        unmerged = cm(input_ids=ids, attention_mask=mask).logits  # after the step
        cm.merge()
        pm.merge_adapter()
        merged = cm(input_ids=ids, attention_mask=mask).logits
        peft_merged = pm(input_ids=ids, attention_mask=mask).logits
        assert (merged - peft_merged).abs().max() <= 1e-5 + 1e-3 * (peft_merged - unmerged).abs().max()
        assert not torch.equal(q.data, stored["model.layers.0.self_attn.q_proj.weight"])
        cm.unmerge()
        assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
        assert torch.equal(cm(input_ids=ids, attention_mask=mask).logits, unmerged)


def test_8bit_model_that_ran_before_compiling_and_unloads_to_float(tmp_path):
    """bitsandbytes moves an 8-bit layer's scales into its state on the layer's first call."""
    model = _hf_8bit(tmp_path).eval()
    ids, mask = _batch()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    assert model.model.layers[0].self_attn.q_proj.weight.SCB is None
    cm = peftc.compile(model, _rules(init=True), backend="eager").eval()
    with torch.no_grad():
        assert torch.equal(cm(input_ids=ids, attention_mask=mask).logits, base)  # B starts at zero
        weights = {p: bnb.functional.int8_vectorwise_dequant(m.weight.data, m.state.SCB)
                   for p, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
        plain = cm.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for m in plain.modules())
    assert all(torch.equal(plain.get_submodule(p).weight, w) for p, w in weights.items())


# -- merging --------------------------------------------------------------------------------


def test_merge_requantizes_as_peft_and_unmerge_restores_the_packed_bytes():
    model = llama()
    cm = peftc.compile(model, _rules(), backend="eager", quantize="nf4").eval()
    pm = _peft(copy.deepcopy(model), kbit=False).eval()
    copy_peft_weights(cm, pm)
    ids, mask = _batch(2)
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = cm(input_ids=ids, attention_mask=mask).logits
        cm.merge()
        merged = cm(input_ids=ids, attention_mask=mask).logits
        pm.merge_adapter()
        peft_merged = pm(input_ids=ids, attention_mask=mask).logits
    peft_error = (peft_merged - unmerged).abs().max()
    assert (merged - peft_merged).abs().max() <= 1e-5 + 1e-3 * peft_error
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, stored[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    cm.unmerge()
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(cm(input_ids=ids, attention_mask=mask).logits, unmerged)


def test_merge_and_unload_dequantize_returns_a_float_model():
    model = llama()
    cm = peftc.compile(model, _rules(), backend="eager", quantize="nf4").eval()
    ids, mask = _batch(3)
    cm.merge()
    with torch.no_grad():
        merged = cm(input_ids=ids, attention_mask=mask).logits
    with pytest.warns(UserWarning, match="already merged"):
        out = cm.merge_and_unload(dequantize=True)
    assert out is model and not _packed(out)
    assert all(p.dtype == torch.float32 for p in out.parameters())
    with torch.no_grad():
        torch.testing.assert_close(out(input_ids=ids, attention_mask=mask).logits, merged, atol=1e-5, rtol=1e-5)


def test_export_hf_merges_into_dequantized_weights_and_leaves_the_4bit_model_as_it_was(tmp_path):
    model = llama()
    cm = peftc.compile(model, _rules(), backend="eager", quantize="nf4").eval()
    ids, mask = _batch()
    with torch.no_grad():
        before = cm(input_ids=ids, attention_mask=mask).logits
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftc.PeftcError, match="format='hf'"):
        cm.export(tmp_path / "model.pt2", "pt2")
    cm.export(tmp_path / "hf", "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not hasattr(exported.config, "quantization_config")
    assert type(exported.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():  # an independent float64 merge of the dequantized weights
        q = _packed(model)["model.layers.0.self_attn.q_proj"]
        site = next(p for p in cm.sites if p.path == "model.layers.0.self_attn.q_proj")
        lora = site.state
        want = (bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).double()
                + 2 * lora.lora_B.double() @ lora.lora_A.double())
        torch.testing.assert_close(exported.model.layers[0].self_attn.q_proj.weight.double(), want,
                                   atol=1e-6, rtol=1e-6)
        assert (exported(input_ids=ids, attention_mask=mask).logits - before).abs().max() < 1e-4
        assert torch.equal(cm(input_ids=ids, attention_mask=mask).logits, before)
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    assert sorted(_packed(model)) == sorted(p for p, m in model.named_modules()
                                            if isinstance(m, nn.Linear) and p != "lm_head")


# -- saving ---------------------------------------------------------------------------------


def test_adapters_save_for_peft_on_a_quantized_base_and_back(tmp_path):
    model = llama()
    cm = peftc.compile(model, _rules(), backend="eager", quantize="nf4").eval()
    peft_base = copy.deepcopy(model)
    ours_base = copy.deepcopy(model)
    cm.save_pretrained(tmp_path / "ours")
    pm = PeftModel.from_pretrained(peft_base, tmp_path / "ours").eval()
    ids, mask = _batch(4)
    with torch.no_grad():
        want = cm(input_ids=ids, attention_mask=mask).logits
        assert (pm(input_ids=ids, attention_mask=mask).logits - want).abs().max() < 1e-4
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    pm.save_pretrained(tmp_path / "theirs")
    back = peftc.from_pretrained(ours_base, tmp_path / "theirs", backend="eager")
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=mask).logits - want).abs().max() < 1e-4


# -- k-bit preparation ----------------------------------------------------------------------


def test_prepare_model_for_kbit_training_casts_as_peft_does(tmp_path):
    model = _hf_quantized(tmp_path, bnb_4bit_compute_dtype=torch.bfloat16)
    for p in model.parameters():  # a half-precision base, as users load one
        if not p.__class__.__name__ == "Params4bit":
            p.data = p.data.bfloat16()
    theirs = prepare_model_for_kbit_training(copy.deepcopy(model), use_gradient_checkpointing=False)
    ours = peftc.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert ours is model
    got = {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()}
    assert got == {n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    assert got["model.norm.weight"] == (torch.float32, False)


def test_kbit_preparation_turns_on_graph_checkpointing(tmp_path):
    """Checkpointing asked of the model (PEFT's recipe) is the compiled graph's: its training
    step holds fewer bytes, with the same loss as without it."""
    from peftc.testing import held_bytes

    ids = torch.randint(3, 100, (2, 12))
    losses, held = [], []
    for checkpointing in (False, True):
        model = peftc.prepare_model_for_kbit_training(_hf_quantized(tmp_path), use_gradient_checkpointing=checkpointing)
        cm = peftc.compile(model, peftc.LoRA(r=4).on(peftc.linear(r".*\.(q|v)_proj")), backend="eager").train()
        assert cm.is_gradient_checkpointing is checkpointing
        cm(input_ids=ids, labels=ids)  # trace first: the measure below only sees running graphs
        out = {}
        held.append(held_bytes(cm, lambda cm=cm, out=out: out.update(loss=cm(input_ids=ids, labels=ids).loss)))
        losses.append(out["loss"].detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    assert held[1] < held[0]


# -- bad input ------------------------------------------------------------------------------


def test_quantize_spec_checks_what_bitsandbytes_runs():
    with pytest.raises(peftc.QuantizationError, match="blocksize=16"):
        peftc.Quantize(blocksize=16)
    with pytest.raises(peftc.QuantizationError, match="compute_dtype=torch.int8"):
        peftc.Quantize(compute_dtype=torch.int8)


@pytest.mark.parametrize("spec, message", [
    ("int3", "quant_type='int3'"),
    ({"blocksize": 100}, "blocksize=100"),
    ({"compute_dtype": "int8"}, "compute_dtype='int8'"),
    ({"bits": 4}, "unknown quantize options"),
    (BitsAndBytesConfig(load_in_8bit=True), "load_in_4bit=False"),
])
def test_bad_quantize_specs_are_named_and_change_nothing(spec, message):
    model = llama()
    before = snapshot(model)
    with pytest.raises(peftc.QuantizationError, match=message):
        peftc.compile(model, _rules(), backend="eager", quantize=spec)
    assert_unchanged(model, before)
    assert not _packed(model)


def test_selecting_a_weight_bitsandbytes_cant_hold_changes_nothing():
    model = make_gpt2(**one_layer("gpt2"))  # Conv1D: an addmm of an [in, out] weight, not an nn.Linear
    before = snapshot(model)
    with pytest.raises(peftc.QuantizationError, match="not an nn.Linear"):
        peftc.compile(model, [peftc.LoRA(r=2).on(peftc.linear(r".*c_attn"))], backend="eager",
                      quantize=peftc.Quantize(select=peftc.linear(r".*c_attn")))
    assert_unchanged(model, before)


def test_a_weight_of_a_dtype_bitsandbytes_cant_quantize_is_named_before_any_layer_changes():
    model = llama().double()
    before = snapshot(model)
    with pytest.raises(peftc.QuantizationError, match=r"layers\.0\.self_attn\.q_proj\.weight is torch\.float64.*model\.float"):
        peftc.compile(model, _rules(), backend="eager", quantize="nf4")
    assert_unchanged(model, before)
    assert not _packed(model)


def test_bad_rules_leave_the_model_unquantized():
    model = llama()
    before = snapshot(model)
    with pytest.raises(peftc.RuleError, match="matched no site"):
        peftc.compile(model, [peftc.LoRA(r=2).on(peftc.linear(r".*nope"))], backend="eager", quantize="nf4")
    assert_unchanged(model, before)
    assert not _packed(model) and not getattr(model, "is_loaded_in_4bit", False)


def test_quantizing_twice_and_missing_bitsandbytes_are_named(monkeypatch, tmp_path):
    model = _hf_quantized(tmp_path)
    with pytest.raises(peftc.QuantizationError, match="quantized already"):
        peftc.compile(model, _rules(), backend="eager", quantize="nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    plain = llama()
    with pytest.raises(peftc.QuantizationError, match=r"peftc\[qlora\]"):
        peftc.compile(plain, _rules(), backend="eager", quantize="nf4")


def test_bfloat16_compute_dtype_trains_close_to_peft():
    """With a compute dtype narrower than the input, LoRA's sum is rounded in the compute dtype
    (the op's output), where PEFT adds after casting back: logits agree to bfloat16's precision."""
    model = llama()
    cm = peftc.compile(model, _rules(), backend="eager", quantize=peftc.Quantize(compute_dtype=torch.bfloat16))
    pm = _peft(copy.deepcopy(model))
    copy_peft_weights(cm, pm)
    ids, mask = _batch(5)
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits,
                                   pm(input_ids=ids, attention_mask=mask).logits, atol=1e-2, rtol=1e-2)
    cm.train()
    pm.train()
    loss_c = cm(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss_p = pm(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert abs(loss_c.item() - loss_p.item()) < 1e-3
