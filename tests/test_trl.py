"""TRL's SFTTrainer on a compiled model (``peftc.SFTTrainer``), against TRL's identical run on PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import copy_peft_weights, make_llama

import peftc

peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

LORA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids (no hub): t0 pads, t2 ends."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                   pad_token="t0", eos_token="t2", unk_token="t1")


def _data(n=16, seed=0):
    """Pre-tokenized sequences of 4 to 11 tokens (padding differs per batch)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (n,), generator=g)
    return datasets.Dataset.from_dict({"input_ids": [torch.randint(3, 128, (int(k),), generator=g).tolist()
                                                     for k in lengths]})


def _config(out, **kw):
    # TRL's defaults (gradient checkpointing on) but for size, logging, the CPU, and float32: TRL's default
    # bf16 autocast rounds its tiled LM head and peftc's full logits differently
    return trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3, bf16=False, **kw)


def _logs(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


@pytest.fixture(scope="module")
def pair():
    model = make_llama().train()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA))
    cm = peftc.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA), backend="eager")
    copy_peft_weights(cm, pm)
    return model, pm, cm


def test_sft_trainer_trains_like_trl_on_peft_and_saves_a_peft_adapter(pair, tmp_path):
    model, pm, cm = pair
    data, tok = _data(), _tokenizer()
    runs = {}
    for name, m, cls in (("peft", pm, trl.SFTTrainer), ("peftc", cm, peftc.SFTTrainer)):
        trainer = cls(model=m, args=_config(tmp_path / name, gradient_accumulation_steps=2), train_dataset=data,
                      eval_dataset=data, processing_class=tok)
        trainer.train()
        runs[name] = trainer, trainer.evaluate()
    (theirs, their_eval), (ours, our_eval) = runs["peft"], runs["peftc"]
    assert cm.is_gradient_checkpointing  # TRL's default
    for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
        assert len(_logs(ours, key)) == 4
        torch.testing.assert_close(torch.tensor(_logs(ours, key)), torch.tensor(_logs(theirs, key)),
                                   atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(our_eval["eval_loss"], their_eval["eval_loss"], atol=1e-5, rtol=1e-5)
    after = pm.state_dict()
    for p in cm.sites:
        torch.testing.assert_close(p.state.lora_B, after[f"base_model.model.{p.path}.lora_B.default.weight"],
                                   atol=1e-6, rtol=1e-5)
    ours.save_model(tmp_path / "final")
    assert not any(f.name.startswith("model") for f in (tmp_path / "final").iterdir())
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "final").eval()
    ids = torch.tensor([data["input_ids"][0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, cm.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)
    cm.train()


def test_token_scores_match_trls_fused_kernel():
    """peftc's scores from full logits against TRL's chunked kernel from hidden states, gradients included."""
    from trl.kernels import ChunkedLogProbFunction

    from peftc.integrations.trl import token_scores

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, :2] = -100
    mask = labels != -100
    names = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    theirs = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], 1.0, 16, None, 1.0, names)
    ours = token_scores(hidden @ weight.T, labels, mask)
    for name, value in zip(names, theirs, strict=True):
        assert (ours[name][~mask] == 0).all()
        torch.testing.assert_close(ours[name][mask], value, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for name in ("log_probs", "entropy"):
        (g_ours,) = torch.autograd.grad(ours[name].sum(), hidden, retain_graph=True)
        (g_theirs,) = torch.autograd.grad(theirs[names.index(name)].sum(), hidden, retain_graph=True)
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_plain_trl_sft_trainer_never_trains_without_the_adapters(tmp_path):
    """trl.SFTTrainer's fused head calls base_model, which has no adapters: it fails, it doesn't train around them."""
    cm = peftc.get_peft_model(make_llama().train(), peft.LoraConfig(**LORA), backend="eager")
    before = {k: v.clone() for k, v in cm.peftc.state_dict().items()}
    trainer = trl.SFTTrainer(model=cm, args=_config(tmp_path), train_dataset=_data(), processing_class=_tokenizer())
    with pytest.raises(AttributeError, match="last_hidden_state"):
        trainer.train()
    for key, value in cm.peftc.state_dict().items():
        assert torch.equal(value, before[key])


def test_sft_trainer_refuses_what_it_cannot_train(tmp_path):
    with pytest.raises(peftc.PeftcError, match="peftc.get_peft_model"):
        peftc.SFTTrainer(model=make_llama(), args=_config(tmp_path), train_dataset=_data(),
                         processing_class=_tokenizer())
    cm = peftc.get_peft_model(make_llama(), peft.LoraConfig(**LORA), backend="eager")
    with pytest.raises(peftc.PeftcError, match="drop peft_config"):
        peftc.SFTTrainer(model=cm, args=_config(tmp_path), train_dataset=_data(), processing_class=_tokenizer(),
                         peft_config=peft.LoraConfig(**LORA))
