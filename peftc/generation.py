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
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, Seq2SeqLMOutput

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
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    if not callable(getattr(model, "generate", None)):
        raise PeftcError(f"{type(model).__name__} can't generate: it has no generate method (not a transformers "
                         "model with a language-modelling head)")
    if kwargs.get("past_key_values") is not None:
        prompts = " (a prompt adapter's virtual tokens must lead the cache)" if _tokens(cm)[0] else ""
        raise PeftcError("don't pass past_key_values to cm.generate: peftc keeps the KV cache of each call in "
                         f"its graph{prompts}. Pass the whole sequence as input_ids instead")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise PeftcError("cm.generate needs input_ids, a [batch, length] tensor of token ids")
    config = _generation_config(model, kwargs)
    slots, shift = _tokens(cm)
    prompt = 1 if encoder_decoder else ids.shape[1]  # the decoder starts from one token
    if config.max_new_tokens is not None or config.max_length is not None:
        new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt
        if not encoder_decoder:
            _check_positions(model, prompt, new_tokens, shift)
    else:  # transformers' default length, which it cuts to the model's positions itself
        new_tokens = GenerationConfig._get_default_generation_params()["max_length"]
    cache = GenerationCache(slots + prompt + max(new_tokens, 0))
    view = _view(model, _step(cm, cache), _Encoder(cm) if encoder_decoder else None)
    if adapter_names is None:
        return view.generate(*args, past_key_values=cache, **kwargs)
    if len(adapter_names) != ids.shape[0]:
        raise PeftcError(f"adapter_names has {len(adapter_names)} entries for {ids.shape[0]} input rows")
    copies = max(config.num_beams or 1, config.num_return_sequences or 1)  # transformers repeats each row this often
    if encoder_decoder and copies > 1:
        raise PeftcError("adapter_names with num_beams or num_return_sequences > 1 is not supported on "
                         "encoder-decoder models yet (the encoder runs on the rows before they are repeated)")
    rows = [name for name in adapter_names for _ in range(copies)]
    with cm.mixed_batch(rows, len(rows)):
        return view.generate(*args, past_key_values=cache, **kwargs)


def _active(cm) -> list:
    """The placements that act (none while merged: the weights hold them)."""
    if cm.merged:
        return []
    return [p for p in cm.sites if p.adapter_name in cm.active_adapters]


def _tokens(cm) -> tuple[int, int]:
    """The active adapters' ``(cache slots, position shift)`` in front of the sequence: counted
    once per rule (a prefix's placements at every attention op share one table), summed over rules."""
    rules = {(p.adapter_name, id(p.adapter)): p.adapter.generation_tokens() for p in _active(cm)}
    return sum(k[0] for k in rules.values()), sum(k[1] for k in rules.values())


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


def _step(cm, cache: GenerationCache):
    """One model step of the loop: the compiled model on the step's inputs and cache tensors."""

    def step(past_key_values=None, return_dict=None, use_cache=None, **inputs):
        # Contiguous inputs: a compiled graph guards on strides (a sliced mask would compile it again).
        inputs = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if inputs.get("encoder_outputs") is not None:  # a plain tuple traces; the model wraps it again
            inputs["encoder_outputs"] = (inputs["encoder_outputs"][0].contiguous(),)
        out = cm(**inputs, past_key_values=cache.inputs(), use_cache=True)
        if out["cache"]:
            cache.fill(out["cache"])  # the first step: its keys and values, in tensors of the full capacity
        else:
            cache.seen += inputs.get("decoder_input_ids", inputs.get("input_ids")).shape[1]
        output = Seq2SeqLMOutput if "decoder_input_ids" in inputs else CausalLMOutputWithPast
        return output(logits=out["logits"], past_key_values=cache)

    return step


class _Encoder:
    """An encoder-decoder model's encoder, run through the adapted graph (its adapters act):
    the whole model on one decoder token, keeping the encoder's output."""

    def __init__(self, cm):
        self.cm = cm

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        start = input_ids.new_zeros((input_ids.shape[0], 1))
        out = self.cm(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start)
        return BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state)

    __call__ = forward


def _view(model: nn.Module, step, encoder: _Encoder | None) -> nn.Module:
    """A shallow copy of ``model`` (the same parameters, buffers and config) whose forward is ``step``
    (and whose encoder, if it has one, is the adapted graph's)."""
    view = _stepping(type(model)).__new__(_stepping(type(model)))
    view.__dict__.update(model.__dict__)
    object.__setattr__(view, "peftc_step", step)
    object.__setattr__(view, "peftc_encoder", encoder)
    return view


@functools.cache
def _stepping(model_class: type) -> type:
    def forward(self, **inputs):
        return self.peftc_step(**inputs)

    forward.__signature__ = inspect.signature(model_class.forward)  # generate reads what the forward takes

    def call(self, *args, **kwargs):  # the step, without the model's hooks (peftc's warning among them)
        return self.forward(*args, **kwargs)

    def get_encoder(self, *args, **kwargs):
        return self.peftc_encoder

    return type(model_class.__name__, (model_class,), {"forward": forward, "__call__": call,
                                                       "get_encoder": get_encoder,
                                                       "__module__": model_class.__module__})

