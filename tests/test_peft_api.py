"""PEFT's API as a drop-in: get_peft_model, PeftModel.from_pretrained, AutoPeftModel*, load_adapter,
and the PeftModel attributes third-party code reads. PEFT 0.21 with the same weights is the oracle."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    assert_unchanged,
    copy_peft_weights,
    make_gpt2,
    make_llama,
    padded_batch,
    snapshot,
)

import peftc

peft = pytest.importorskip("peft")

LORA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
IDS, MASK = padded_batch(2, 7)


def _logits(model):
    return model(input_ids=IDS, attention_mask=MASK).logits


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory):
    """A PEFT LoRA model on a tiny Llama, its logits, and its adapter saved by PEFT."""
    model = make_llama()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA)).eval()
    folder = tmp_path_factory.mktemp("peft_lora")
    pm.save_pretrained(folder)
    with torch.no_grad():
        logits = _logits(pm)
    return model, pm, folder, logits


def test_get_peft_model_equals_peft(peft_lora):
    model, pm, _, logits = peft_lora
    cm = peftc.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA), backend="eager").eval()
    assert isinstance(cm, peftc.PeftModel)
    copy_peft_weights(cm, pm)
    with torch.no_grad():
        torch.testing.assert_close(_logits(cm), logits, atol=1e-5, rtol=0)


def test_peftmodel_from_pretrained_loads_peft_s_adapter(peft_lora):
    model, _, folder, logits = peft_lora
    cm = peftc.PeftModel.from_pretrained(copy.deepcopy(model), folder, backend="eager")
    assert not cm.training and not any(p.requires_grad for p in cm.parameters())
    with torch.no_grad():
        torch.testing.assert_close(_logits(cm), logits, atol=1e-5, rtol=0)


def test_load_adapter_loads_weights_inactive_and_frozen(peft_lora):
    model, _, folder, logits = peft_lora
    cm = peftc.compile(copy.deepcopy(model), [peftc.BitFit().on(peftc.linear(r".*o_proj"))], backend="eager")
    cm.load_adapter(folder, "loaded")
    assert cm.adapters == ["default", "loaded"] and cm.active_adapters == ["default"]
    cm.set_adapter("loaded")
    cm.train()
    assert not any(p.requires_grad for p in cm.peftc.adapters.loaded.parameters())
    cm.eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(cm), logits, atol=1e-5, rtol=0)
    cm.load_adapter(folder, "trains", is_trainable=True)
    cm.set_adapter("trains")
    cm.train()
    assert all(p.requires_grad for p in cm.peftc.adapters.trains.parameters())


def test_add_adapter_from_a_saved_folder_loads_its_weights(peft_lora):
    model, _, folder, logits = peft_lora
    cm = peftc.compile(copy.deepcopy(model), [peftc.LoRA(r=2).on(peftc.linear(r".*k_proj"))], backend="eager")
    cm.add_adapter("saved", str(folder))
    cm.set_adapter("saved")
    with torch.no_grad():
        torch.testing.assert_close(_logits(cm.eval()), logits, atol=1e-5, rtol=0)


def test_load_adapter_for_another_model_names_the_misfit_and_changes_nothing(tmp_path):
    gpt2 = peftc.compile(make_gpt2(), [peftc.LoRA(r=2).on(peftc.linear(r".*c_attn"))], backend="eager")
    gpt2.save_pretrained(tmp_path)
    cm = peftc.compile(make_llama(), [peftc.LoRA(r=2).on(peftc.linear(r".*q_proj"))], backend="eager")
    before, state = snapshot(cm), (cm.adapters, cm.active_adapters, len(cm.sites))
    with pytest.raises(peftc.PeftcError, match="doesn't fit LlamaForCausalLM"):
        cm.load_adapter(tmp_path, "gpt2")
    assert_unchanged(cm, before)
    assert (cm.adapters, cm.active_adapters, len(cm.sites)) == state


def test_auto_peft_model_builds_the_base_from_the_config(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)  # config._name_or_path is base_dir
    cm = peftc.compile(model, [peftc.LoRA(r=2, init=False).on(peftc.linear(r".*v_proj"))], backend="eager")
    cm.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    with torch.no_grad():
        expected = _logits(cm.eval())
    for cls in (peftc.AutoPeftModelForCausalLM, peftc.AutoPeftModel):
        loaded = cls.from_pretrained(adapter_dir, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(_logits(loaded), expected, atol=0, rtol=0)
    with pytest.raises(peftc.PeftcError, match="task_type"):
        peftc.AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir, backend="eager")


def test_peftmodel_attributes(peft_lora):
    model, pm, _, logits = peft_lora
    model = copy.deepcopy(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cm = peftc.get_peft_model(model, peft.LoraConfig(**LORA), backend="eager").eval()
    copy_peft_weights(cm, pm)
    config = cm.peft_config["default"]
    theirs = peft.PeftConfig.from_peft_type(**config)
    assert isinstance(theirs, peft.LoraConfig) and theirs.r == 4 and set(theirs.target_modules) == {
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    assert cm.active_adapter == "default" and cm.get_base_model() is model
    assert cm.config is model.config and cm.generation_config is model.generation_config
    assert cm.device == torch.device("cpu") and cm.dtype == torch.float32
    assert cm.get_input_embeddings() is model.get_input_embeddings()
    with torch.no_grad():
        cm.disable_adapter_layers()
        torch.testing.assert_close(_logits(cm), _logits(model), atol=0, rtol=0)
        cm.enable_adapter_layers()
        torch.testing.assert_close(_logits(cm), logits, atol=1e-5, rtol=0)
        cm.merge_adapter()
        assert cm.merged
        torch.testing.assert_close(_logits(cm), logits, atol=1e-5, rtol=0)
        cm.unmerge_adapter()
    assert cm.unload() is model
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)


def test_a_text_initialised_prompt_adapter_loads_without_a_tokenizer(tmp_path):
    """Loading needs the saved embeddings only: no tokenizer is built, and nothing the
    config names (trust_remote_code included) is honoured."""
    cm = peftc.compile(make_llama(), [peftc.Prompt(3)], backend="eager").eval()
    cm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello",
                  tokenizer_name_or_path=str(tmp_path / "no-such-tokenizer"),
                  tokenizer_kwargs={"trust_remote_code": True})
    path.write_text(json.dumps(config))
    loaded = peftc.from_pretrained(make_llama(), tmp_path, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded), _logits(cm), atol=0, rtol=0)
