"""LoHa, LoKr and VeRA (``peftc.LoHa``/``LoKr``/``VeRA``, PEFT's configs) against PEFT 0.21.

Each case wraps a deep copy of a tiny model with ``peft.get_peft_model``, draws
PEFT's adapter tensors at random (PEFT's init makes LoHa/LoKr a no-op and VeRA's
``lambda_b`` zero, which would make every check trivial), compiles the original with
the same config, copies the tensors over, and compares. VeRA's projections are
never copied: peftc draws them from the same key.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import (
    BUILDERS,
    assert_matches_peft,
    assert_merges_to_base_graph,
    no_grad_logits,
    one_layer,
    padded_batch,
    snapshot,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoHaConfig, LoKrConfig, VeraConfig

import peftc
from peftc.testing import assert_merge_equivalent, assert_unmerge_restores
from peftc.testing import strategies as pst

ATOL = 1e-5
PREFIX = "base_model.model."
TRAINED = ("hada_", "lokr_", "vera_lambda_")  # the adapter tensors a test randomises


logits = no_grad_logits


def randomise(pm, seed: int = 1, adapter: str = "default") -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(t in name for t in TRAINED) and name.endswith(f".{adapter}"):
                p.copy_(0.4 * torch.randn(p.shape, generator=g))


def copy_state(cm, pm, adapter: str = "default") -> None:
    """PEFT's per-site tensors into peftc's states (PEFT's keys: ``<path>.<name>.<adapter>``)."""
    sd = pm.state_dict()
    with torch.no_grad():
        for p in cm.sites:
            if p.adapter_name == adapter:
                for name, t in p.state.named_parameters():
                    t.copy_(sd[f"{PREFIX}{p.path}.{name}.{adapter}"])


def build_pair(arch: str, config, seed: int = 0, train_inputs: dict | None = None, **overrides):
    """(model, PEFT's model, peftc's) with PEFT's random adapter tensors in both, in eval mode;
    in training mode with ``train_inputs``, which peftc's first trace is then of."""
    model = BUILDERS[arch](seed=seed, **overrides).train(train_inputs is not None)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).train(model.training)
    randomise(pm)
    cm = peftc.compile(model, config, train_inputs, backend="eager").train(model.training)
    copy_state(cm, pm)
    return model, pm, cm


def train_pair(config, ids, mask):
    """:func:`build_pair` on a one-layer Llama in training mode, traced for a loss on ``ids``."""
    return build_pair("llama", config, train_inputs=dict(input_ids=ids, attention_mask=mask, labels=ids),
                      **one_layer("llama"))


CASES = [
    pytest.param("llama", LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=8), id="loha-llama-defaults"),
    pytest.param("qwen2", LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=4, target_modules=["q_proj", "k_proj", "up_proj"],
                                     rank_pattern={"up_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}),
                 id="loha-qwen2-biases-patterns"),
    pytest.param("bert", LoHaConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear"), id="loha-bert-all-linear"),
    pytest.param("llama", LoKrConfig(task_type="CAUSAL_LM", r=4, alpha=8), id="lokr-llama-full-factors"),
    pytest.param("llama", LoKrConfig(task_type="CAUSAL_LM", r=1, alpha=3, decompose_both=True,
                                     target_modules=["q_proj", "gate_proj", "down_proj"]), id="lokr-decompose-both"),
    pytest.param("qwen2", LoKrConfig(task_type="CAUSAL_LM", r=2, decompose_factor=4, init_weights="lycoris",
                                     target_modules=["v_proj", "up_proj"]), id="lokr-factor-lycoris"),
    pytest.param("llama", VeraConfig(task_type="CAUSAL_LM", r=16), id="vera-llama-defaults"),
    pytest.param("llama", VeraConfig(task_type="CAUSAL_LM", r=8, projection_prng_key=7,
                                     target_modules=["q_proj", "up_proj", "down_proj"]), id="vera-llama-shapes"),
    pytest.param("gpt2", VeraConfig(task_type="CAUSAL_LM", r=8, target_modules=["c_attn", "c_fc"]),
                 id="vera-gpt2-conv1d"),
    pytest.param("bert", VeraConfig(task_type="SEQ_CLS", r=4), id="vera-bert-seq-cls"),
]


@pytest.mark.parametrize(("arch", "config"), CASES)
def test_parity_with_peft(arch, config, capsys):
    # one layer, unless a pattern names a layer
    names_a_layer = any("layers" in key for key in getattr(config, "alpha_pattern", None) or {})
    model, pm, cm = build_pair(arch, config, **({} if names_a_layer else one_layer(arch)))
    peft_sites = {n.removeprefix(PREFIX).rsplit(".", 2)[0] for n, _ in pm.named_parameters()
                  if any(t in n for t in TRAINED)}
    assert {p.path for p in cm.sites} == peft_sites
    ids, mask = padded_batch()
    with pm.disable_adapter():
        base = logits(pm, ids, mask)
    with cm.disable_adapter():
        torch.testing.assert_close(logits(cm, ids, mask), base, atol=ATOL, rtol=0)
    assert_matches_peft(model, pm, cm, capsys)


@pytest.mark.parametrize("config", [LoHaConfig(task_type="CAUSAL_LM"), LoKrConfig(task_type="CAUSAL_LM"),
                                    VeraConfig(task_type="CAUSAL_LM", r=8)], ids=["loha", "lokr", "vera"])
def test_merged_graph_is_the_base_graph(config):
    assert_merges_to_base_graph(config)


@pytest.mark.parametrize("config", [
    LoHaConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "down_proj"]),
    LoKrConfig(task_type="CAUSAL_LM", r=1, decompose_both=True, target_modules=["q_proj", "down_proj"]),
    VeraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "down_proj"]),
], ids=["loha", "lokr", "vera"])
def test_gradients_match_peft(config):
    ids, mask = padded_batch()
    _, pm, cm = train_pair(config, ids, mask)
    for m in (pm, cm):
        m.train()
        m(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for p in cm.sites:
        for name, t in p.state.named_parameters():
            torch.testing.assert_close(t.grad, grads[f"{PREFIX}{p.path}.{name}.default"], atol=ATOL, rtol=1e-4)
            assert t.grad.abs().max() > 0
    assert all(p.grad is None for p in cm.base_model.parameters())


@pytest.mark.parametrize("config", [
    LoHaConfig(task_type="CAUSAL_LM", r=2, rank_dropout=0.5, module_dropout=1e-9),
    LoKrConfig(task_type="CAUSAL_LM", r=1, decompose_both=True, rank_dropout=0.5, module_dropout=1e-9,
               rank_dropout_scale=True),
    LoKrConfig(task_type="CAUSAL_LM", r=1, rank_dropout=0.5, module_dropout=1e-9),
], ids=["loha", "lokr-scaled", "lokr"])
def test_rank_and_module_dropout_draw_as_peft_does(config):
    """PEFT draws ``rand(1)`` (module dropout), then ``rand(out)`` (rank dropout) per site in
    call order; from one seed peftc's training graph draws the same numbers."""
    _, pm, cm = build_pair("llama", config, **one_layer("llama"))
    ids, mask = padded_batch()
    outs = []
    for m in (pm, cm):
        m.train()
        torch.manual_seed(3)
        outs.append(logits(m, ids, mask))
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=0)
    torch.manual_seed(4)
    assert (logits(cm, ids, mask) - outs[1]).abs().max() > 10 * ATOL  # the masks are random
    cm.eval()
    pm.eval()
    torch.testing.assert_close(logits(cm, ids, mask), logits(pm, ids, mask), atol=ATOL, rtol=0)


def test_module_dropout_skips_the_whole_adapter():
    """One site: each training call gives exactly the base output or exactly the adapted one."""
    config = LoHaConfig(task_type="CAUSAL_LM", r=2, module_dropout=0.5, target_modules=["q_proj"],
                        layers_to_transform=[0])
    _, _, cm = build_pair("llama", config)
    assert len(cm.sites) == 1
    ids, mask = padded_batch()
    with cm.disable_adapter():
        base = logits(cm, ids, mask)
    adapted = logits(cm, ids, mask)
    assert (adapted - base).abs().max() > 10 * ATOL
    cm.train()
    seen = []
    for seed in range(12):
        torch.manual_seed(seed)
        out = logits(cm, ids, mask)
        is_base, is_adapted = torch.allclose(out, base, atol=ATOL), torch.allclose(out, adapted, atol=ATOL)
        assert is_base != is_adapted
        seen.append(is_base)
    assert any(seen) and not all(seen)


@pytest.mark.parametrize(("arch", "config"), [
    ("llama", LoHaConfig(task_type="CAUSAL_LM", r=2, alpha_pattern={"v_proj": 5})),
    ("bert", LoKrConfig(task_type="SEQ_CLS", r=1, decompose_both=True)),
    ("llama", VeraConfig(task_type="CAUSAL_LM", r=8)),
    ("gpt2", VeraConfig(task_type="CAUSAL_LM", r=8, save_projection=False)),
], ids=["loha-llama", "lokr-bert", "vera-llama", "vera-gpt2-no-projection"])
def test_checkpoints_both_ways(arch, config, tmp_path):
    model, pm, cm = build_pair(arch, config, **one_layer(arch))
    ids, mask = padded_batch()
    want = logits(pm, ids, mask)

    cm.save_pretrained(tmp_path / "ours")  # peftc saves, PEFT loads
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == config.peft_type.value
    loaded = peft.PeftModel.from_pretrained(BUILDERS[arch](**one_layer(arch)), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, ids, mask), want, atol=ATOL, rtol=0)
    assert isinstance(peft.PeftConfig.from_peft_type(**cm.peft_config["default"]), type(config))

    pm.save_pretrained(tmp_path / "theirs")  # PEFT saves, peftc loads
    ours = peftc.from_pretrained(BUILDERS[arch](**one_layer(arch)), tmp_path / "theirs", backend="eager").eval()
    torch.testing.assert_close(logits(ours, ids, mask), want, atol=ATOL, rtol=0)
    assert {p.path for p in ours.sites} == {p.path for p in cm.sites}


def test_vera_projection_is_saved_once_and_shared(tmp_path):
    from safetensors.torch import load_file

    _, pm, cm = build_pair("llama", VeraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "up_proj"]),
                           **one_layer("llama"))
    cm.save_pretrained(tmp_path / "ours")
    pm.save_pretrained(tmp_path / "theirs")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert set(ours) == set(theirs)
    for key in ("base_model.vera_A", "base_model.vera_B"):
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0)
    assert ours["base_model.vera_A"].shape == (8, 32) and ours["base_model.vera_B"].shape == (64, 8)
    assert len({id(p.state.projections) for p in cm.sites}) == 1
    names = [n for n, _ in cm.named_parameters() if "vera_A" in n or "vera_B" in n]
    assert names == []  # buffers: frozen, not counted as parameters


@pytest.mark.parametrize(("config", "native"), [
    (LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=2, target_modules=["k_proj", "down_proj"]),
     peftc.LoHa(r=4, alpha=2)),
    (LoKrConfig(task_type="CAUSAL_LM", r=1, decompose_both=True, target_modules=["k_proj", "down_proj"]),
     peftc.LoKr(r=1, decompose_both=True)),
    (VeraConfig(task_type="CAUSAL_LM", r=8, target_modules=["k_proj", "down_proj"]), peftc.VeRA(r=8)),
], ids=["loha", "lokr", "vera"])
def test_config_object_dict_and_native_constructor_agree(config, native):
    ids, mask = padded_batch()
    one = one_layer("llama")
    as_object = peftc.compile(BUILDERS["llama"](**one), config, backend="eager")
    as_dict = peftc.compile(BUILDERS["llama"](**one), json.loads(json.dumps(config.to_dict(), default=list)),
                            backend="eager")
    built = peftc.compile(BUILDERS["llama"](**one), [native.on(peftc.linear(r".*(k_proj|down_proj)"))],
                          backend="eager")
    for cm in (as_object, as_dict, built):
        with torch.no_grad():
            for p in cm.sites:
                for t in p.state.parameters():
                    t.copy_(torch.linspace(-0.5, 0.7, t.numel()).view_as(t))
    assert {p.path for p in as_object.sites} == {p.path for p in as_dict.sites} == {p.path for p in built.sites}
    want = logits(built, ids, mask)
    torch.testing.assert_close(logits(as_object, ids, mask), want, atol=0, rtol=0)
    torch.testing.assert_close(logits(as_dict, ids, mask), want, atol=0, rtol=0)


@pytest.mark.parametrize("kind", [peftc.LoHa(r=2, init=False), peftc.LoKr(r=1, decompose_both=True, init=False),
                                  peftc.VeRA(r=8, init=False)], ids=["loha", "lokr", "vera"])
def test_adapters_switch_mix_and_keep_nan_out(kind):
    model = BUILDERS["llama"](**one_layer("llama"))
    cm = peftc.compile(model, [peftc.LoRA(r=2, init=False).on(peftc.linear(r".*q_proj"))], backend="eager")
    cm.add_adapter("other", [kind.on(peftc.linear(r".*(v_proj|up_proj)"))])
    ids, mask = padded_batch(3, 7)
    outs = {}
    for name in ("default", "other"):
        cm.set_adapter(name)
        outs[name] = logits(cm, ids, mask)
    with cm.disable_adapter():
        outs["__base__"] = logits(cm, ids, mask)
    assert (outs["other"] - outs["__base__"]).abs().max() > 10 * ATOL
    names = ["other", "__base__", "default"]
    mixed = logits(cm, ids, mask, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], outs[name][row], atol=1e-6, rtol=0)

    # NaN in the inactive adapter reaches neither the output nor a gradient
    cm.set_adapter("default")
    with torch.no_grad():
        for p in cm.sites:
            if p.adapter_name == "other":
                for t in p.state.parameters():
                    t.fill_(float("nan"))
    cm.train()
    out = cm(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)  # (no logits: the fused LM-head loss in training graphs)
    assert all(torch.isfinite(t.grad).all() for p in cm.sites if p.adapter_name == "default"
               for t in p.state.parameters())


def test_loha_on_gpt2_conv1d_saves_in_peftcs_format(tmp_path):
    """PEFT has no LoHa for GPT-2's Conv1D; peftc adapts it and saves its own format."""
    model = BUILDERS["gpt2"](**one_layer("gpt2"))
    cm = peftc.compile(model, [peftc.LoHa(r=2, init=False).on(peftc.linear(r".*c_attn"))], backend="eager").eval()
    ids, mask = padded_batch()
    want = logits(cm, ids, mask)
    cm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PEFTC"
    again = peftc.from_pretrained(BUILDERS["gpt2"](**one_layer("gpt2")), tmp_path, backend="eager").eval()
    torch.testing.assert_close(logits(again, ids, mask), want, atol=0, rtol=0)


@pytest.mark.parametrize(("rules", "match"), [
    ({"peft_type": "LOHA", "r": 0, "target_modules": ["q_proj"]}, "rank r=0"),
    ({"peft_type": "LOHA", "rank_dropout": 1.0, "target_modules": ["q_proj"]}, "rank_dropout=1.0"),
    ({"peft_type": "LOKR", "init_weights": "pissa", "target_modules": ["q_proj"]}, "init='pissa'"),
    ({"peft_type": "LOKR", "decompose_factor": 2.5, "target_modules": ["q_proj"]}, "decompose_factor"),
    ({"peft_type": "LOKR", "alpha_pattern": {"q_proj(": 2}, "target_modules": ["q_proj"]}, "alpha_pattern key"),
    ({"peft_type": "VERA", "vera_dropout": -0.1, "target_modules": ["q_proj"]}, "dropout=-0.1"),
    ({"peft_type": "VERA", "projection_prng_key": "seed", "target_modules": ["q_proj"]}, "prng_key"),
    ({"peft_type": "LOHA", "target_modules": ["q_proj", "nope"]}, r"\['nope'\] match no op"),
    ([peftc.LoHa().on(peftc.embedding())], "LoHa adapts linear-like ops"),
    ([peftc.VeRA(r=4).on(peftc.embedding())], "VeRA adapts linear-like ops"),
])
def test_bad_rules_are_rule_errors(rules, match):
    model = BUILDERS["llama"](**one_layer("llama"))
    before = snapshot(model)
    with pytest.raises(peftc.RuleError, match=match):
        peftc.compile(model, rules, backend="eager")
    after = snapshot(model)
    assert all(torch.equal(after[k][0], v[0]) and after[k][1] == v[1] for k, v in before.items())


def test_no_default_for_an_unknown_model_type():
    for kind in ("LOHA", "LOKR", "VERA"):
        with pytest.raises(peftc.RuleError, match="no target_modules.*set target_modules"):
            peftc.compile(pst.TinyMLP([4, 4], ["linear"], [True]), {"peft_type": kind},
                          example_inputs=(torch.randn(2, 4),), backend="eager")


KINDS = st.one_of(
    st.builds(peftc.LoHa, r=st.integers(1, 3), alpha=st.sampled_from([1, 2, 5.5]), init=st.just(False)),
    st.builds(peftc.LoKr, r=st.integers(1, 3), decompose_both=st.booleans(), init=st.just(False)),
    st.builds(peftc.VeRA, r=st.integers(1, 6), init=st.just(False), prng_key=st.integers(0, 3)),
)


@settings(max_examples=10, deadline=None)
@given(case=pst.cases(adapters=KINDS, kinds=("mlp",)))
def test_merge_and_unmerge_properties(case):
    assert_merge_equivalent(case.model, case.rules, case.inputs)
    assert_unmerge_restores(case.model, case.rules, case.inputs)
