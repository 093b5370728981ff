"""LoRA on stacks of experts (transformers 5's fused 3-D expert weights), against PEFT 0.21's
``target_parameters`` and a float64 recomputation.

A stack is found by how the graph reads it (a grouped matmul, or an index into a bmm), so
both of transformers' exportable experts implementations are covered. Each expert gets its own
pair in PEFT's layout and keys; merge folds each expert's delta into its slice.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import (
    assert_matches_peft,
    assert_unchanged,
    make_llama,
    no_grad_logits,
    padded_batch,
    snapshot,
)
from peft import LoraConfig
from test_moe_targets import assert_checkpoints_both_ways, build

import peftc
from peftc.errors import RuleError
from peftc.formats.peft import adapter_tensors


def peft_model(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).eval()


def copy_from_peft(cm, pm) -> None:
    """PEFT's adapter tensors into peftc's, by PEFT's saved keys (which must be the same set)."""
    theirs, ours = peft.get_peft_model_state_dict(pm), adapter_tensors(cm, "default")
    assert set(ours) == set(theirs)
    with torch.no_grad():
        for key, tensor in ours.items():
            tensor.copy_(theirs[key])


def loss_and_grads(model, params: dict[str, torch.Tensor]):
    ids, mask = padded_batch()
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    grads = torch.autograd.grad(loss, list(params.values()))
    model.eval()
    return loss.detach(), dict(zip(params, grads, strict=True))


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def model_type(request):
    return request.param


def test_all_linear_equals_peft(model_type, capsys, tmp_path):
    """Counts, logits, merge, gradients and checkpoints both ways, with the router and every stack."""
    model = build(model_type)
    default = LoraConfig(target_modules="all-linear")
    assert (peftc.compile(build(model_type), default, backend="eager").get_nb_trainable_parameters()
            == peft_model(model, default).get_nb_trainable_parameters())
    config = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    pm = peft_model(model, config)
    cm = peftc.compile(model, config, backend="eager").eval()
    stacks = sorted(p.site.weight_path for p in cm.sites if p.site.kind == "experts")
    assert stacks == sorted(f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj"))
    copy_from_peft(cm, pm)

    # PEFT's own trainables and their gradients, against peftc's under the same keys
    theirs = {k: v for k, v in pm.named_parameters() if v.requires_grad}
    loss_ref, grads_ref = loss_and_grads(pm, theirs)
    ours = adapter_tensors(cm, "default")
    loss, grads = loss_and_grads(cm, ours)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    for key, grad in grads.items():
        ref = grads_ref[key.replace(".weight", ".default.weight")]
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-4)

    assert_checkpoints_both_ways(model_type, pm, cm, tmp_path)
    assert_matches_peft(model, pm, cm, capsys)  # logits, counts line, merge (into each slice), unmerge


def test_target_parameters_on_batched_mm_experts(capsys, tmp_path):
    """One stack named by target_parameters, on experts that index into a bmm, not a grouped matmul."""
    model = build("mixtral")
    model.set_experts_implementation("batched_mm")
    config = LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], target_parameters=["experts.down_proj"],
                        init_lora_weights=False)
    pm = peft_model(model, config)
    cm = peftc.compile(model, config, backend="eager").eval()
    sites = {p.site.weight_path: p.site for p in cm.sites}
    stack = sites["model.layers.0.mlp.experts.down_proj"]
    assert (stack.kind, stack.op, stack.experts, stack.in_features, stack.out_features) == (
        "experts", "aten.bmm.default", 4, 64, 32)
    copy_from_peft(cm, pm)  # keys without base_layer: the module's only adapted stack
    cm.save_pretrained(tmp_path)
    saved = peftc.formats.peft.read_checkpoint(tmp_path)[0]
    assert saved["target_parameters"] == ["model.layers.0.mlp.experts.down_proj",
                                          "model.layers.1.mlp.experts.down_proj"]
    assert_matches_peft(model, pm, cm, capsys)


def _expert_reference(model, cm, ids, mask):
    """The model's logits in float64 with each adapted expert's weight replaced by ``W_e + s B_e A_e``."""
    ref = copy.deepcopy(model).double()
    ref.set_experts_implementation("eager")  # transformers' per-expert loop: float64, unlike grouped_mm
    with torch.no_grad():
        for p in cm.sites:
            r, picked = p.state.r, p.state.experts.tolist()
            a = p.state.lora_A.double().reshape(len(picked), r, -1)
            b = p.state.lora_B.double().reshape(p.state.lora_B.shape[0], r, len(picked))
            weight = ref.get_parameter(p.site.weight_path)
            for j, e in enumerate(picked):
                weight[e] += float(p.state.scaling) * (b[:, :, j] @ a[j])
    return no_grad_logits(ref, ids, mask)


def test_selector_picks_expert_indices(tmp_path):
    """experts(indices=...) and its algebra adapt only those experts; merge, unmerge and the native
    checkpoint follow; the counts are the picked experts' pairs."""
    model = build("mixtral")
    before = snapshot(model)
    picked = peftc.experts(r".*layers\.0.*", indices=[1, 3]) | peftc.experts(r".*layers\.1.*") & ~peftc.experts(
        indices=0)
    cm = peftc.compile(model, peftc.LoRA(r=2, alpha=4, init=False).on(picked), backend="eager").eval()
    chosen = {p.site.weight_path: p.state.experts.tolist() for p in cm.sites}
    assert chosen == {"model.layers.0.mlp.experts.gate_up_proj": [1, 3], "model.layers.0.mlp.experts.down_proj": [1, 3],
                      "model.layers.1.mlp.experts.gate_up_proj": [1, 2, 3],
                      "model.layers.1.mlp.experts.down_proj": [1, 2, 3]}
    pairs = 2 * (32 + 128) + 2 * (64 + 32)  # r * (in + out) per expert, gate_up and down
    assert cm.get_nb_trainable_parameters()[0] == (2 + 3) * pairs
    ids, mask = padded_batch()
    want = _expert_reference(model, cm, ids, mask)
    torch.testing.assert_close(no_grad_logits(cm, ids, mask).double(), want, atol=1e-5, rtol=0)
    with cm.disable_adapter():  # the gate selects the stacks' own weights
        torch.testing.assert_close(no_grad_logits(cm, ids, mask), no_grad_logits(model, ids, mask), atol=0, rtol=0)
    cm.merge()
    merged = model.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
    for e in (0, 2):  # experts left out keep their slices bit for bit
        assert torch.equal(merged[e], before["param:model.layers.0.mlp.experts.gate_up_proj"][0][e])
    torch.testing.assert_close(no_grad_logits(model, ids, mask).double(), want, atol=1e-5, rtol=0)
    cm.unmerge()
    for key, (value, _) in snapshot(model).items():
        torch.testing.assert_close(value, before[key][0], atol=1e-6, rtol=1e-5)

    cm.save_pretrained(tmp_path)  # PEFT can't hold some experts of a stack: peftc's own format
    assert peftc.formats.peft.read_checkpoint(tmp_path)[0]["peft_type"] == "PEFTC"
    cm2 = peftc.from_pretrained(build("mixtral"), tmp_path, backend="eager").eval()
    assert {p.site.weight_path: p.state.experts.tolist() for p in cm2.sites} == chosen
    torch.testing.assert_close(no_grad_logits(cm2, ids, mask).double(), want, atol=1e-5, rtol=0)


def test_experts_selector_on_a_model_without_experts():
    model = make_llama()
    before = snapshot(model)
    with pytest.raises(RuleError, match=r"experts\(\): the model has no stack of experts.*peftc\.linear\(\)"):
        peftc.compile(model, peftc.LoRA(r=2).on(peftc.experts()), backend="eager")
    assert_unchanged(model, before)


def test_bad_expert_selections_are_refused():
    model = build("mixtral")
    before = snapshot(model)
    with pytest.raises(RuleError, match=r"holds 4 experts \(0 to 3\); pick indices below 4"):
        peftc.compile(model, peftc.LoRA(r=2).on(peftc.experts(indices=[2, 7])), backend="eager")
    with pytest.raises(RuleError, match=r"indices=-1.*expert index"):
        peftc.experts(indices=-1)
    with pytest.raises(RuleError, match=r"dropout.*PEFT's neither"):
        peftc.compile(model, peftc.LoRA(r=2, dropout=0.1).on(peftc.experts()), backend="eager")
    # other kinds don't adapt stacks; the error says how to leave them out
    with pytest.raises(RuleError, match=r"experts.*& ~peftc\.experts\(\)"):
        peftc.compile(model, peftc.DoRA(r=2).on(peftc.linear()), backend="eager")
    assert_unchanged(model, before)


def test_mixed_batches_are_refused_on_stacks():
    cm = peftc.compile(build("mixtral"), peftc.LoRA(r=2).on(peftc.experts()), backend="eager")
    ids, mask = padded_batch()
    with pytest.raises(RuleError, match="stacks of experts"):
        cm(input_ids=ids, attention_mask=mask, adapter_names=["default", "__base__", "default"])


def test_selector_algebra_per_expert():
    """|, & and ~ act on each stack's experts, and on other sites whole; the rules-file form is the same."""
    from peftc.sites import Site

    sites = [Site("model.layers.0.mlp.experts", "gate_up_proj", "experts", "aten.bmm.default", experts=4),
             Site("model.layers.0.mlp.gate", "weight", "linear", "aten.linear.default")]

    def picked(selector):
        return {s.weight_path: s.expert_ids for s in selector.select(sites)}

    stack, router = (s.weight_path for s in sites)
    assert picked(peftc.linear()) == {stack: None, router: None}
    assert picked(peftc.experts(indices=[0, 2])) == {stack: (0, 2)}
    assert picked(~peftc.experts(indices=[0, 2])) == {stack: (1, 3), router: None}
    assert picked(peftc.experts(indices=[0, 1]) | peftc.experts(indices=[3])) == {stack: (0, 1, 3)}
    assert picked(peftc.experts(indices=[0, 1]) & peftc.experts(indices=[1, 2])) == {stack: (1,)}
    assert picked(peftc.experts(indices=0) & peftc.experts(indices=1)) == {}
    assert picked(peftc.experts(indices=range(4))) == {stack: None}  # every expert: the stack whole
    assert picked(peftc.linear() & ~peftc.experts()) == {router: None}
    ruleset = peftc.load_rules({"rules": [{"adapter": {"kind": "lora", "r": 2},
                                           "select": {"experts": ".*experts", "indices": [1, 3]}}]})
    assert picked(ruleset.rules[0].selector) == {stack: (1, 3)}
