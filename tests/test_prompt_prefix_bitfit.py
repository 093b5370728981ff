"""Prompt tuning, prefix tuning and BitFit: PEFT's numbers, training, merging, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    BUILDERS,
    VOCAB,
    assert_counts_like_peft,
    assert_seq2seq_like_peft,
    assert_unchanged,
    make_bart,
    make_bert_cls,
    make_llama,
    make_t5,
    padded_batch,
    seq2seq_batch,
    snapshot,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import peftc

peft = pytest.importorskip("peft")

MODELS = ["llama", "qwen2", "gpt2", "bert"]


def _config(kind: str, name: str):
    task = "SEQ_CLS" if name == "bert" else "CAUSAL_LM"
    if kind == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4)
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4)


def _labels(name: str, ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[0]) % 3 if name == "bert" else ids


@pytest.mark.parametrize("build", [make_t5, make_bart])
def test_encoder_decoder_prompt_holds_peft_s_two_tables(build, tmp_path, capsys):
    """PEFT's seq2seq prompt: 2n rows (counts, files), the first n before the encoder's input,
    labels (the decoder's) not padded; checkpoints both ways."""
    model = build()
    torch.manual_seed(3)
    config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    pm.save_pretrained(tmp_path / "peft")
    cm = peftc.from_pretrained(model, tmp_path / "peft", backend="eager", is_trainable=True).eval()
    assert cm.sites[0].state.embedding.shape[0] == 6
    assert_counts_like_peft(cm, pm, capsys)
    batch = seq2seq_batch()
    theirs = assert_seq2seq_like_peft(cm, pm, batch)
    cm.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(pm.get_base_model()), tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(**batch)
    torch.testing.assert_close(again.logits, theirs.logits, atol=1e-5, rtol=0)


_TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def _family(name: str):
    """A tiny random model of one prefix family, and its PEFT task type."""
    import transformers as tf

    torch.manual_seed(0)
    if name in ("t5", "bart"):
        return {"t5": make_t5, "bart": make_bart}[name](), "SEQ_2_SEQ_LM"
    if name == "roberta":  # positions offset past the padding index, counted over non-pad tokens
        config = tf.RobertaConfig(**_TINY, pad_token_id=0, num_labels=3)
        return tf.RobertaForSequenceClassification(config).eval(), "SEQ_CLS"
    if name == "opt":  # positions from the attention mask's running count
        config = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                              pad_token_id=0)
        return tf.OPTForCausalLM(config).eval(), "CAUSAL_LM"
    if name == "gemma3":  # a 3-token sliding window on layer 0, full attention on layer 1, grouped KV heads
        config = tf.Gemma3TextConfig(**_TINY, num_key_value_heads=2, head_dim=8, sliding_window=3,
                                     layer_types=["sliding_attention", "full_attention"])
        return tf.Gemma3ForCausalLM(config).eval(), "CAUSAL_LM"
    if name == "gemma2":  # eager attention with soft-capping (no sdpa op)
        config = tf.Gemma2Config(**_TINY, num_key_value_heads=2, head_dim=8, sliding_window=3)
        return tf.Gemma2ForCausalLM(config).eval(), "CAUSAL_LM"
    if name == "bloom":  # eager baddbmm attention over [batch * heads] with ALiBi
        config = tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1,
                                eos_token_id=2, pad_token_id=0)
        return tf.BloomForCausalLM(config).eval(), "CAUSAL_LM"
    config = tf.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
                           bos_token_id=1, eos_token_id=2)
    return tf.GPTJForCausalLM(config).eval(), "CAUSAL_LM"  # eager matmul attention, rotary positions


@pytest.mark.parametrize("family", ["t5", "bart", "roberta", "opt", "gemma3", "gemma2", "bloom", "gptj"])
def test_prefix_matches_peft_on_every_family(family, tmp_path, capsys):
    """PEFT's prefix (saved by PEFT, loaded by peftc, and back): the same counts, logits and loss,
    padded or not, on encoder-decoders, offset and mask-derived positions, sliding windows, and
    attention that is no sdpa op."""
    model, task = _family(family)
    torch.manual_seed(3)
    config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3)
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    pm.save_pretrained(tmp_path / "peft")
    cm = peftc.from_pretrained(model, tmp_path / "peft", backend="eager", is_trainable=True).eval()
    assert_counts_like_peft(cm, pm, capsys)
    ids, mask = padded_batch(2, 7, seed=5)
    ids = ids.masked_fill(mask == 0, 0)  # padding is the pad token: RoBERTa numbers positions past it
    labels = {"SEQ_CLS": torch.tensor([0, 2]), "CAUSAL_LM": ids, "SEQ_2_SEQ_LM": ids[:, :4].contiguous()}[task]
    back = None
    calls = [{"input_ids": ids, "attention_mask": mask}]
    if family in ("roberta", "opt"):  # positions from the mask, or from the pad tokens when there is none
        calls.append({"input_ids": ids})
    for kwargs in calls:
        with torch.no_grad():
            ours, theirs = cm(**kwargs, labels=labels), pm(**kwargs, labels=labels)
            base = pm.get_base_model()(**kwargs, labels=labels).logits
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
        assert (theirs.logits - base).abs().max() > 1e-3  # the prefix matters
        if back is None:
            cm.save_pretrained(tmp_path / "ours")
            back = peft.PeftModel.from_pretrained(copy.deepcopy(pm.get_base_model()), tmp_path / "ours").eval()
            with torch.no_grad():
                again = back(**kwargs, labels=labels).logits
            torch.testing.assert_close(again, theirs.logits, atol=1e-5, rtol=0)


def test_prefix_refuses_attention_it_cannot_reach(tmp_path):
    """Encoder and cross-attention (PEFT's prefix leads decoder self-attention only), and attention
    whose keys don't come from the cache, are named with what was found there."""
    model = make_t5()
    before = snapshot(model)
    with pytest.raises(peftc.RuleError, match=r"encoder\.block\.0\.layer\.0\.SelfAttention.*in the encoder.*give Prefix no selector"):
        peftc.compile(model, [peftc.Prefix(3).on(peftc.attention())], backend="eager")
    with pytest.raises(peftc.RuleError, match=r"EncDecAttention.*cross-attention"):
        peftc.compile(model, [peftc.Prefix(3).on(peftc.attention(r"decoder\..*"))], backend="eager")
    assert_unchanged(model, before)

    class Attention(torch.nn.Module):  # eager attention that never looks at the cache it is given
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
            return (torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v).transpose(1, 2).flatten(2)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 8)
            self.body = torch.nn.Module()
            self.body.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"attn": Attention()})])

        def forward(self, input_ids, attention_mask=None, past_key_values=None):
            return self.body.layers[0]["attn"](self.embed(input_ids))

    cm = peftc.compile(Model(), [peftc.Prefix(2)], (torch.randint(0, VOCAB, (2, 5)),), backend="eager")
    with pytest.raises(peftc.RuleError, match=r"layers\.0\.attn: found aten\._?softmax.*2 heads x 4.*don't come from the KV cache"):
        cm(input_ids=torch.randint(0, VOCAB, (2, 5)))


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("name", MODELS)
def test_prompt_learning_matches_peft(kind, name):
    """Same learned values -> same logits and loss as PEFT, padded or not, 2 sizes from one trace."""
    model = BUILDERS[name]()
    pm = peft.get_peft_model(copy.deepcopy(model), _config(kind, name)).eval()
    with torch.no_grad():  # make PEFT's classifier copy differ from the base head
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.25)
    cm = peftc.compile(model, _config(kind, name), backend="eager").eval()
    state = peft.get_peft_model_state_dict(pm)
    with torch.no_grad():
        cm.sites[0].state.embedding.copy_(state["prompt_embeddings"])
        for n, p in cm.peftc.saved.default.named_parameters():
            p.copy_(state[f"base_model.{n}"])
    traces = set()
    for batch, length in [(2, 6), (3, 11)]:
        ids, mask = padded_batch(batch, length, seed=length)
        for kwargs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
            kwargs = {**kwargs, "labels": _labels(name, ids)}
            ref, out = pm(**kwargs), cm(**kwargs)
            assert out.logits.shape == ref.logits.shape
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
            traces.add(id(cm.graph_module(**kwargs)))
    assert len(traces) == 2, "one trace per input signature, shared across sizes"


@pytest.fixture(scope="module")
def prompt5():
    """A tiny Llama with 5 virtual tokens, for the tests that only call it (no training, no changes)."""
    return peftc.compile(make_llama(), [peftc.Prompt(5)], backend="eager")


def test_causal_prompt_logits_cover_virtual_tokens(prompt5):
    cm = prompt5
    ids, _ = padded_batch(2, 7)
    assert cm(input_ids=ids).logits.shape == (2, 12, VOCAB)


def test_prompt_inits():
    model = make_llama()
    table = model.get_input_embeddings().weight

    def tokenizer(text):
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    cm = peftc.compile(model, [peftc.Prompt(5, init="text", text="abc", tokenizer=tokenizer)], backend="eager")
    ids = torch.tensor([ord(c) % VOCAB for c in "abcab"])
    torch.testing.assert_close(cm.sites[0].state.embedding, table[ids].detach())
    cm = peftc.compile(make_llama(), [peftc.Prompt(6, init="vocab")], backend="eager")
    rows = cm.sites[0].state.embedding
    full = make_llama().get_input_embeddings().weight
    assert all((full == row).all(dim=1).any() for row in rows), "vocab init takes rows of the embedding table"


def test_prefix_projection_trains_and_saves_folded(tmp_path):
    model = make_llama()
    cm = peftc.compile(model, [peftc.Prefix(3, projection=16)], backend="eager")
    state = cm.sites[0].state
    assert state.transform is not None
    ids, mask = padded_batch(2, 6)
    cm.train()
    cm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert state.transform[0].weight.grad is not None and state.embedding.grad is not None
    cm.eval()
    cm.save_pretrained(tmp_path)
    loaded = peftc.from_pretrained(make_llama(), tmp_path, backend="eager")
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                               cm(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    pm = peft.PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits,
                               cm(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("rule", "lr"), [(peftc.Prompt(4), 0.3), (peftc.Prefix(4), 0.1),
                                          (peftc.BitFit().on(peftc.linear()), 0.03)])
def test_each_kind_trains_and_base_stays_bit_identical(rule, lr):
    torch.manual_seed(0)
    model = make_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cm = peftc.compile(model, [rule], backend="eager").train()
    opt = torch.optim.Adam([p for p in cm.parameters() if p.requires_grad], lr=lr)
    ids = (torch.arange(12).repeat(4, 1) * 5 + torch.arange(4)[:, None]) % VOCAB
    labels = torch.full_like(ids, 7)  # a constant answer: reachable by every kind
    losses = []
    for _ in range(12):
        loss = cm(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"base parameter {n} changed"


def test_all_kinds_together_merge_refuses_then_folds_the_rest():
    model = make_llama()
    ref = copy.deepcopy(model)
    rules = [peftc.LoRA(r=2, init=False).on(peftc.linear(r".*\.(q|v)_proj")),
             peftc.BitFit().on(peftc.linear(r".*mlp\..*")), peftc.Prefix(3)]
    cm = peftc.compile(model, rules, backend="eager").train()
    ids, mask = padded_batch(2, 6)
    cm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    trained = {n for n, p in cm.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("peftc.") for n in trained)
    with pytest.raises(peftc.MergeError, match="Prefix"):
        cm.merge()
    assert not cm.merged
    for n, p in model.named_parameters():
        assert torch.equal(p, ref.get_parameter(n)), "a refused merge must change nothing"


@settings(max_examples=12)
@given(width=st.integers(1, 6), out=st.integers(1, 6), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 50))
def test_bitfit_merge_property(width, out, bias, dtype, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, out, bias=bias), torch.nn.Tanh(),
                                torch.nn.Linear(out, 3)).to(dtype)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, width, dtype=dtype)
    cm = peftc.compile(model, [peftc.BitFit().on(peftc.linear())], (x,), backend="eager")
    with torch.no_grad():
        for p in cm.sites:
            p.state.bias.normal_()
    unmerged = cm(x)
    expected = torch.tanh(x.double() @ original["0.weight"].double().T
                          + (original["0.bias"].double() if bias else 0) + cm.sites[0].state.bias.double())
    expected = expected @ original["2.weight"].double().T + original["2.bias"].double() + cm.sites[1].state.bias.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(unmerged.double(), expected, atol=tol, rtol=tol)
    cm.merge(safe=True)
    assert model[0].bias is not None
    torch.testing.assert_close(cm(x), unmerged, atol=tol, rtol=tol)
    cm.unmerge()
    assert (model[0].bias is None) == (not bias), "unmerge removes a bias merge created"
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, original[n], atol=tol, rtol=tol)
    torch.testing.assert_close(cm(x), unmerged, atol=tol, rtol=tol)


def test_bitfit_on_bare_matmul_without_bias_refuses_merge():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.w

    model = M()
    cm = peftc.compile(model, [peftc.BitFit().on(peftc.linear())], (torch.randn(2, 4),), backend="eager")
    before = model.w.detach().clone()
    with pytest.raises(peftc.MergeError, match="no bias operand"):
        cm.merge()
    assert torch.equal(model.w, before) and not cm.merged


def test_errors(prompt5):
    with pytest.raises(peftc.RuleError, match="num_virtual_tokens"):
        peftc.Prompt(0)
    with pytest.raises(peftc.RuleError, match="num_virtual_tokens"):
        peftc.Prefix(-2)
    with pytest.raises(peftc.RuleError, match="positions"):
        peftc.compile(make_llama(), [peftc.Prefix(64)], backend="eager")
    with pytest.raises(peftc.RuleError, match="positions"):
        peftc.compile(make_bert_cls(), [peftc.Prompt(80)], backend="eager")
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(peftc.RuleError, match="scaled_dot_product_attention"):
        peftc.compile(mlp, [peftc.Prefix(2)], (torch.randn(2, 4),), backend="eager")
    with pytest.raises(peftc.RuleError, match="input-embedding"):
        peftc.compile(mlp, [peftc.Prompt(2)], (torch.randn(2, 4),), backend="eager")
    ids, _ = padded_batch(2, 5)
    with pytest.raises(peftc.RuleError, match="position_ids"):
        prompt5(input_ids=ids, position_ids=torch.arange(5).expand(2, -1))
