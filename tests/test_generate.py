"""cm.generate: transformers' loop through the adapted graph with a KV cache; PEFT's sequences."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import (
    VOCAB,
    assert_unchanged,
    make_bart,
    make_gpt2,
    make_llama,
    make_qwen2,
    make_t5,
    snapshot,
    two_adapter_llama,
)

import peftc
from peftc.errors import PeftcError

peft = pytest.importorskip("peft")


def make_phi3(seed: int = 0) -> torch.nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(config).eval()


BUILDERS = {"llama": make_llama, "qwen2": make_qwen2, "gpt2": make_gpt2, "phi3": make_phi3,
            "t5": make_t5, "bart": make_bart}
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
SEQ2SEQ = ("t5", "bart")


def greedy_kwargs(name: str) -> dict:
    """Greedy generation's arguments; every step runs on an encoder-decoder (a tiny random
    BART picks its end token first, which would leave the decode step untested)."""
    return {**GREEDY, "min_new_tokens": GREEDY["max_new_tokens"]} if name in SEQ2SEQ else GREEDY


def left_padded(batch: int = 3, length: int = 7, seed: int = 0):
    """Token ids (no special ids) and a mask; row 0 is left-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def peft_config(kind: str, name: str):
    task = "SEQ_2_SEQ_LM" if name in SEQ2SEQ else "CAUSAL_LM"
    if kind == "lora":
        targets = {"gpt2": ["c_attn"], "phi3": ["qkv_proj", "o_proj"], "t5": ["q", "v", "wo"]}
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets.get(name, ["q_proj", "v_proj"]),
                               init_lora_weights=False, task_type=task)
    if kind == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3)
    if kind in ("p_tuning-MLP", "p_tuning-LSTM"):
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=16,
                                        encoder_reparameterization_type=kind.split("-")[1])
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3)


def peft_and_peftc(name: str, kind: str, tmp_path):
    """PEFT's model and peftc's on the same base weights and the same adapter (saved by PEFT, loaded by peftc)."""
    model = BUILDERS[name]()
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft_config(kind, name)).eval()
    pm.save_pretrained(tmp_path)
    return pm, peftc.from_pretrained(model, tmp_path, backend="eager")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """``peft_and_peftc(name, kind)``, each pair built once for the tests that share it."""
    built = {}

    def pair(name: str, kind: str):
        if (name, kind) not in built:
            built[name, kind] = peft_and_peftc(name, kind, tmp_path_factory.mktemp(f"{name}-{kind}"))
        return built[name, kind]

    return pair


def assert_same_generation(ref, out):
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_lora_greedy_equals_peft(name, pairs):
    """Token for token, and every step's logits within 1e-5, on a left-padded batch."""
    pm, cm = pairs(name, "lora")
    ids, mask = left_padded()
    with torch.no_grad():
        ref = pm.generate(input_ids=ids, attention_mask=mask, **greedy_kwargs(name))
    assert_same_generation(ref, cm.generate(input_ids=ids, attention_mask=mask, **greedy_kwargs(name)))


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_prompt_and_prefix_greedy_equal_peft(name, kind, pairs):
    """Prompt tuning's virtual tokens lead the cache (T5: the encoder's input); prefix tuning's
    keys and values fill the cache's first positions (T5: the decoder's self-attention cache)."""
    pm, cm = pairs(name, kind)
    ids, mask = left_padded()
    with torch.no_grad():
        ref = pm.generate(input_ids=ids, attention_mask=mask, **greedy_kwargs(name))
    assert_same_generation(ref, cm.generate(input_ids=ids, attention_mask=mask, **greedy_kwargs(name)))


@pytest.mark.parametrize(("name", "encoder", "loaded"), [("t5", "MLP", True), ("bart", "LSTM", False)])
def test_p_tuning_encoder_decoder_greedy_equals_peft(name, encoder, loaded, tmp_path):
    """P-tuning on an encoder-decoder: the first n of the encoded 2n rows lead the encoder's input.
    Trained by peftc (its encoder in the graph) or loaded back from the file peftc saved (the
    table holding the encoder's output), it generates as PEFT does with that file."""
    model = BUILDERS[name]()
    torch.manual_seed(1)
    cm = peftc.compile(copy.deepcopy(model), peft_config(f"p_tuning-{encoder}", name), backend="eager").eval()
    cm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    if loaded:
        cm = peftc.from_pretrained(model, tmp_path, backend="eager")
    assert cm.sites[0].adapter.folded == loaded
    ids, mask = left_padded()
    with torch.no_grad():
        ref = pm.generate(input_ids=ids, attention_mask=mask, **greedy_kwargs(name))
        base = pm.get_base_model().generate(input_ids=ids, attention_mask=mask, **greedy_kwargs(name))
    assert max((a - b).abs().max() for a, b in zip(ref.logits, base.logits, strict=True)) > 1e-3  # it acts
    assert_same_generation(ref, cm.generate(input_ids=ids, attention_mask=mask, **greedy_kwargs(name)))


def test_beam_search_and_sampling_equal_peft(pairs):
    pm, cm = pairs("llama", "lora")
    ids, mask = left_padded(2)
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, pad_token_id=0, do_sample=False)
    with torch.no_grad():
        ref = pm.generate(input_ids=ids, attention_mask=mask, **beams)
    assert torch.equal(cm.generate(input_ids=ids, attention_mask=mask, **beams), ref)
    sampling = dict(max_new_tokens=5, do_sample=True, top_k=20, temperature=0.8, pad_token_id=0)
    torch.manual_seed(7)
    with torch.no_grad():
        ref = pm.generate(input_ids=ids, attention_mask=mask, **sampling)
    torch.manual_seed(7)
    assert torch.equal(cm.generate(input_ids=ids, attention_mask=mask, **sampling), ref)


@pytest.fixture(scope="module")
def two():
    """A Llama with LoRA "default" and "other" (LoRA + BitFit), and a copy of its base."""
    cm, base = two_adapter_llama()
    return cm, base


def greedy(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              pad_token_id=0, **kw)


def test_adapter_states(two):
    """Disabled generates as the base; set_adapter switches; merged equals unmerged."""
    cm, base = two
    ids, mask = left_padded()
    with cm.disable_adapter():
        assert torch.equal(greedy(cm, ids, mask), greedy(base, ids, mask))
    default = greedy(cm, ids, mask)
    assert not torch.equal(default, greedy(base, ids, mask))
    cm.set_adapter("other")
    try:
        other = greedy(cm, ids, mask)
        assert not torch.equal(other, default)
        cm.merge()
        try:
            assert torch.equal(greedy(cm, ids, mask), other)
        finally:
            cm.unmerge()
    finally:
        cm.set_adapter("default")
    assert torch.equal(greedy(cm, ids, mask), default)


def test_generated_tokens_sliced_back_in_run_as_a_contiguous_copy(two):
    """A slice of generate's output (not contiguous) is a valid input afterwards (export's
    guard function once failed on it)."""
    cm, _ = two
    ids, mask = left_padded()
    tail = greedy(cm, ids, mask)[:, 2:9]
    assert not tail.is_contiguous()
    with torch.no_grad():
        sliced = cm(input_ids=tail, attention_mask=torch.ones_like(tail)).logits
        copied = cm(input_ids=tail.contiguous(), attention_mask=torch.ones_like(tail)).logits
    assert torch.equal(sliced, copied)


def test_mixed_batch_rows_equal_each_alone(two):
    cm, base = two
    ids, mask = left_padded(3)
    names = ["other", "__base__", "default"]
    mixed = greedy(cm, ids, mask, adapter_names=names)
    for row, name in enumerate(names):
        alone = greedy(base, ids[row:row + 1], mask[row:row + 1]) if name == "__base__" else None
        if alone is None:
            cm.set_adapter(name)
            alone = greedy(cm, ids[row:row + 1], mask[row:row + 1])
        assert torch.equal(mixed[row], alone[0]), name
    cm.set_adapter("default")
    beams = greedy(cm, ids, mask, adapter_names=names, num_beams=2)  # rows repeat per beam
    assert beams.shape[0] == 3


def test_traced_and_compiled_once_per_step_kind():
    """One prefill and one decode program; no step, adapter switch or new length compiles again."""
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    cm = peftc.compile(make_llama(), [peftc.LoRA(r=4).on(peftc.linear(r".*\.(q|v)_proj"))], backend=counting)
    cm.add_adapter("b", [peftc.LoRA(r=2).on(peftc.linear(r".*\.(q|v)_proj"))])
    cm.eval()
    ids, mask = left_padded(2, 6)
    greedy(cm, ids, mask)
    programs, compiled = len(cm.programs), len(compiles)
    assert programs == 2 and compiled == 2
    cm.set_adapter("b")
    greedy(cm, ids, mask)
    greedy(cm, ids[:, 1:], mask[:, 1:])  # another prompt length
    with torch.no_grad():
        cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    assert (len(cm.programs), len(compiles)) == (programs, compiled)


def test_bad_input_leaves_state(two, tmp_path):
    cm, _ = two
    before = snapshot(cm)
    ids, mask = left_padded(2)
    cases = [
        (dict(max_new_tokens=200), "positions"),
        (dict(adapter_names=["default", "nope"]), "nope"),
        (dict(adapter_names=["default"]), "adapter_names"),
        (dict(past_key_values=object()), "past_key_values"),
    ]
    for kwargs, word in cases:
        with pytest.raises(PeftcError, match=word):
            cm.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, **{"max_new_tokens": 3, **kwargs})
    assert cm.active_adapters == ["default"]
    assert_unchanged(cm, before)
    cm.merge()
    try:
        before = snapshot(cm)
        with pytest.raises(PeftcError, match="merged"):
            cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, adapter_names=["default", "other"])
        assert cm.merged
        assert_unchanged(cm, before)
    finally:
        cm.unmerge()


def test_prompt_counts_virtual_tokens_against_positions():
    cm = peftc.compile(make_llama(), [peftc.Prompt(10)], backend="eager")
    ids, mask = left_padded(1, 20)
    with pytest.raises(PeftcError, match="10 virtual tokens"):
        cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0)
    with pytest.raises(PeftcError, match="prompt adapter"):
        cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, past_key_values=object())


def test_calling_the_base_model_directly_warns(two):
    """The silent trap: the user's own model object runs without the adapters; say so."""
    cm, base = two
    ids, mask = left_padded(1)
    with pytest.warns(UserWarning, match="cm.generate"):
        cm.base_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
        cm(input_ids=ids)
        with cm.disable_adapter():
            cm.base_model(input_ids=ids)  # nothing active: the base model is right


def test_an_adapter_mixing_prompt_and_lora_generates_as_its_forward():
    """Cache slots are counted per rule, so a prompt sharing its adapter with LoRA still leads
    the cache; greedy tokens equal an argmax loop over the uncached forward."""
    rules = [peftc.Prompt(3), peftc.LoRA(r=4, init=False).on(peftc.linear(r".*\.(q|v)_proj"))]
    cm = peftc.compile(make_llama(), rules, backend="eager")
    ids = left_padded(2, 6)[0][:, 3:].contiguous()  # no padding
    out = greedy(cm, ids, torch.ones_like(ids))
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            logits = cm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
