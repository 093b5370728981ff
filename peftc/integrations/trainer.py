"""``peftc.Trainer``: transformers' ``Trainer``, saving and resuming a peftc model as PEFT adapters.

Plain ``transformers.Trainer`` trains and evaluates a compiled model unchanged
(its forward shows the model's signature, so columns, labels and loss
arguments are found). It saves only models it knows (``PreTrainedModel``,
PEFT's ``PeftModel``) with ``save_pretrained``; anything else it writes as a
full ``state_dict``, base weights included. This subclass changes exactly that:
``save_model()`` and every checkpoint write the adapter folders
(``adapter_config.json`` + ``adapter_model.safetensors``, nothing of the base,
loadable by ``peft.PeftModel.from_pretrained``), and ``resume_from_checkpoint``
and ``load_best_model_at_end`` read them back into the model's adapters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME

from ..compiled import CompiledModel
from ..formats.peft import WEIGHTS_NAME


class AdapterCheckpoints:
    """Mixed into a ``transformers.Trainer`` subclass: a :class:`~peftc.CompiledModel` saves, resumes
    and reloads its best checkpoint as PEFT adapter folders."""

    def _compiled(self, model=None) -> CompiledModel | None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        return model if isinstance(model, CompiledModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        cm = self._compiled()
        if cm is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        cm.save_pretrained(output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        cm = self._compiled(model)
        if cm is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        folders = {name: Path(resume_from_checkpoint) / ("" if name == "default" else name) for name in cm.adapters}
        found = {name: f for name, f in folders.items() if (f / WEIGHTS_NAME).is_file()}
        if not found:
            raise ValueError(f"no peftc adapter checkpoint at {resume_from_checkpoint} "
                             f"(expected {WEIGHTS_NAME} for one of the adapters {cm.adapters})")
        for name, folder in found.items():
            cm.load_adapter(folder, name, is_trainable=name in cm.active_adapters)

    def _load_best_model(self) -> None:
        if self._compiled() is None:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class Trainer(AdapterCheckpoints, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints of a :class:`~peftc.CompiledModel` are PEFT adapters."""
