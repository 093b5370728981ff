"""PEFT checkpoints both ways: peftc loads PEFT's adapters and PEFT loads peftc's."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import BUILDERS, assert_unchanged, make_gpt2, make_llama, padded_batch, snapshot
from safetensors.torch import load_file

import peftc
from peftc.testing import assert_roundtrip
from peftc.testing.strategies import TinyMLP

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value"]}


def _config(kind: str, name: str):
    task = "SEQ_CLS" if name == "bert" else "CAUSAL_LM"
    if kind == "lora":
        first = TARGETS[name][0]
        return peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=TARGETS[name],
                               rank_pattern={first: 2}, alpha_pattern={first: 3}, init_lora_weights=False)
    if kind == "rslora":
        return peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=TARGETS[name],
                               use_rslora=True, init_lora_weights=False)
    if kind == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3)
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3, prefix_projection=True,
                                   encoder_hidden_size=16)


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", ["lora", "rslora", "prompt", "prefix"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_roundtrip_both_ways(name, kind, tmp_path):
    model = BUILDERS[name]()
    pm = peft.get_peft_model(copy.deepcopy(model), _config(kind, name))
    with torch.no_grad():  # a trained-looking classifier copy, where there is one
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.25)
    pm.save_pretrained(tmp_path / "from_peft")
    pm.eval()
    ids, mask = padded_batch(3, 8)

    cm = peftc.from_pretrained(copy.deepcopy(model), tmp_path / "from_peft", backend="eager")
    assert not cm.training and not any(p.requires_grad for p in cm.parameters())
    torch.testing.assert_close(_logits(cm, ids, mask), _logits(pm, ids, mask), atol=1e-5, rtol=0)

    cm.save_pretrained(tmp_path / "from_peftc")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "from_peftc").eval()
    torch.testing.assert_close(_logits(back, ids, mask), _logits(cm, ids, mask), atol=1e-5, rtol=0)
    theirs = load_file(tmp_path / "from_peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "from_peftc" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs), "same tensor keys as PEFT writes"


def test_trainable_load_and_only_adapter_state_written(tmp_path):
    cm = peftc.compile(make_llama(), [peftc.LoRA(r=2).on(peftc.linear(r".*q_proj"))], backend="eager")
    cm.add_adapter("second", [peftc.LoRA(r=3).on(peftc.linear(r".*v_proj"))])
    cm.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert (tmp_path / "second" / "adapter_config.json").is_file(), "non-default adapters go in subfolders"
    config = json.loads((tmp_path / "second" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["peft_type"] == "LORA"
    loaded = peftc.from_pretrained(make_llama(), tmp_path / "second", is_trainable=True,
                                   adapter_name="second", backend="eager")
    assert loaded.active_adapters == ["second"]
    trainable, _ = loaded.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in loaded.peftc.adapters.second.parameters()) > 0


def test_roundtrip_of_a_layer_that_adds_its_bias_itself():
    """``x @ W + b`` (the bias added after the matmul, not an operand of it): save_pretrained then
    from_pretrained gives back the same adapter state and outputs (a bug the testing kit found)."""
    model = TinyMLP([3, 4], ["matmul"], [True])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert_roundtrip(model, [peftc.LoRA(r=2, init=False).on(peftc.linear())], (x,))


def test_bad_checkpoints(tmp_path):
    llama_dir = tmp_path / "llama"
    peft.get_peft_model(make_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(llama_dir)
    model = make_gpt2()
    before = snapshot(model)
    with pytest.raises(peftc.PeftcError, match="doesn't fit GPT2LMHeadModel"):
        peftc.from_pretrained(model, llama_dir, backend="eager")
    assert_unchanged(model, before)

    wider = make_llama(hidden_size=64)  # same names, other shapes
    with pytest.raises(peftc.PeftcError, match="wrong shape"):
        peftc.from_pretrained(wider, llama_dir, backend="eager")

    with pytest.raises(peftc.PeftcError, match="does not exist"):
        peftc.from_pretrained(make_llama(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(peftc.PeftcError, match="adapter_config.json"):
        peftc.from_pretrained(make_llama(), tmp_path / "empty")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((llama_dir / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(peftc.PeftcError, match="corrupt"):
        peftc.from_pretrained(make_llama(), corrupt, backend="eager")
    (corrupt / "adapter_config.json").write_text("{not json")
    with pytest.raises(peftc.PeftcError, match="JSON"):
        peftc.from_pretrained(make_llama(), corrupt, backend="eager")

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "adapter_config.json").write_text(json.dumps({"peft_type": "BOFT", "r": 4}))
    (unknown / "adapter_model.safetensors").write_bytes((llama_dir / "adapter_model.safetensors").read_bytes())
    with pytest.raises(peftc.PeftcError, match="BOFT"):
        peftc.from_pretrained(make_llama(), unknown, backend="eager")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((llama_dir / "adapter_config.json").read_text())
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(peftc.PeftcError, match="safetensors only"):
        peftc.from_pretrained(make_llama(), pickled, backend="eager")
