"""LoRA on mixture-of-experts models restructured by transformers 5 (Mixtral, Qwen3-MoE), against PEFT 0.21.

PEFT renames old target names into parameter targets there (``gate`` -> ``gate.weight``, the
router); peftc adapts the router as the linear op it is, with the same sites, counts, logits
and checkpoints. Fused 3-D expert weights: tests/test_moe_experts.py.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers
from conftest import VOCAB, copy_peft_weights, padded_batch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer

import peftc
from peftc.errors import RuleError

MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
}


def build(model_type: str):
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **MOE[model_type])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def logits(model):
    ids, mask = padded_batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module", params=sorted(MOE))
def model_type(request):
    return request.param


@pytest.mark.parametrize("targets", [["q_proj", "gate"], r".*layers\.0\.(self_attn\.q_proj|mlp\.gate)"])
def test_router_targets_equal_peft(model_type, targets, tmp_path):
    model = build(model_type)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config)).eval()
    cm = peftc.compile(model, config, backend="eager").eval()
    peft_paths = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer))
    # PEFT turns even a layer-0 regex into leaf names, so every layer's router and q_proj is adapted
    assert sorted(p.path for p in cm.sites) == peft_paths
    assert {p.path for p in cm.sites} >= {"model.layers.1.mlp.gate", "model.layers.0.mlp.gate"}
    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    copy_peft_weights(cm, pm)
    torch.testing.assert_close(logits(cm), logits(pm), atol=1e-5, rtol=0)
    cm.merge()
    torch.testing.assert_close(logits(cm), logits(pm), atol=1e-5, rtol=0)
    cm.unmerge()
    assert_checkpoints_both_ways(model_type, pm, cm, tmp_path)


def assert_checkpoints_both_ways(model_type: str, pm, cm, tmp_path) -> None:
    """PEFT loads peftc's checkpoint and peftc loads PEFT's (whose config carries target_parameters),
    each onto a fresh model, giving ``pm``'s logits."""
    pm.save_pretrained(tmp_path / "peft")
    cm.save_pretrained(tmp_path / "peftc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm2 = PeftModel.from_pretrained(build(model_type), tmp_path / "peftc").eval()
    cm2 = peftc.from_pretrained(build(model_type), tmp_path / "peft", backend="eager").eval()
    torch.testing.assert_close(logits(pm2), logits(pm), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(cm2), logits(pm), atol=1e-5, rtol=0)


def test_half_of_a_fused_pair_is_refused():
    model = build("mixtral")
    with pytest.raises(ValueError, match="without also targeting"):  # PEFT refuses it too
        peft.get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "w1"]))
    with pytest.raises(RuleError, match=r"names \['w1'\] but not \['w3'\]"):
        peftc.compile(model, LoraConfig(r=2, target_modules=["q_proj", "w1"]), backend="eager")


def test_router_with_dropout_is_refused_as_by_peft():
    model = build("mixtral")
    config = LoraConfig(r=2, target_modules=["q_proj", "gate"], lora_dropout=0.1)
    with pytest.raises(ValueError, match="lora_dropout"):
        peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    with pytest.raises(RuleError, match="lora_dropout"):
        peftc.compile(model, config, backend="eager")
