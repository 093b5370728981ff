"""P-tuning (PEFT's PromptEncoderConfig): PEFT's numbers, counts and files, both ways; training,
adapters, generation, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    BUILDERS,
    assert_counts_like_peft,
    assert_greedy_like_peft,
    assert_seq2seq_like_peft,
    assert_unchanged,
    make_bart,
    make_llama,
    make_t5,
    padded_batch,
    seq2seq_batch,
    snapshot,
)
from safetensors.torch import load_file

import peftc

peft = pytest.importorskip("peft")

_BUILDERS = {**BUILDERS, "t5": make_t5, "bart": make_bart}
_TASKS = {"bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM"}


def _config(encoder: str, name: str = "llama", **kw):
    return peft.PromptEncoderConfig(task_type=_TASKS.get(name, "CAUSAL_LM"), num_virtual_tokens=4, encoder_hidden_size=16,
                                    encoder_reparameterization_type=encoder, **kw)


def _pair(encoder: str, name: str = "llama", **kw):
    """PEFT's P-tuning model and peftc's, with PEFT's encoder weights copied into peftc's."""
    model = _BUILDERS[name]()
    pm = peft.get_peft_model(copy.deepcopy(model), _config(encoder, name, **kw)).eval()
    cm = peftc.compile(model, _config(encoder, name, **kw), backend="eager").eval()
    theirs = pm.prompt_encoder["default"].state_dict()
    ours = dict(cm.sites[0].state.named_parameters())
    assert sorted(ours) == sorted("embedding" if k == "embedding.weight" else k for k in theirs), "PEFT's encoder"
    with torch.no_grad():
        for n, p in ours.items():
            p.copy_(theirs["embedding.weight" if n == "embedding" else n])
        for n, p in pm.named_parameters():  # a trained-looking classifier copy, where there is one
            if "modules_to_save" in n:
                p.add_(0.25)
        saved = peft.get_peft_model_state_dict(pm)
        for n, p in cm.peftc.saved.default.named_parameters() if "default" in cm.peftc.saved else ():
            p.copy_(saved[f"base_model.{n}"])
    return pm, cm


def _labels(name, ids):
    return torch.arange(ids.shape[0]) % 3 if name == "bert" else ids


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_matches_peft(encoder, name, capsys):
    """Same encoder weights -> same logits, loss and trainable counts as PEFT, padded or not."""
    pm, cm = _pair(encoder, name)
    ids, mask = padded_batch(3, 7)
    for kwargs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
        kwargs["labels"] = _labels(name, ids)
        ref, out = pm(**kwargs), cm(**kwargs)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert_counts_like_peft(cm, pm, capsys)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_roundtrip_both_ways(encoder, tmp_path):
    """PEFT saves the encoder's output; peftc loads it (folded) and saves it back in PEFT's format."""
    pm, cm = _pair(encoder)
    ids, mask = padded_batch(3, 8)
    pm.save_pretrained(tmp_path / "from_peft")
    cm.save_pretrained(tmp_path / "trained_by_peftc")  # with its encoder: the output is what's saved
    theirs = load_file(tmp_path / "from_peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "trained_by_peftc" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) == ["prompt_embeddings"]
    torch.testing.assert_close(ours["prompt_embeddings"], theirs["prompt_embeddings"], atol=1e-6, rtol=0)

    loaded = peftc.from_pretrained(make_llama(), tmp_path / "from_peft", backend="eager")
    assert loaded.sites[0].adapter.folded and loaded.sites[0].state.mlp_head is None
    ref = pm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-5, rtol=0)

    for source in (loaded, cm):
        source.save_pretrained(tmp_path / "back")
        back = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "back").eval()
        assert back.peft_config["default"].encoder_reparameterization_type == encoder
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_like_peft(name, encoder, tmp_path, capsys):
    """PEFT's seq2seq P-tuning: a 2n-row table all encoded (an LSTM's first n outputs see all 2n
    rows), the first n before the encoder's input, decoder labels not padded; files both ways."""
    pm, cm = _pair(encoder, name)
    assert cm.sites[0].state.embedding.shape[0] == 8
    assert_counts_like_peft(cm, pm, capsys)
    batch = seq2seq_batch()
    theirs = assert_seq2seq_like_peft(cm, pm, batch)
    cm.save_pretrained(tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    base = pm.get_base_model()
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    loaded = peftc.from_pretrained(copy.deepcopy(base), tmp_path / "peft", backend="eager").eval()
    with torch.no_grad():
        for other in (back, loaded):
            again = other(**batch)
            torch.testing.assert_close(again.logits, theirs.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(again.loss, theirs.loss, atol=1e-5, rtol=0)


def test_trains_encoder_then_table_when_loaded(tmp_path):
    """Gradients reach every encoder weight; a loaded (folded) adapter trains its table; the base stays."""
    model = make_llama()
    base = copy.deepcopy(model)
    cm = peftc.compile(model, [peftc.PTuning(4, hidden_size=8, encoder="lstm", num_layers=2)], backend="eager")
    ids = torch.randint(0, 128, (2, 6))
    cm.train()
    cm(input_ids=ids, labels=ids).loss.backward()
    state = cm.sites[0].state
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in state.parameters())
    assert all(p.grad is None for p in model.parameters())
    cm.eval().save_pretrained(tmp_path)
    loaded = peftc.from_pretrained(make_llama(), tmp_path, is_trainable=True, backend="eager")
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == ["peftc.adapters.default.prompt.embedding"]
    loaded(input_ids=ids, labels=ids).loss.backward()
    assert loaded.sites[0].state.embedding.grad is not None
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters(), strict=True))


def test_adapters_switch_and_disable():
    """set_adapter equals that adapter compiled alone; disable_adapter is the base model."""
    model = make_llama()
    base = copy.deepcopy(model)
    cm = peftc.compile(model, [peftc.PTuning(3, hidden_size=8)], backend="eager").eval()
    cm.add_adapter("lstm", [peftc.PTuning(5, encoder="lstm")])
    ids, mask = padded_batch(2, 6)
    alone = peftc.compile(copy.deepcopy(base), [peftc.PTuning(5, encoder="lstm")], backend="eager").eval()
    with torch.no_grad():
        for (_, a), (_, b) in zip(alone.sites[0].state.named_parameters(),
                                  cm.peftc.adapters.lstm.prompt.named_parameters(), strict=True):
            a.copy_(b)
    first = cm(input_ids=ids, attention_mask=mask).logits
    assert first.shape[1] == 3 + 6
    cm.set_adapter("lstm")
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits,
                               alone(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
    with cm.disable_adapter():
        torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
    cm.set_adapter("default")
    torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits, first, atol=0, rtol=0)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_greedy_generation_equals_peft(encoder):
    pm, cm = _pair(encoder)
    ids, mask = padded_batch(3, 7)
    mask[1] = 1  # left padding only, as generation wants
    assert_greedy_like_peft(pm, cm, ids, mask)


def test_errors():
    for bad, match in [
        (dict(encoder="gru"), "encoder='gru' must be one of"),
        (dict(num_layers=3), "exactly 2 hidden layers"),
        (dict(dropout=0.1), "no dropout"),
        (dict(hidden_size=0), "hidden_size=0"),
        (dict(encoder="lstm", dropout=1.5), "dropout=1.5"),
    ]:
        with pytest.raises(peftc.RuleError, match=match):
            peftc.PTuning(4, **bad)
    model = make_llama()
    before = snapshot(model)
    config = {**_config("MLP").to_dict(), "num_transformer_submodules": 2}
    with pytest.raises(peftc.RuleError, match="encoder-decoder"):
        peftc.compile(model, config, backend="eager")
    with pytest.raises(peftc.RuleError, match="no room for real tokens"):
        peftc.compile(model, [peftc.PTuning(64)], backend="eager")
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="LSTM encoder only"):  # PEFT ignores them for its MLP too
        cm = peftc.compile(model, _config("MLP", encoder_num_layers=3), backend="eager")
    assert len(cm.sites[0].state.mlp_head) == 5
