"""LoraConfig without target_modules: the same sites, counts and logits as PEFT 0.21, on many
architectures; PEFT's missing model types fall back to the attention blocks, with a warning.

Each model is built from a tiny config with random weights. PEFT wraps a deep copy
(``init_lora_weights=False``, so B is not zero), peftc compiles the original with the same
config, and PEFT's LoRA matrices are copied into peftc before the logits are compared.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers
from conftest import VOCAB, copy_peft_weights, padded_batch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

import peftc
from peftc.default_targets import LORA, attention_blocks
from peftc.errors import RuleError

_TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                decoder_start_token_id=1)
# model_type -> (config overrides, transformers Auto class)
MODELS = {
    "llama": ({}, "AutoModelForCausalLM"),
    "mistral": ({"num_key_value_heads": 2}, "AutoModelForCausalLM"),
    "mixtral": ({"num_key_value_heads": 2, "num_local_experts": 2, "num_experts_per_tok": 1}, "AutoModelForCausalLM"),
    "qwen2": ({"num_key_value_heads": 2}, "AutoModelForCausalLM"),
    "qwen3": ({"head_dim": 8, "num_key_value_heads": 2}, "AutoModelForCausalLM"),
    "gemma": ({"head_dim": 8, "num_key_value_heads": 2}, "AutoModelForCausalLM"),
    "gemma2": ({"head_dim": 8, "num_key_value_heads": 2}, "AutoModelForCausalLM"),
    "gemma3_text": ({"head_dim": 8, "num_key_value_heads": 2}, "AutoModelForCausalLM"),
    "phi": ({}, "AutoModelForCausalLM"),
    "stablelm": ({"num_key_value_heads": 2}, "AutoModelForCausalLM"),
    "opt": ({"ffn_dim": 64, "word_embed_proj_dim": 32}, "AutoModelForCausalLM"),
    "gptj": ({"rotary_dim": 4}, "AutoModelForCausalLM"),
    "gpt_neo": ({"attention_types": [[["global", "local"], 1]], "num_hidden_layers": 2},
                "AutoModelForCausalLM"),
    "gpt_neox": ({}, "AutoModelForCausalLM"),
    "falcon": ({}, "AutoModelForCausalLM"),
    "bloom": ({}, "AutoModelForCausalLM"),
    "gpt2": ({}, "AutoModelForCausalLM"),
    "gpt_bigcode": ({}, "AutoModelForCausalLM"),
    "codegen": ({"rotary_dim": 4, "n_ctx": 64}, "AutoModelForCausalLM"),
    "bert": ({}, "AutoModel"),
    "roberta": ({"max_position_embeddings": 80}, "AutoModel"),
    "electra": ({"embedding_size": 32}, "AutoModel"),
    "deberta-v2": ({}, "AutoModel"),
    "deberta": ({}, "AutoModel"),
    "t5": ({**_SEQ2SEQ, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4}, "AutoModelForSeq2SeqLM"),
    "bart": ({**_SEQ2SEQ, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
              "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64},
             "AutoModelForSeq2SeqLM"),
}
# Model types PEFT 0.21 has no default for, and the linear modules of their attention blocks,
# written out by hand from the modelling code.
FALLBACK = {
    "olmo": ({}, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "persimmon": ({}, ["query_key_value", "dense"]),
    "starcoder2": ({"num_key_value_heads": 2}, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def build(model_type: str, overrides: dict, auto: str = "AutoModelForCausalLM"):
    config = transformers.AutoConfig.for_model(model_type, **{**_TINY, **overrides})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, auto).from_config(config).eval()


def batch(model) -> dict:
    ids, mask = padded_batch()
    out = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        out["decoder_input_ids"] = ids[:, :5].clone()
    return out


def peft_sites(pm) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer))


def compare(model, config: LoraConfig, peft_config: LoraConfig | None = None):
    """Compile ``model`` with peftc (``config``) and PEFT (``peft_config``, default the same);
    check sites, counts and logits agree."""
    inputs = batch(model)
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(peft_config or config)).eval()
    cm = peftc.compile(model, config, example_inputs=inputs, backend="eager").eval()
    assert sorted(p.path for p in cm.sites) == peft_sites(pm)
    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    copy_peft_weights(cm, pm)
    with torch.no_grad():
        expected, got = pm(**inputs), cm(**inputs)
    key = "logits" if "logits" in expected else "last_hidden_state"
    torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)
    return cm, pm


# PEFT 0.21 refuses its own default on these: its transformers-v5 MoE conversion turns the
# missing target_modules into an empty set before the default is looked up. peftc uses the
# table's entry, checked against PEFT given that entry explicitly.
PEFT_REFUSES_DEFAULT = {"mixtral"}


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_default_targets_equal_peft(model_type):
    overrides, auto = MODELS[model_type]
    model = build(model_type, overrides, auto)
    assert model.config.model_type == model_type
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False)
    reference = None
    if model_type in PEFT_REFUSES_DEFAULT:
        with pytest.raises(ValueError, match="target_modules"):
            peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
        reference = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=list(LORA[model_type]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a type PEFT knows gets no fallback warning
        warnings.filterwarnings("ignore", ".*fan_in_fan_out.*")
        compare(model, config, reference)


def test_table_holds_every_model_type_peft_has():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TABLE,
    )

    assert set(LORA) == set(PEFT_TABLE)
    for model_type, targets in PEFT_TABLE.items():
        assert (LORA[model_type] == targets) if isinstance(targets, str) else (list(LORA[model_type]) == targets)


@pytest.mark.parametrize("model_type", sorted(FALLBACK))
def test_missing_model_type_falls_back_to_attention_blocks(model_type):
    overrides, names = FALLBACK[model_type]
    model = build(model_type, overrides)
    assert model_type not in LORA
    with pytest.raises(ValueError, match="target_modules"):  # PEFT refuses the config
        peft.get_peft_model(copy.deepcopy(model), LoraConfig(r=2))
    blocks = attention_blocks(model)
    with pytest.warns(UserWarning, match=rf"no default for model type '{model_type}'.*{len(blocks)} attention blocks"):
        cm = peftc.compile(model, LoraConfig(r=2, lora_alpha=4), backend="eager")
    # what peftc chose is exactly PEFT with the attention blocks' linear modules named
    reference = build(model_type, overrides)
    pm = peft.get_peft_model(reference, LoraConfig(r=2, lora_alpha=4, target_modules=names))
    assert sorted(p.path for p in cm.sites) == peft_sites(pm)
    assert all(any(p.path.startswith(b + ".") for b in blocks) for p in cm.sites)
    assert cm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_no_default_and_no_attention_blocks_is_a_rule_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(RuleError, match="no attention blocks.*set target_modules"):
        peftc.compile(model, LoraConfig(r=2), example_inputs=torch.randn(2, 4), backend="eager")
