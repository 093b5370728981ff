"""LoRA on embedding lookups, against PEFT 0.21's ``lora.Embedding``; and no target is dropped silently.

PEFT wraps a deep copy with the same ``LoraConfig`` (``init_lora_weights=False``, so neither
matrix is zero); its matrices are copied into peftc, then logits, gradients, merge and
checkpoints (both ways) are compared.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_unchanged, make_gpt2, make_llama, padded_batch, snapshot
from conftest import no_grad_logits as logits
from peft import LoraConfig, PeftModel

import peftc
from peftc.errors import RuleError

TARGETS = ["embed_tokens", "q_proj"]


def copy_from_peft(cm, pm):
    sd = pm.state_dict()
    with torch.no_grad():
        for p in cm.sites:
            prefix = f"base_model.model.{p.path}"
            for name, param in p.state.named_parameters():
                key = f"{prefix}.{name}.default" if name.startswith("lora_embedding") else f"{prefix}.{name}.default.weight"
                param.copy_(sd[key])


def build_pair(training: bool = False):
    """A tiny Llama with LoRA on embed_tokens and q_proj, by peftc and by PEFT, with PEFT's weights."""
    model = make_llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).train(training)
    cm = peftc.compile(model, config, backend="eager").train(training)
    copy_from_peft(cm, pm)
    return cm, pm


@pytest.fixture(scope="module")
def pair():
    return build_pair()


def test_sites_counts_and_logits(pair):
    cm, pm = pair
    embed = next(p for p in cm.sites if p.path == "model.embed_tokens")
    assert embed.site.kind == "embedding"
    assert embed.state.lora_embedding_A.shape == (4, 128) and embed.state.lora_embedding_B.shape == (32, 4)
    assert sorted(p.path for p in cm.sites) == sorted(
        n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    ids, mask = padded_batch()
    torch.testing.assert_close(logits(cm, ids, mask), logits(pm, ids, mask), atol=1e-5, rtol=0)


def test_merge_and_unmerge(pair):
    cm, pm = pair
    ids, mask = padded_batch()
    before = logits(cm, ids, mask)
    weight = cm.base_model.model.embed_tokens.weight.detach().clone()
    cm.merge()
    pm.merge_adapter()
    try:
        torch.testing.assert_close(cm.base_model.model.embed_tokens.weight,
                                   pm.base_model.model.model.embed_tokens.base_layer.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(logits(cm, ids, mask), before, atol=1e-5, rtol=0)
    finally:
        cm.unmerge()
        pm.unmerge_adapter()
    torch.testing.assert_close(cm.base_model.model.embed_tokens.weight, weight, atol=1e-6, rtol=0)


def test_gradients_equal_peft():
    cm, pm = build_pair(training=True)
    ids, mask = padded_batch()
    pm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    cm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    embed = next(p for p in cm.sites if p.path == "model.embed_tokens")
    layer = pm.base_model.model.model.embed_tokens
    torch.testing.assert_close(embed.state.lora_embedding_A.grad, layer.lora_embedding_A["default"].grad,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embed.state.lora_embedding_B.grad, layer.lora_embedding_B["default"].grad,
                               atol=1e-5, rtol=1e-4)


def test_checkpoints_both_ways(pair, tmp_path):
    cm, pm = pair
    ids, mask = padded_batch()
    pm.save_pretrained(tmp_path / "peft")
    cm.save_pretrained(tmp_path / "peftc")
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "peftc" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    # PEFT also saves the base embedding (for resized vocabularies); the adapter keys are the same
    assert sorted(ours) == sorted(k for k in theirs if not k.endswith(".base_layer.weight"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in ours
    # PEFT loads peftc's checkpoint, peftc loads PEFT's
    pm2 = PeftModel.from_pretrained(make_llama(), tmp_path / "peftc").eval()
    cm2 = peftc.from_pretrained(make_llama(), tmp_path / "peft", backend="eager").eval()
    expected = logits(pm, ids, mask)
    torch.testing.assert_close(logits(pm2, ids, mask), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(cm2, ids, mask), expected, atol=1e-5, rtol=0)


def test_tied_gpt2_embedding_and_head_equal_peft():
    """GPT-2 ties wte to lm_head: LoRA on wte changes the lookup only, as in PEFT."""
    model = make_gpt2()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["wte", "c_attn"], init_lora_weights=False,
                        fan_in_fan_out=True)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).eval()
    cm = peftc.compile(model, config, backend="eager").eval()
    copy_from_peft(cm, pm)
    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    ids, mask = padded_batch()
    torch.testing.assert_close(logits(cm, ids, mask), logits(pm, ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_default_init_is_a_no_op(init):
    model = make_llama()
    ids, mask = padded_batch()
    base = logits(model, ids, mask)
    cm = peftc.compile(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=init), backend="eager").eval()
    embed = next(p for p in cm.sites if p.path == "model.embed_tokens")
    assert torch.count_nonzero(embed.state.lora_embedding_A) == 0
    assert torch.count_nonzero(embed.state.lora_embedding_B) == embed.state.lora_embedding_B.numel()
    torch.testing.assert_close(logits(cm, ids, mask), base, atol=1e-6, rtol=0)


def test_native_rules_reach_embeddings():
    model = make_llama()
    cm = peftc.compile(model, [peftc.LoRA(r=2).on(peftc.input_embeddings())], backend="eager")
    assert [p.path for p in cm.sites] == ["model.embed_tokens"]


@pytest.mark.parametrize("targets", [["q_proj", "no_such_module"], ["q_proj", "input_layernorm"]])
def test_a_target_that_reaches_nothing_adaptable_raises(targets):
    model = make_llama()
    before = snapshot(model)
    with pytest.raises(RuleError, match="no_such_module|input_layernorm"):
        peftc.compile(model, LoraConfig(r=2, target_modules=targets), backend="eager")
    assert_unchanged(model, before)
