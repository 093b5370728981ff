"""Many adapters on one traced model: switching, disabling, deleting, mixing, combining."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_llama, padded_batch, two_adapter_llama
from torch._dynamo.testing import CompileCounter

import peftc

peft = pytest.importorskip("peft")

QV = peftc.linear(r".*\.(q|v)_proj")


def _two_adapters(backend="eager"):
    return two_adapter_llama(backend=backend)


def _state(cm):
    """Everything a test can change through the public API, to check it was put back."""
    return (cm.adapters, cm.active_adapters, cm.merged, cm.training,
            {n: p.requires_grad for n, p in cm.named_parameters()})


@pytest.fixture(scope="module")
def _built_once():
    cm, base = _two_adapters()
    return cm, base, {k: v.detach().clone() for k, v in cm.state_dict().items()}, _state(cm)


@pytest.fixture
def two_adapters(_built_once):
    """The model of ``_two_adapters()``, built once for the tests that switch, merge, train or fail
    but add or delete no adapter; after each test it is put back exactly as built (unmerged,
    "default" active, eval mode, no gradients, every value as built: unmerge alone leaves base
    weights off by rounding), and the test fails if anything else was left changed."""
    cm, base, values, state = _built_once
    yield cm, base
    if cm.merged:
        cm.unmerge()
    cm.set_adapter("default")
    cm.eval()
    cm.zero_grad(set_to_none=True)
    cm.load_state_dict(values)  # strict: a bias that merge created and unmerge left would fail here
    assert _state(cm) == state, "a test left the shared model changed"


def test_switching_and_disabling_select_exactly_one_adapter(two_adapters):
    cm, base = two_adapters
    ids, mask = padded_batch(3, 7)
    run = lambda: cm(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    default = run()
    cm.set_adapter("other")
    other = run()
    assert cm.active_adapters == ["other"]
    cm.merge()  # folds only the active adapter: the same function, from the weights
    torch.testing.assert_close(run(), other, atol=1e-5, rtol=0)
    cm.unmerge()
    cm.set_adapter(["default", "other"])
    both = run()
    with cm.disable_adapter():
        assert cm.active_adapters == []
        torch.testing.assert_close(run(), base(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
    assert cm.active_adapters == ["default", "other"]
    torch.testing.assert_close(run(), both, atol=0, rtol=0)
    assert (default - other).abs().max() > 1e-3 and (both - default).abs().max() > 1e-3


def test_merging_two_adapters_equals_both_active(two_adapters):
    cm, base = two_adapters
    ids, mask = padded_batch(2, 6)
    cm.set_adapter(["default", "other"])
    both = cm(input_ids=ids, attention_mask=mask).logits
    cm.merge()
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits, both, atol=1e-5, rtol=0)
    with cm.disable_adapter():  # disabling while merged: the weights go back to the base
        torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    assert cm.merged
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits, both, atol=1e-5, rtol=0)
    with pytest.raises(peftc.MergeError, match="unmerge"):
        cm.set_adapter("default")
    with pytest.raises(peftc.MergeError, match="unmerge"):
        cm.delete_adapter("other")
    cm.unmerge()
    for n, p in base.named_parameters():
        torch.testing.assert_close(cm.base_model.get_parameter(n), p, atol=1e-6, rtol=0)


def test_only_active_adapters_train(two_adapters):
    cm, _ = two_adapters
    cm.train()
    cm.set_adapter("other")
    trainable = {n.split(".")[2] for n, p in cm.named_parameters() if p.requires_grad}
    assert trainable == {"other"}
    ids, _ = padded_batch(2, 5)
    cm(input_ids=ids, labels=ids).loss.backward()
    for n, p in cm.named_parameters():
        assert (p.grad is not None) == n.startswith("peftc.adapters.other."), n


def test_delete_active_adapter_activates_the_next():
    cm, _ = _two_adapters()
    ids, _ = padded_batch(2, 5)
    cm.set_adapter("other")
    other = cm(input_ids=ids).logits
    cm.set_adapter("default")
    with pytest.warns(UserWarning, match="active"):
        cm.delete_adapter("default")
    assert cm.adapters == ["other"] and cm.active_adapters == ["other"]
    assert not any(n.startswith("peftc.adapters.default") for n, _ in cm.named_parameters())
    torch.testing.assert_close(cm(input_ids=ids).logits, other, atol=1e-6, rtol=0)
    with pytest.raises(peftc.RuleError, match="unknown adapter"):
        cm.set_adapter("default")


def test_mixed_batch_picks_an_adapter_per_row(two_adapters):
    cm, base = two_adapters
    ids, mask = padded_batch(3, 7)
    outs = {}
    for name in ("default", "other"):
        cm.set_adapter(name)
        outs[name] = cm(input_ids=ids, attention_mask=mask).logits
    outs["__base__"] = base(input_ids=ids, attention_mask=mask).logits
    names = ["other", "__base__", "default"]
    mixed = cm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], outs[name][row], atol=1e-6, rtol=0)
    with pytest.raises(peftc.RuleError, match="unknown"):
        cm(input_ids=ids, adapter_names=["nope"] * 3)
    with pytest.raises(peftc.RuleError, match="3 rows"):
        cm(input_ids=ids, adapter_names=["default"] * 2)
    with cm.disable_adapter():  # as PEFT (its layers check disable_adapters first): the base, every row
        torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask, adapter_names=names).logits,
                                   outs["__base__"], atol=1e-6, rtol=0)
        with pytest.raises(peftc.RuleError, match="unknown"):  # names are still checked
            cm(input_ids=ids, adapter_names=["nope"] * 3)
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask, adapter_names=names).logits, mixed,
                               atol=0, rtol=0)
    cm.merge()
    with pytest.raises(peftc.MergeError, match="merged"):
        cm(input_ids=ids, adapter_names=names)


def test_switching_never_recompiles():
    counter = CompileCounter()
    cm, _ = _two_adapters(backend=counter)
    ids, mask = padded_batch(3, 7)
    cm(input_ids=ids, attention_mask=mask)
    frames = counter.frame_count
    for names in ("other", ["default", "other"], "default"):
        cm.set_adapter(names)
        cm(input_ids=ids, attention_mask=mask)
    with cm.disable_adapter():
        cm(input_ids=ids, attention_mask=mask)
    ids2, mask2 = padded_batch(2, 11)
    cm(input_ids=ids2, attention_mask=mask2)
    assert counter.frame_count == frames, "a switch, disable, or new size recompiled"
    assert len(cm.programs) == 1, "a switch, disable, or new size retraced"


@pytest.fixture(scope="module")
def _peft_pair_built_once():
    model = make_llama()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False))
    cm = peftc.compile(model, [peftc.LoRA(r=4, alpha=8).on(QV)], backend="eager").eval()
    cm.add_adapter("b", [peftc.LoRA(r=4, alpha=2).on(QV)])
    state = dict(pm.named_parameters())
    with torch.no_grad():
        for p in cm.sites:
            p.state.lora_A.copy_(state[f"base_model.model.{p.path}.lora_A.{p.adapter_name}.weight"])
            p.state.lora_B.copy_(state[f"base_model.model.{p.path}.lora_B.{p.adapter_name}.weight"])
    snapshot = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    return pm, cm, snapshot, {k: v.detach().clone() for k, v in cm.state_dict().items()}, _state(cm)


@pytest.fixture
def peft_pair(_peft_pair_built_once):
    """PEFT and peftc with the same adapters "default" and "b", built once; the adapters a test
    adds ("mix", "neg") are deleted after it, and both sides are checked to be as built."""
    pm, cm, peft_values, values, state = _peft_pair_built_once
    yield pm, cm
    pm.set_adapter("default")
    cm.set_adapter("default")
    for name in ("mix", "neg"):
        if name in pm.peft_config:
            pm.delete_adapter(name)
        if name in cm.adapters:
            cm.delete_adapter(name)
    cm.load_state_dict(values)
    assert _state(cm) == state, "a test left the shared model changed"
    assert set(pm.peft_config) == {"default", "b"}
    now = pm.state_dict()
    assert now.keys() == peft_values.keys() and all(torch.equal(now[k], v) for k, v in peft_values.items())


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(peft_pair, kind):
    pm, cm = peft_pair
    pm.add_weighted_adapter(["default", "b"], [0.7, -0.3], "mix", combination_type=kind)
    pm.set_adapter("mix")
    cm.add_weighted_adapter(["default", "b"], [0.7, -0.3], "mix", combination_type=kind)
    cm.set_adapter("mix")
    ids, mask = padded_batch(2, 6)
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits,
                               pm.eval()(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    if kind != "linear":  # cat and full-rank svd are exact weighted sums of the deltas
        cm.set_adapter(["default", "b"])
        cm.add_weighted_adapter(["default"], [-1.0], "neg", combination_type=kind)
        cm.set_adapter(["default", "neg"])
        torch.testing.assert_close(cm(input_ids=ids).logits, make_llama()(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_add_weighted_adapter_with_a_name_given_twice_matches_peft(peft_pair, kind):
    pm, cm = peft_pair
    names, weights = ["default", "b", "default"], [1.0, 0.5, 2.0]
    pm.add_weighted_adapter(names, weights, "mix", combination_type=kind)
    pm.set_adapter("mix")
    cm.add_weighted_adapter(names, weights, "mix", combination_type=kind)
    cm.set_adapter("mix")
    ids, mask = padded_batch(2, 6)
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits,
                               pm.eval()(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_add_weighted_adapter_of_nothing_is_refused(two_adapters):
    cm, _ = two_adapters
    with pytest.raises(peftc.RuleError, match="at least one adapter"):
        cm.add_weighted_adapter([], [], "x")
    assert cm.adapters == ["default", "other"]


def test_bad_adapter_names(two_adapters):
    cm, _ = two_adapters
    with pytest.raises(peftc.RuleError, match="exists"):
        cm.add_adapter("other", [peftc.LoRA().on(QV)])
    with pytest.raises(peftc.RuleError, match="identifier"):
        cm.add_adapter("a.b", [peftc.LoRA().on(QV)])
    with pytest.raises(peftc.RuleError, match="combination_type"):
        cm.add_weighted_adapter(["default"], [1.0], "x", combination_type="ties")


def test_merge_disable_unmerge_keeps_the_active_adapter_acting(two_adapters):
    """Disabling while merged turns the gates off; unmerging must turn them back on."""
    cm, base = two_adapters
    ids, mask = padded_batch(2, 6)
    before = cm(input_ids=ids, attention_mask=mask).logits
    cm.merge()
    with cm.disable_adapter():
        torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    cm.unmerge()
    assert cm.active_adapters == ["default"]
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits, before, atol=1e-5, rtol=0)


def test_unmerging_while_disabled_leaves_the_base_weights(two_adapters):
    """Disabling while merged took the deltas out already: unmerging then must not subtract them again."""
    cm, base = two_adapters
    ids, mask = padded_batch(2, 6)
    before = cm(input_ids=ids, attention_mask=mask).logits
    cm.merge()
    cm.disable_adapter_layers()
    cm.unmerge()
    assert not cm.merged and cm.active_adapters == []
    for n, p in base.named_parameters():
        torch.testing.assert_close(cm.base_model.get_parameter(n), p, atol=1e-6, rtol=0)
    cm.enable_adapter_layers()
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits, before, atol=1e-5, rtol=0)


def test_merging_while_disabled_merges_the_active_adapters(two_adapters):
    """As in PEFT: merged inside ``disable_adapter()``, the active adapters act once it exits."""
    cm, base = two_adapters
    ids, mask = padded_batch(2, 6)
    run = lambda: cm(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    before = run()
    with cm.disable_adapter():
        cm.merge()
        assert cm.merged and cm.active_adapters == []
        torch.testing.assert_close(run(), base(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    assert cm.merged and cm.active_adapters == ["default"]
    torch.testing.assert_close(run(), before, atol=1e-5, rtol=0)
    cm.unmerge()
    torch.testing.assert_close(run(), before, atol=1e-5, rtol=0)


def test_deleting_an_adapter_drops_its_selectors():
    """A deleted adapter's rules stop searching new graphs (a pattern selector finds sites of its own)."""
    cm, _ = _two_adapters()
    rule = peftc.LoRA(r=2).on(peftc.linear(r".*mlp\.down_proj"))
    cm.add_adapter("extra", [rule])
    assert rule.selector in cm.state.selectors
    cm.delete_adapter("extra")
    assert rule.selector not in cm.state.selectors
    assert len(cm.state.selectors) == 3  # default's one rule and other's two


def test_deepcopy_gives_an_independent_working_compiled_model():
    cm = peftc.compile(make_llama(), peftc.LoRA(r=2, init=False).on(peftc.linear(r".*\.q_proj")), backend="eager")
    ids, mask = padded_batch(2, 6)
    out = cm(input_ids=ids, attention_mask=mask).logits
    twin = copy.deepcopy(cm)
    shared = {p.data_ptr() for p in cm.parameters()} & {p.data_ptr() for p in twin.parameters()}
    assert not shared and twin.base_model is not cm.base_model
    torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask).logits, out, atol=0, rtol=0)
    b = peftc.LoRA(r=3, init=False).on(peftc.linear(r".*\.(k|v)_proj"))
    twin.add_adapter("b", b)
    twin.set_adapter("b")
    assert cm.adapters == ["default"] and cm.active_adapters == ["default"]
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits, out, atol=0, rtol=0)
    # the reference: the original, never copied, given the same adapter "b"
    cm.add_adapter("b", b)
    cm.load_state_dict(twin.state_dict())
    cm.set_adapter("b")
    torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask).logits,
                               cm(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    # merged: the copy merges and unmerges on its own weights
    cm.merge()
    merged = copy.deepcopy(cm)
    assert merged.merged
    merged.unmerge()
    assert cm.merged and not merged.merged
    cm.unmerge()
    for (name, a), (_, c) in zip(cm.base_model.named_parameters(), merged.base_model.named_parameters(), strict=True):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=0, msg=name)
    with pytest.warns(UserWarning, match="without its adapters"):  # the copy's own direct-call warning
        merged.base_model(input_ids=ids)
