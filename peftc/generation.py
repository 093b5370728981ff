"""``cm.generate``: transformers' generation loop, with the adapted graph as the model step.

transformers' ``GenerationMixin.generate`` does everything around the model
call: logits processors, greedy, sampling and beam search, stopping criteria,
streamers, padding. peftc runs that loop unchanged on a *stepping view* of the
user's model: a shallow copy (the same parameters, config and submodules)
whose ``forward`` is one step of the compiled model, ``cm(...)``. Each step
passes the KV cache as tensors (:mod:`peftc.kv_cache`) through the graph, so
the programs are the usual ones: one for the first step (the prompt) and one
for each later step (one new token), traced once per signature and reused by
every generate call, whatever its adapters, batch or length.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from torch import nn
from transformers import GenerationConfig

from .errors import PeftcError
from .kv_cache import GenerationCache


def generate(cm, *args, adapter_names: list[str] | None = None, **kwargs):
    """What ``cm.base_model.generate(*args, **kwargs)`` returns, with the adapters acting.

    Arguments:
        cm: the :class:`~peftc.CompiledModel`.
        adapter_names: one adapter name per input row (``"__base__"``: none).

    Raises:
        PeftcError: the model can't generate, a ``past_key_values`` was passed, or the
            sequence wouldn't fit the model's positions once virtual tokens are counted.
    """
    model = cm.base_model
    if not callable(getattr(model, "generate", None)) or getattr(model.config, "is_encoder_decoder", False):
        raise PeftcError(f"{type(model).__name__} can't generate through peftc: generate needs a decoder-only "
                         "transformers model (encoder-decoder models are not supported yet)")
    if kwargs.get("past_key_values") is not None:
        prompts = " (a prompt adapter's virtual tokens must lead the cache)" if _tokens(cm)[0] else ""
        raise PeftcError("don't pass past_key_values to cm.generate: peftc keeps the KV cache of each call in "
                         f"its graph{prompts}. Pass the whole sequence as input_ids instead")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise PeftcError("cm.generate needs input_ids, a [batch, length] tensor of token ids")
    config = _generation_config(model, kwargs)
    slots, shift = _tokens(cm)
    if config.max_new_tokens is not None or config.max_length is not None:
        new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - ids.shape[1]
        _check_positions(model, ids.shape[1], new_tokens, shift)
    else:  # transformers' default length, which it cuts to the model's positions itself
        new_tokens = GenerationConfig._get_default_generation_params()["max_length"]
    cache = GenerationCache(model.config, slots + ids.shape[1] + max(new_tokens, 0))
    view = _view(model, _step(cm, cache, slots))
    if adapter_names is None:
        return view.generate(*args, past_key_values=cache, **kwargs)
    if len(adapter_names) != ids.shape[0]:
        raise PeftcError(f"adapter_names has {len(adapter_names)} entries for {ids.shape[0]} input rows")
    copies = max(config.num_beams or 1, config.num_return_sequences or 1)  # transformers repeats each row this often
    rows = [name for name in adapter_names for _ in range(copies)]
    with cm.mixed_batch(rows, len(rows)):
        return view.generate(*args, past_key_values=cache, **kwargs)


def _tokens(cm) -> tuple[int, int]:
    """The active adapters' ``(cache slots, position shift)`` in front of the sequence."""
    placements = [p for p in cm.sites if p.adapter_name in cm.active_adapters and not cm.merged]
    kinds = {p.adapter_name: p.adapter.generation_tokens() for p in placements}
    return sum(k[0] for k in kinds.values()), sum(k[1] for k in kinds.values())


def _generation_config(model: nn.Module, kwargs: dict) -> GenerationConfig:
    """The generation config the call will use (read-only: to size the cache)."""
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
    return config


def _check_positions(model: nn.Module, prompt: int, new_tokens: int, shift: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and shift + prompt + new_tokens > limit:
        virtual = f" + {shift} virtual tokens" if shift else ""
        raise PeftcError(f"generating {new_tokens} tokens after a prompt of {prompt}{virtual} needs "
                         f"{shift + prompt + new_tokens} positions; {type(model).__name__} has {limit}. "
                         "Ask for fewer new tokens (max_new_tokens) or pass a shorter prompt")


def _step(cm, cache: GenerationCache, slots: int):
    """One model step of the loop: the compiled model on the step's inputs and cache tensors."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def step(past_key_values=None, return_dict=None, use_cache=None, **inputs):
        # Contiguous inputs: a compiled graph guards on strides (a sliced mask would compile it again).
        inputs = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        ids = inputs.get("input_ids")
        if cache.seen == 0:
            cache.allocate(ids.shape[0], cm.dtype, ids.device)
        first = cache.seen == 0
        out = cm(**inputs, past_key_values=cache.inputs(), use_cache=True)
        cache.seen += ids.shape[1] + (slots if first else 0)
        return CausalLMOutputWithPast(logits=out["logits"], past_key_values=cache)

    return step


def _view(model: nn.Module, step) -> nn.Module:
    """A shallow copy of ``model`` (the same parameters, buffers and config) whose forward is ``step``."""
    view = _stepping(type(model)).__new__(_stepping(type(model)))
    view.__dict__.update(model.__dict__)
    object.__setattr__(view, "peftc_step", step)
    return view


@functools.cache
def _stepping(model_class: type) -> type:
    def forward(self, **inputs):
        return self.peftc_step(**inputs)

    forward.__signature__ = inspect.signature(model_class.forward)  # generate reads what the forward takes

    def call(self, *args, **kwargs):  # the step, without the model's hooks (peftc's warning among them)
        return self.forward(*args, **kwargs)

    return type(model_class.__name__, (model_class,), {"forward": forward, "__call__": call,
                                                       "__module__": model_class.__module__})

