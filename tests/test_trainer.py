"""transformers' Trainer on a compiled model, against PEFT's identical run.

Plain ``transformers.Trainer`` with default ``TrainingArguments`` trains and
evaluates unchanged; ``peftc.Trainer`` also saves and resumes PEFT adapter folders.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import copy_peft_weights, make_llama

import peftc

peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
from transformers import Trainer, TrainingArguments  # noqa: E402

LORA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _data(n=16, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, :2] = 0  # some left padding: num_items_in_batch differs per batch
    labels = ids.masked_fill(mask == 0, -100)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                       "labels": labels.tolist(), "unused": ["x"] * n})


def _args(out, **kw):
    # Defaults but for size, logging and the CPU; remove_unused_columns stays True.
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                             max_steps=4, logging_steps=1, report_to=[], use_cpu=True, **kw)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def pair():
    model = make_llama()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA))
    cm = peftc.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA), backend="eager")
    copy_peft_weights(cm, pm)
    return pm, cm


def test_plain_trainer_trains_and_evaluates_like_peft(pair, tmp_path):
    pm, cm = pair
    data = _data()
    runs = {}
    for name, model in (("peft", pm), ("peftc", cm)):
        trainer = Trainer(model=model, args=_args(tmp_path / name, gradient_accumulation_steps=2),
                          train_dataset=data, eval_dataset=data)
        trainer.train()
        runs[name] = (_losses(trainer), trainer.evaluate())
    (theirs, their_eval), (ours, our_eval) = runs["peft"], runs["peftc"]
    assert len(ours) == len(theirs) == 4
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-5, rtol=1e-5)
    assert "eval_loss" in our_eval
    torch.testing.assert_close(our_eval["eval_loss"], their_eval["eval_loss"], atol=1e-5, rtol=1e-5)
    after = pm.state_dict()
    for p in cm.sites:
        torch.testing.assert_close(p.state.lora_B, after[f"base_model.model.{p.path}.lora_B.default.weight"],
                                   atol=1e-6, rtol=1e-5)


def test_peftc_trainer_saves_and_resumes_peft_adapter_folders(tmp_path):
    model = make_llama()
    cm = peftc.compile(copy.deepcopy(model), [peftc.LoRA(r=4, init=False).on(peftc.linear(r".*(q|v)_proj"))],
                       backend="eager")
    start = {k: v.clone() for k, v in cm.peftc.state_dict().items()}
    data = _data()
    trainer = peftc.Trainer(model=cm, args=_args(tmp_path / "run", save_strategy="steps", save_steps=2),
                            train_dataset=data)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = {f.name for f in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files), files
    trainer.save_model(tmp_path / "final")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "final").eval()
    ids = torch.tensor(data["input_ids"][:2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, cm.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)
    final = {k: v.clone() for k, v in cm.peftc.state_dict().items()}

    cm2 = peftc.compile(copy.deepcopy(model), [peftc.LoRA(r=4, init=False).on(peftc.linear(r".*(q|v)_proj"))],
                        backend="eager")
    cm2.peftc.load_state_dict(start)
    resumed = peftc.Trainer(model=cm2, args=_args(tmp_path / "run", save_strategy="steps", save_steps=2),
                            train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # the history of steps 1-2 comes from the checkpoint; steps 3-4 are trained again from it
    assert len(_losses(resumed)) == 4
    assert _losses(resumed) == pytest.approx(_losses(trainer), abs=1e-6)
    for key, value in final.items():
        torch.testing.assert_close(cm2.peftc.state_dict()[key], value, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_trains_like_peft_with_it(tmp_path):
    """TrainingArguments(gradient_checkpointing=True) turns on the checkpointing pass; the losses are PEFT's."""
    model = make_llama().train()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA))
    cm = peftc.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA), backend="eager")
    copy_peft_weights(cm, pm)
    losses = {}
    for name, m in (("peft", pm), ("peftc", cm)):
        trainer = Trainer(model=m, args=_args(tmp_path / name, gradient_checkpointing=True), train_dataset=_data())
        trainer.train()
        losses[name] = _losses(trainer)
    assert cm.is_gradient_checkpointing
    assert len(losses["peftc"]) == 4
    torch.testing.assert_close(torch.tensor(losses["peftc"]), torch.tensor(losses["peft"]), atol=1e-5, rtol=1e-5)


def test_an_option_peftc_cannot_honour_is_named(pair, tmp_path):
    """Offloading checkpointed activations is refused by name, not dropped in silence and not blamed on the inputs."""
    _, cm = pair
    args = _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"offload": True})
    trainer = Trainer(model=cm, args=args, train_dataset=_data())
    with pytest.raises(peftc.PeftcError, match="offload=True"):
        trainer.train()
    assert not cm.is_gradient_checkpointing
