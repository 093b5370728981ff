"""Reserved capacity (peftc.Reserve) and hot-swapping: adapters added, loaded, swapped, switched and
deleted after the first compile compile nothing again, and act exactly as PEFT's with the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_unchanged, make_llama, one_layer, padded_batch, snapshot
from conftest import no_grad_logits as logits
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounter

import peftc

peft = pytest.importorskip("peft")
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap  # noqa: E402

QV = r".*\.(q|v)_proj"
ATOL = 2e-5
#: PEFT adapters saved once: name -> (rank, alpha, target modules, seed)
ADAPTERS = {"a": (4, 8, ["q_proj", "v_proj"], 1), "b": (8, 4, ["q_proj", "v_proj"], 2),
            "c": (2, 2, ["q_proj"], 3), "big": (16, 16, ["q_proj", "v_proj"], 4), "k": (4, 4, ["k_proj"], 5)}


def llama():
    """A one-layer Llama: every check here holds at any depth, and a trace costs less."""
    return make_llama(**one_layer("llama"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """PEFT-saved LoRA folders, random A and B."""
    out = {}
    for name, (r, alpha, targets, seed) in ADAPTERS.items():
        torch.manual_seed(seed)
        pm = peft.get_peft_model(llama(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                          init_lora_weights=False))
        out[name] = tmp_path_factory.mktemp(name)
        pm.save_pretrained(out[name])
    return out


def peft_model(path, **kwargs):
    return peft.PeftModel.from_pretrained(llama(), path, **kwargs)


def test_add_load_hotswap_switch_delete_compile_nothing(dirs):
    counter = CompileCounter()
    cm = peftc.from_pretrained(llama(), dirs["a"], reserve=peftc.Reserve(max_rank=8, slots=3),
                               backend=counter)
    ids, mask = padded_batch(3, 7)
    torch.testing.assert_close(logits(cm, ids, mask), logits(peft_model(dirs["a"]), ids, mask), atol=ATOL, rtol=0)
    assert counter.frame_count == 1

    cm.load_adapter(dirs["b"], "b")  # a larger rank, another alpha
    cm.set_adapter("b")
    torch.testing.assert_close(logits(cm, ids, mask), logits(peft_model(dirs["b"]), ids, mask), atol=ATOL, rtol=0)
    cm.add_adapter("n", [peftc.LoRA(r=3, init=False).on(peftc.linear(r".*\.q_proj"))])  # fills the last slot
    cm.set_adapter("n")
    logits(cm, ids, mask)
    peftc.hotswap_adapter(cm, dirs["c"], "default")  # rank 2, on q only: v's room is emptied
    cm.set_adapter("default")
    torch.testing.assert_close(logits(cm, ids, mask), logits(peft_model(dirs["c"]), ids, mask), atol=ATOL, rtol=0)
    cm.delete_adapter("n")
    cm.load_adapter(dirs["a"], "again")  # into the slot "n" left
    cm.set_adapter(["again", "b"])
    both = logits(cm, ids, mask)
    with cm.disable_adapter():
        logits(cm, ids, mask)
    assert counter.frame_count == 1, "an add, load, hot-swap, switch or delete compiled again"
    assert len(cm.programs) == 1, "an add, load, hot-swap, switch or delete traced again"

    pm = peft_model(dirs["a"], adapter_name="again")
    pm.load_adapter(dirs["b"], "b")
    pm.base_model.set_adapter(["again", "b"])
    torch.testing.assert_close(both, logits(pm, ids, mask), atol=ATOL, rtol=0)


def test_training_while_adding_loading_and_hotswapping_compiles_nothing(dirs):
    """In training mode too: adapters added or loaded inactive, and a hot-swap into the adapter
    that trains, change no graph and no requires_grad flag."""
    counter = CompileCounter()
    ids, mask = padded_batch(3, 7)
    cm = peftc.from_pretrained(llama().train(), dirs["a"], dict(input_ids=ids, attention_mask=mask, labels=ids),
                               reserve=peftc.Reserve(max_rank=8, slots=3), is_trainable=True,
                               backend=counter).train()

    def step():
        cm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return {p.site.weight_path: p.state.lora_B.grad.clone() for p in cm.sites if p.adapter_name == "default"}

    step()
    frames = counter.frame_count
    cm.add_adapter("b", [peftc.LoRA(r=2).on(peftc.linear(QV))])
    cm.load_adapter(dirs["c"], "c")
    cm.zero_grad()
    step()
    peftc.hotswap_adapter(cm, dirs["b"], "default", is_trainable=True)
    cm.zero_grad()
    grads = step()
    assert counter.frame_count == frames, "adding, loading or hot-swapping while training compiled again"
    pm = peft_model(dirs["b"], is_trainable=True).train()
    pm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    theirs = dict(pm.named_parameters())
    for weight_path, grad in grads.items():
        key = f"base_model.model.{weight_path.removesuffix('.weight')}.lora_B.default.weight"
        torch.testing.assert_close(grad, theirs[key].grad, atol=ATOL, rtol=1e-4)


def test_training_a_padded_slot_is_exact(dirs, tmp_path):
    """Rank 4 in a slot of rank 8: the same loss and gradients as PEFT, zero gradients in the padding,
    which stays zero through AdamW, and the same saved file (rank 4) as PEFT's after the same step."""
    ids, mask = padded_batch(3, 7)
    labels = ids.masked_fill(mask == 0, -100)
    cm = peftc.from_pretrained(llama().train(), dirs["a"], dict(input_ids=ids, attention_mask=mask, labels=labels),
                               reserve=peftc.Reserve(8, 2), is_trainable=True, backend="eager").train()
    pm = peft_model(dirs["a"], is_trainable=True).train()
    sites = {p.site.weight_path: p.state for p in cm.sites}
    assert {s.capacity for s in sites.values()} == {8} and {s.r for s in sites.values()} == {4}
    optimisers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (cm, pm)]
    for _ in range(2):
        losses = [m(input_ids=ids, attention_mask=mask, labels=labels).loss for m in (cm, pm)]
        torch.testing.assert_close(losses[0], losses[1], atol=ATOL, rtol=0)
        for loss in losses:
            loss.backward()
        peft_params = dict(pm.named_parameters())
        for weight_path, state in sites.items():
            path = weight_path.removesuffix(".weight")
            torch.testing.assert_close(state.lora_A.grad[:4], peft_params[f"base_model.model.{path}.lora_A.default.weight"].grad,
                                       atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(state.lora_B.grad[:, :4], peft_params[f"base_model.model.{path}.lora_B.default.weight"].grad,
                                       atol=ATOL, rtol=1e-4)
            assert not state.lora_A.grad[4:].any() and not state.lora_B.grad[:, 4:].any()
        for opt in optimisers:
            opt.step()
            opt.zero_grad()
        for state in sites.values():
            assert not state.lora_A[4:].any() and not state.lora_B[:, 4:].any(), "the padding moved"
    cm.save_pretrained(tmp_path / "peftc")
    pm.save_pretrained(tmp_path / "peft")
    ours, theirs = load_file(tmp_path / "peftc/adapter_model.safetensors"), load_file(tmp_path / "peft/adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, key
        torch.testing.assert_close(ours[key], value, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "peftc/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 8, {})


@pytest.mark.parametrize("reserve", [peftc.Reserve(max_rank=8, slots=1), None])
@pytest.mark.parametrize("new", ["a", "c"])
def test_hotswap_matches_peft_hotswap(dirs, new, reserve):
    """PEFT's hotswap_adapter after prepare_model_for_compiled_hotswap(target_rank=8), on the same
    weights: the same outputs; the adapter then saves exactly the file hot-swapped in. Without
    reserve, the room is the first adapter's (rank 8, q and v)."""
    ids, mask = padded_batch(3, 7)
    pm = peft_model(dirs["b"])
    prepare_model_for_compiled_hotswap(pm, target_rank=8)
    hotswap_adapter(pm, str(dirs[new]), "default", torch_device="cpu")
    counter = CompileCounter()
    cm = peftc.from_pretrained(llama(), dirs["b"], reserve=reserve, backend=counter)
    logits(cm, ids, mask)
    cm.load_adapter(dirs[new], "default", hotswap=True)
    torch.testing.assert_close(logits(cm, ids, mask), logits(pm, ids, mask), atol=ATOL, rtol=0)
    assert counter.frame_count == 1
    saved = peftc.formats.peft.adapter_tensors(cm, "default")
    expected = load_file(dirs[new] / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], v) for k, v in expected.items())


def test_bad_input_names_the_capacity_and_changes_nothing(dirs):
    cm = peftc.from_pretrained(llama(), dirs["a"], reserve=peftc.Reserve(max_rank=8, slots=2),
                               backend="eager")
    cm.load_adapter(dirs["c"], "c")
    ids, mask = padded_batch(3, 7)
    before, out = snapshot(cm), logits(cm, ids, mask)
    cases = [
        (lambda: cm.load_adapter(dirs["big"], "default", hotswap=True),
         peftc.RuleError, r"rank 16 .* exceeds the rank 8 .*Reserve\(max_rank=8, slots=2\)"),
        (lambda: peftc.hotswap_adapter(cm, dirs["k"], "c"),
         peftc.RuleError, r"k_proj.*no room.*Reserve\(max_rank=8, slots=2\)"),
        (lambda: cm.add_adapter("third", [peftc.LoRA(r=2).on(peftc.linear(QV))]),
         peftc.RuleError, r"all 2 adapter slots of peftc.Reserve\(max_rank=8, slots=2\) are taken"),
        (lambda: cm.load_adapter(dirs["a"], "third"), peftc.RuleError, "slots=3"),
        (lambda: cm.load_adapter(dirs["a"], "nope", hotswap=True), peftc.PeftcError, "no adapter|none named"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert_unchanged(cm, before)
        assert cm.adapters == ["default", "c"] and cm.active_adapters == ["default"]
        assert torch.equal(logits(cm, ids, mask), out)
    cm.delete_adapter("c")
    with pytest.raises(peftc.RuleError, match="dropout"):  # a free slot too: the graph's dropout is fixed
        cm.add_adapter("drop", [peftc.LoRA(r=2, dropout=0.1).on(peftc.linear(QV))])
    assert cm.adapters == ["default"]


def test_without_reserve_a_larger_rank_points_at_reserve(dirs):
    cm = peftc.from_pretrained(llama(), dirs["a"], backend="eager")
    before = snapshot(cm)
    with pytest.raises(peftc.RuleError, match=r"rank 8 .* exceeds the rank 4.*peftc.Reserve\(max_rank="):
        cm.load_adapter(dirs["b"], "default", hotswap=True)
    assert_unchanged(cm, before)


def test_reserve_rejects_what_it_cant_hold():
    with pytest.raises(peftc.RuleError, match="max_rank=0"):
        peftc.Reserve(max_rank=0, slots=2)
    model = llama()
    before = snapshot(model)
    with pytest.raises(peftc.RuleError, match="IA3 adapters can't be reserved"):
        peftc.compile(model, [peftc.IA3().on(peftc.linear(QV))], reserve=peftc.Reserve(8, 2), backend="eager")
    with pytest.raises(peftc.RuleError, match=r"rank 16 .* exceeds"):
        peftc.compile(model, [peftc.LoRA(r=16).on(peftc.linear(QV))], reserve=peftc.Reserve(8, 2), backend="eager")
    assert_unchanged(model, before)


def test_merge_and_combine_use_the_real_rank(dirs):
    """Merging and add_weighted_adapter on padded slots equal the unreserved model's."""
    ids, mask = padded_batch(3, 7)
    models = []
    for reserve in (peftc.Reserve(max_rank=8, slots=3), None):
        cm = peftc.from_pretrained(llama(), dirs["a"], reserve=reserve, backend="eager")
        cm.load_adapter(dirs["c"], "c")
        cm.add_weighted_adapter(["default", "c"], [0.6, -1.5], "mix", combination_type="cat")
        cm.set_adapter("mix")
        models.append(cm)
    reserved, plain = models
    torch.testing.assert_close(logits(reserved, ids, mask), logits(plain, ids, mask), atol=1e-6, rtol=0)
    assert {p.state.r for p in reserved.sites if p.adapter_name == "mix"} == {6}
    unmerged = logits(reserved, ids, mask)
    reserved.merge()
    torch.testing.assert_close(logits(reserved, ids, mask), unmerged, atol=ATOL, rtol=0)
    reserved.unmerge()
    torch.testing.assert_close(logits(reserved, ids, mask), unmerged, atol=ATOL, rtol=0)
