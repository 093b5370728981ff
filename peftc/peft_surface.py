"""PEFT's ``PeftModel`` surface on a compiled model: PEFT's names, and the attributes tools read.

Everything here is written over :class:`~peftc.CompiledModel`'s public API
(``base_model``, ``programs``, ``adapters``, ``active_adapters``, ``merge``, ``unmerge``), so
that third-party code written for PEFT (transformers' ``Trainer``, scripts)
finds what it looks for.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import PeftcError
from .passes.checkpoint import plan
from .peft_config import adapter_config


class PeftSurface:
    """Mixed into :class:`~peftc.CompiledModel`; uses only its public API."""

    def merge_adapter(self, safe: bool = False) -> None:
        """PEFT's name for :meth:`~peftc.CompiledModel.merge`."""
        self.merge(safe=safe)

    def unmerge_adapter(self) -> None:
        """PEFT's name for :meth:`~peftc.CompiledModel.unmerge`."""
        self.unmerge()

    def unload(self) -> nn.Module:
        """The user's own model object, without adapters and without merging (PEFT's ``unload``).

        Unmerged, it holds its original weights; merged, the merged ones (as in PEFT).
        Its adapters live in this compiled model, which stays usable.
        """
        return self.base_model

    def get_base_model(self) -> nn.Module:
        """The user's model (its weights are the graph's; unmerged it holds no adapter)."""
        return self.base_model

    @property
    def active_adapter(self) -> str | list[str]:
        """PEFT's ``active_adapter``: the active adapter's name, or a list when several are."""
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    @property
    def peft_config(self) -> dict[str, dict]:
        """Each adapter's config as it would be saved (``adapter_config.json``), by name.

        PEFT's own config objects come from ``peft.PeftConfig.from_peft_type(**cm.peft_config[name])``
        for the kinds PEFT holds (``peft_type`` LORA, IA3, PROMPT_TUNING, PREFIX_TUNING)."""
        return {name: adapter_config(self, name) for name in self.adapters}

    @property
    def config(self):
        """The base model's config (transformers models)."""
        return getattr(self.base_model, "config", None)

    @property
    def generation_config(self):
        return getattr(self.base_model, "generation_config", None)

    @property
    def loss_type(self) -> str | None:
        """The base model's loss (``Trainer`` counts a causal LM's label tokens shifted by one)."""
        return getattr(self.base_model, "loss_type", None)

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base_model.parameters()).dtype

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tags for the model card (transformers' method, which PEFT forwards; TRL calls it)."""
        self.base_model.add_model_tags(tags)

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def enable_input_require_grads(self) -> None:
        """The input embeddings' output requires grad in every graph (transformers' method, as PEFT
        forwards it). peftc needs it for nothing; ``backend="eager"`` only (raises under compile)."""
        embeddings = self.get_input_embeddings()
        path = next((name for name, m in self.base_model.named_modules() if m is embeddings), None)
        if path is None:
            raise PeftcError(f"{type(self.base_model).__name__}.get_input_embeddings() is not one of its modules; "
                             "enable_input_require_grads needs the embedding module the graph calls")
        self.programs.set_input_grads(path)

    def disable_input_require_grads(self) -> None:
        """Undo :meth:`enable_input_require_grads`."""
        self.programs.set_input_grads(None)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False,
                                        layers: str | None = None) -> None:
        """Recompute each layer's activations in backward instead of keeping them (transformers' API;
        ``Trainer(gradient_checkpointing=True)`` calls this).

        Training graphs run each decoder layer (each ``GradientCheckpointingLayer``) as a
        checkpointed region (:mod:`peftc.passes.checkpoint`); the graphs are not traced again.

        Arguments:
            activation_checkpointing_kwargs: options for ``torch.utils.checkpoint.checkpoint``.
            every_n_layers: checkpoint every n-th layer only.
            offload: not supported (raises).
            layers: a regular expression over module paths picking the layers instead.
        """
        if offload:
            raise PeftcError("activation checkpointing with offload=True is not supported by peftc; "
                             "pass offload=False (TrainingArguments: drop 'offload' from activation_checkpointing_kwargs)")
        self.programs.set_checkpointing(plan(self.base_model, activation_checkpointing_kwargs, every_n_layers, layers))

    def activation_checkpointing_disable(self) -> None:
        """Keep every activation again (transformers' API)."""
        self.programs.set_checkpointing(None)

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.programs.checkpointing is not None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options) -> None:
        """The older name of :meth:`activation_checkpointing_enable` (PEFT and transformers 4 use it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def gradient_checkpointing_disable(self) -> None:
        """The older name of :meth:`activation_checkpointing_disable`."""
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing
