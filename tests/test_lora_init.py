"""LoRA's PiSSA and OLoRA inits (``init_lora_weights="pissa"``, ``"pissa_niter_K"``, ``"olora"``)
against PEFT 0.21 on the same weights.

These inits start A and B from the weight and leave the base the residual
``W - scaling * B A``; PEFT does the same on its copy of the model, so the
factors, the residual weights and the logits are compared directly. Loading a
saved adapter onto the original model redoes the residual, in PEFT and in peftc.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import BUILDERS, assert_unchanged, padded_batch, snapshot
from conftest import no_grad_logits as logits
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import peftc

ATOL = 1e-5
PREFIX = "base_model.model."
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def config_for(arch: str, init, **kwargs) -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS[arch],
                      fan_in_fan_out=arch == "gpt2", **kwargs)


def train_b(pm, cm, seed: int = 1) -> None:
    """Stand-in for training: the same random step on B in both models."""
    g = torch.Generator().manual_seed(seed)
    sd = pm.state_dict()
    with torch.no_grad():
        for p in cm.sites:
            step = 0.05 * torch.randn(p.state.lora_B.shape, generator=g)
            p.state.lora_B.add_(step)
            sd[f"{PREFIX}{p.path}.lora_B.default.weight"].add_(step)


CASES = [
    pytest.param("llama", "pissa", {}, id="llama-pissa"),
    pytest.param("llama", "pissa", dict(use_rslora=True, rank_pattern={"down_proj": 2}), id="llama-pissa-rslora"),
    pytest.param("gpt2", "pissa", {}, id="gpt2-pissa-conv1d"),
    pytest.param("llama", "olora", {}, id="llama-olora"),
]


@pytest.mark.parametrize(("arch", "init", "kwargs"), CASES)
def test_parity_with_peft(arch, init, kwargs, capsys):
    model = BUILDERS[arch]()
    ids, mask = padded_batch()
    before = logits(model, ids, mask)
    config = config_for(arch, init, **kwargs)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).eval()
    cm = peftc.compile(model, config, backend="eager").eval()
    theirs = pm.state_dict()
    for p in cm.sites:  # the same factors, and the same residual base weight
        key = f"{PREFIX}{p.path}."
        torch.testing.assert_close(p.state.lora_A.detach(), theirs[key + "lora_A.default.weight"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(p.state.lora_B.detach(), theirs[key + "lora_B.default.weight"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model.get_parameter(p.site.weight_path).detach(),
                                   theirs[key + "base_layer.weight"], atol=1e-6, rtol=1e-5)
    # the init leaves the model's function as it was; the base alone is now the residual
    torch.testing.assert_close(logits(cm, ids, mask), before, atol=ATOL, rtol=0)
    with cm.disable_adapter():
        assert (logits(cm, ids, mask) - before).abs().max() > 10 * ATOL

    cm.print_trainable_parameters()
    pm.print_trainable_parameters()
    ours, peft_line = capsys.readouterr().out.strip().splitlines()
    assert ours == peft_line

    train_b(pm, cm)
    want = logits(pm, ids, mask)
    torch.testing.assert_close(logits(cm, ids, mask), want, atol=ATOL, rtol=0)
    cm.merge()
    torch.testing.assert_close(logits(cm, ids, mask), logits(pm.merge_and_unload(), ids, mask), atol=ATOL, rtol=0)


def test_pissa_niter_is_a_residual_split_near_the_best_rank_r():
    # svd_lowrank is random (PEFT draws A and B's default init from the generator first, so the same
    # seed gives other draws): check what the init promises instead, for peftc and PEFT alike
    model = BUILDERS["llama"]()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = config_for("llama", "pissa_niter_8")
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    cm = peftc.compile(model, config, backend="eager")
    theirs = pm.state_dict()
    for p in cm.sites:
        w = original[p.site.weight_path]
        best = torch.linalg.svdvals(w)[4:].square().sum().sqrt()  # the error of the best rank-4 approximation
        for a, b, residual in (
            (p.state.lora_A.detach(), p.state.lora_B.detach(), model.get_parameter(p.site.weight_path).detach()),
            (theirs[f"{PREFIX}{p.path}.lora_A.default.weight"], theirs[f"{PREFIX}{p.path}.lora_B.default.weight"],
             theirs[f"{PREFIX}{p.path}.base_layer.weight"]),
        ):
            low_rank = float(p.state.scaling) * b @ a
            torch.testing.assert_close(residual + low_rank, w, atol=1e-5, rtol=0)
            assert torch.linalg.matrix_norm(w - low_rank) <= 1.05 * best


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_checkpoints_both_ways(init, tmp_path):
    model = BUILDERS["llama"]()
    config = config_for("llama", init)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).eval()
    cm = peftc.compile(model, config, backend="eager").eval()
    train_b(pm, cm)
    ids, mask = padded_batch()
    want = logits(pm, ids, mask)

    # saved as PEFT saves it: the init stays in the config, and loading onto the original
    # model redoes the residual before the trained factors load
    cm.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == init
    loaded = peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, ids, mask), want, atol=ATOL, rtol=0)

    pm.save_pretrained(tmp_path / "theirs")
    ours = peftc.from_pretrained(BUILDERS["llama"](), tmp_path / "theirs", backend="eager").eval()
    torch.testing.assert_close(logits(ours, ids, mask), want, atol=ATOL, rtol=0)
    for p in ours.sites:
        torch.testing.assert_close(ours.base_model.get_parameter(p.site.weight_path).detach(),
                                   model.get_parameter(p.site.weight_path).detach(), atol=1e-6, rtol=1e-5)


def test_a_failed_load_leaves_the_weights_as_they_were(tmp_path):
    config = config_for("llama", "pissa")
    pm = peft.get_peft_model(BUILDERS["llama"](), copy.deepcopy(config))
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    last = sorted(tensors)[-1]
    tensors[last] = tensors[last][:, :1].contiguous()  # a shape that doesn't fit: found after the residual
    save_file(tensors, tmp_path / "adapter_model.safetensors")

    model = BUILDERS["llama"]()
    before = snapshot(model)
    with pytest.raises(peftc.PeftcError):
        peftc.from_pretrained(model, tmp_path, backend="eager")
    assert_unchanged(model, before)

    cm = peftc.compile(model, [peftc.LoRA().on(peftc.linear(r".*o_proj"))], backend="eager")
    before = snapshot(model)
    with pytest.raises(peftc.PeftcError):
        cm.load_adapter(tmp_path, "pissa")
    assert_unchanged(model, before)
    assert cm.adapters == ["default"]


@pytest.mark.parametrize(("arch", "init", "kwargs", "match"), [
    ("gpt2", "olora", {}, "stored \\[in, out\\]"),
    ("llama", "pissa", dict(target_modules=["q_proj", "embed_tokens"]), "not an embedding"),
    ("llama", "pissa", dict(r=64), "exceeds"),
    ("llama", "pissa_niter_2", dict(r=64), "exceeds"),
    ("llama", "pissa_niter_x", {}, "init_lora_weights='pissa_niter_x'"),
    ("llama", "corda", {}, "init_lora_weights='corda'"),
])
def test_bad_inits_are_rule_errors_and_change_nothing(arch, init, kwargs, match):
    model = BUILDERS[arch]()
    before = snapshot(model)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "init_lora_weights": init,
              "target_modules": TARGETS[arch], "fan_in_fan_out": arch == "gpt2", **kwargs}
    with pytest.raises(peftc.RuleError, match=match):
        peftc.compile(model, config, backend="eager")
    assert_unchanged(model, before)


def test_native_constructor_and_add_adapter():
    model = BUILDERS["llama"]()
    ids, mask = padded_batch()
    before = logits(model, ids, mask)
    cm = peftc.compile(model, [peftc.LoRA(init=True).on(peftc.linear(r".*k_proj"))], backend="eager")
    cm.add_adapter("pissa", [peftc.LoRA(r=2, init="pissa").on(peftc.linear(r".*q_proj"))])
    assert cm.sites[-1].adapter.changes_base
    with cm.disable_adapter():
        assert (logits(cm, ids, mask) - before).abs().max() > 10 * ATOL
    cm.set_adapter("pissa")
    torch.testing.assert_close(logits(cm, ids, mask), before, atol=ATOL, rtol=0)
    with pytest.raises(peftc.RuleError, match="init='pissa_niter_'"):
        peftc.LoRA(init="pissa_niter_")
    cm.set_adapter("default")
    cm.merge()
    merged = snapshot(model)
    with pytest.raises(peftc.MergeError, match="unmerge\\(\\) before adding it"):
        cm.add_adapter("olora", [peftc.LoRA(r=2, init="olora").on(peftc.linear(r".*v_proj"))])
    assert_unchanged(model, merged)
    assert cm.adapters == ["default", "pissa"]


def test_conversion_to_plain_lora_matches_peft(tmp_path):
    model = BUILDERS["llama"]()
    config = config_for("llama", "pissa")
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).eval()
    cm = peftc.compile(model, config, backend="eager").eval()
    cm.save_pretrained(tmp_path / "ours-init")  # right after init, as PEFT's recipe does
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "theirs-init")
    train_b(pm, cm)
    ids, mask = padded_batch()
    want = logits(cm, ids, mask)

    cm.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours-init")
    pm.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "theirs-init"))
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert (ours["r"], ours["lora_alpha"], ours["init_lora_weights"]) == (theirs["r"], theirs["lora_alpha"], True)
    ours_t, theirs_t = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert ours_t.keys() == theirs_t.keys()
    for key, value in theirs_t.items():
        torch.testing.assert_close(ours_t[key], value, atol=1e-6, rtol=1e-5)

    # a plain LoRA for the original model: PEFT and peftc load it there and get the trained model
    loaded = peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, ids, mask), want, atol=ATOL, rtol=0)
    again = peftc.from_pretrained(BUILDERS["llama"](), tmp_path / "ours", backend="eager").eval()
    torch.testing.assert_close(logits(again, ids, mask), want, atol=ATOL, rtol=0)

    plain = peftc.compile(BUILDERS["llama"](), [peftc.LoRA().on(peftc.linear(r".*q_proj"))], backend="eager")
    with pytest.raises(peftc.PeftcError, match="PiSSA or OLoRA"):
        plain.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "ours-init")
    with pytest.raises(peftc.PeftcError, match="before training"):
        cm.save_pretrained(tmp_path / "bad", path_initial_model_for_weight_conversion=tmp_path / "ours")
