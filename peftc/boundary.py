"""The input boundary: a wrapper traced around the model when an adapter rewrites its inputs.

Prompt tuning prepends embeddings and prefix tuning hands the model a KV cache
holding its prefix before the model's forward runs. Both are Python over the model's keyword inputs; tracing
the wrapper below (instead of the bare model) puts that code into the graph,
ahead of the model's own ops. The model sits at ``model.`` in the traced graph,
the adapter state at ``peftc.``.
"""

from __future__ import annotations

from torch import nn
from transformers.utils import ModelOutput

from .kv_cache import CacheInputs, step_cache, step_outputs

MODEL_PREFIX = "model."  # where the model sits in a traced boundary's graph


class Boundary(nn.Module):
    """``forward(inputs)``: apply each adapter's ``rewrite_inputs`` to the dict of keyword
    inputs, then call the model. (One dict rather than ``**kwargs``: export can't give
    variable keyword arguments dynamic shapes.)

    A generation step passes its KV cache as :class:`~peftc.kv_cache.CacheInputs`: the
    boundary gives the model a ``Cache`` over them, uses each adapter's
    ``rewrite_decode_inputs`` after the first step, and returns ``{"logits", "cache"}``
    (the first step's keys and values; later steps write theirs in place)."""

    def __init__(self, model: nn.Module, state_root: nn.Module, rewrites: list[tuple[object, str]]):
        super().__init__()
        self.model = model
        self.peftc = state_root
        self._rewrites = rewrites  # (adapter, state path under peftc)

    @property
    def targets(self) -> tuple[str, ...]:
        """The state paths of the rewrites, in order."""
        return tuple(target for _, target in self._rewrites)

    def forward(self, kwargs: dict):
        cache = kwargs.get("past_key_values")
        stepping = isinstance(cache, CacheInputs)
        decoding = stepping and not cache.first
        if stepping:  # the rewrites see the step's Cache (a prefix fills the first step's)
            kwargs["past_key_values"] = step_cache(cache, getattr(self.model.config, "is_encoder_decoder", False))
        for adapter, target in self._rewrites:
            rewrite = adapter.rewrite_decode_inputs if decoding else adapter.rewrite_inputs
            kwargs = rewrite(self.model, self.peftc.get_submodule(target), dict(kwargs))
        if not stepping:
            return _without_cache(self.model(**kwargs)) if cache is None else self.model(**kwargs)
        return {"logits": self.model(**kwargs).logits, "cache": step_outputs(kwargs["past_key_values"])}


def _without_cache(out):
    """A model output without the cache a rewrite made (a prefix's): the caller passed none
    (and a graph can't return a ``Cache``)."""
    if not isinstance(out, ModelOutput) or out.get("past_key_values") is None:
        return out
    return type(out)(**{k: v for k, v in out.items() if k != "past_key_values"})
