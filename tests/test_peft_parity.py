"""peftc against HF PEFT 0.21 with identical weights: outputs, counts, LoraConfig options.

Each case builds one tiny model, wraps a deep copy with ``peft.get_peft_model``
and compiles the original with the same ``LoraConfig`` (``init_lora_weights=False``
so that B is not zero), copies PEFT's LoRA matrices into peftc, and compares.
"""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from conftest import BUILDERS, copy_peft_weights, padded_batch
from conftest import no_grad_logits as logits
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

import peftc

ATOL = 1e-5


def peft_lora_layers(pm) -> dict[str, LoraLayer]:
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def build_pair(arch: str, config_kwargs: dict, seed: int = 0):
    model = BUILDERS[arch](seed=seed)
    config = LoraConfig(**config_kwargs)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).eval()
    cm = peftc.compile(model, config, backend="eager").eval()
    copy_peft_weights(cm, pm)
    return model, pm, cm


CASES = [
    pytest.param("llama", dict(target_modules=r".*\.(q|k|v|o)_proj"), id="llama-regex"),
    pytest.param("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                               exclude_modules=["0.self_attn.q_proj"]), id="llama-suffix-exclude-list"),
    pytest.param("llama", dict(target_modules="all-linear",
                               exclude_modules=r".*layers\.0\.mlp\..*"), id="llama-all-linear-exclude-regex"),
    pytest.param("llama", dict(target_modules=["q_proj", "k_proj", "up_proj"], layers_to_transform=[1],
                               layers_pattern="layers"), id="llama-layers-to-transform"),
    pytest.param("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                               alpha_pattern={"down_proj": 3}), id="llama-rank-alpha-pattern"),
    pytest.param("llama", dict(r=9, lora_alpha=6, use_rslora=True, target_modules=["o_proj", "gate_proj"],
                               rank_pattern={"gate_proj": 5}), id="llama-rslora-rank-pattern"),
    pytest.param("llama", dict(), id="llama-default-targets"),
    pytest.param("qwen2", dict(target_modules="all-linear"), id="qwen2-gqa-all-linear"),
    pytest.param("qwen2", dict(target_modules=["q_proj", "k_proj"], bias="all"), id="qwen2-bias-all"),
    pytest.param("qwen2", dict(target_modules=["q_proj", "o_proj"], bias="lora_only"), id="qwen2-bias-lora-only"),
    pytest.param("mistral", dict(target_modules=r".*\.(q|v)_proj|.*mlp\.up_proj", lora_dropout=0.1),
                 id="mistral-regex-dropout-eval"),
    pytest.param("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), id="gpt2-conv1d"),
    pytest.param("gpt2", dict(target_modules=["c_fc"], fan_in_fan_out=True, layers_to_transform=1,
                              layers_pattern="h"), id="gpt2-layer-1-h"),
    pytest.param("gpt2", dict(target_modules="all-linear", fan_in_fan_out=True), id="gpt2-all-linear"),
    pytest.param("bert", dict(task_type="SEQ_CLS", target_modules=["query", "value", "dense"]),
                 id="bert-seq-cls"),
    pytest.param("bert", dict(task_type="SEQ_CLS", target_modules=["query", "value"], bias="all"),
                 id="bert-seq-cls-bias-all"),
]


@pytest.mark.parametrize(("arch", "kwargs"), CASES)
def test_parity_with_peft(arch, kwargs, capsys):
    kwargs = {"r": 4, "lora_alpha": 8, **kwargs, "init_lora_weights": False}
    _, pm, cm = build_pair(arch, kwargs)

    # the same sites, with the same ranks and scalings
    layers = peft_lora_layers(pm)
    assert sorted(p.path for p in cm.sites) == sorted(layers)
    for p in cm.sites:
        layer = layers[p.path]
        assert p.state.lora_A.shape == layer.lora_A["default"].weight.shape
        assert p.state.lora_B.shape == layer.lora_B["default"].weight.shape
        assert float(p.state.scaling) == pytest.approx(layer.scaling["default"], rel=1e-7)
        assert p.num_params == sum(q.numel() for q in layer.lora_A["default"].parameters()) + sum(
            q.numel() for q in layer.lora_B["default"].parameters())

    # the same trainable/total counts and the same printed line
    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    capsys.readouterr()
    pm.print_trainable_parameters()
    expected_line = capsys.readouterr().out
    cm.print_trainable_parameters()
    assert capsys.readouterr().out == expected_line

    # unmerged, merged, unmerged again: logits agree with a padded attention mask
    ids, mask = padded_batch()
    y_peft = logits(pm, ids, mask)
    y = logits(cm, ids, mask)
    torch.testing.assert_close(y, y_peft, atol=ATOL, rtol=0)

    cm.merge()
    pm.merge_adapter()
    assert cm.merged
    torch.testing.assert_close(logits(cm, ids, mask), logits(pm, ids, mask), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(cm, ids, mask), y, atol=ATOL, rtol=0)

    cm.unmerge()
    pm.unmerge_adapter()
    torch.testing.assert_close(logits(cm, ids, mask), logits(pm, ids, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_lora_weights_is_a_no_op_at_start(init):
    model = BUILDERS["llama"]()
    ids, mask = padded_batch()
    base = logits(model, ids, mask)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                        init_lora_weights=init)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).eval()
    cm = peftc.compile(model, config, backend="eager").eval()

    for p in cm.sites:
        assert torch.count_nonzero(p.state.lora_B) == 0, p.path
        assert torch.count_nonzero(p.state.lora_A) == p.state.lora_A.numel(), p.path
    a = torch.cat([p.state.lora_A.detach().flatten() for p in cm.sites])
    if init is True:  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for p in cm.sites:
            bound = 1 / math.sqrt(p.site.in_features)
            assert p.state.lora_A.abs().max() <= bound + 1e-7
    else:  # normal(std=1/r)
        assert 0.75 / 4 < a.std().item() < 1.25 / 4
        assert abs(a.mean().item()) < 0.05

    torch.testing.assert_close(logits(cm, ids, mask), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(pm, ids, mask), base, atol=1e-6, rtol=0)
    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_init_false_is_not_a_no_op():
    model = BUILDERS["llama"]()
    ids, mask = padded_batch()
    base = logits(model, ids, mask)
    cm = peftc.compile(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                       backend="eager").eval()
    assert all(torch.count_nonzero(p.state.lora_B) > 0 for p in cm.sites)
    assert (logits(cm, ids, mask) - base).abs().max() > 1e-4


def test_modules_to_save_classifier_matches_peft():
    model = BUILDERS["bert"]()
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                        init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).eval()
    cm = peftc.compile(model, config, backend="eager").eval()
    copy_peft_weights(cm, pm)
    original_weight = model.classifier.weight.detach().clone()
    ids, mask = padded_batch()

    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    saved = dict(cm.peftc.saved.default.named_parameters())
    assert set(saved) == {"classifier.weight", "classifier.bias"}
    assert all(p.requires_grad for p in saved.values())
    assert not model.classifier.weight.requires_grad
    before = logits(cm, ids, mask)
    torch.testing.assert_close(before, logits(pm, ids, mask), atol=ATOL, rtol=0)

    # perturb the trainable copy in both: outputs follow the copy, the original stays put
    g = torch.Generator().manual_seed(1)
    dw = torch.randn(model.classifier.weight.shape, generator=g)
    db = torch.randn(model.classifier.bias.shape, generator=g)
    psd = dict(pm.named_parameters())
    with torch.no_grad():
        saved["classifier.weight"].add_(dw)
        saved["classifier.bias"].add_(db)
        psd["base_model.model.classifier.modules_to_save.default.weight"].add_(dw)
        psd["base_model.model.classifier.modules_to_save.default.bias"].add_(db)
    after = logits(cm, ids, mask)
    torch.testing.assert_close(after, logits(pm, ids, mask), atol=ATOL, rtol=0)
    assert (after - before).abs().max() > 1e-3
    assert torch.equal(model.classifier.weight, original_weight)

    # merge: the copy's values land in the model's own classifier; unmerge restores it
    cm.merge()
    torch.testing.assert_close(model.classifier.weight, saved["classifier.weight"], atol=0, rtol=0)
    merged_peft = pm.merge_and_unload()
    torch.testing.assert_close(logits(cm, ids, mask), logits(merged_peft, ids, mask), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(model, ids, mask), after, atol=ATOL, rtol=0)
    cm.unmerge()
    assert torch.equal(model.classifier.weight, original_weight)
    torch.testing.assert_close(logits(cm, ids, mask), after, atol=ATOL, rtol=0)


def test_python_rules_match_equivalent_lora_config():
    """The README's rule form equals the LoraConfig form on the same model."""
    model = BUILDERS["llama"]()
    pm = peft.get_peft_model(copy.deepcopy(model), LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=r".*\.(q|k|v|o)_proj",
        init_lora_weights=False)).eval()
    rules = [peftc.LoRA(r=16, alpha=32, dropout=0.05).on(peftc.linear(r".*\.(q|k|v|o)_proj"))]
    cm = peftc.compile(model, rules, backend="eager").eval()
    copy_peft_weights(cm, pm)
    ids, mask = padded_batch()
    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    torch.testing.assert_close(logits(cm, ids, mask), logits(pm, ids, mask), atol=ATOL, rtol=0)
