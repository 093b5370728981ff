"""The model's call signature: binding inputs to its parameter names, and showing it on a wrapper.

transformers models take most inputs by keyword, some only through ``**kwargs``
(``num_items_in_batch``); tools read a model's signature off its ``forward``.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

from .kv_cache import CacheInputs


def as_keywords(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Bind positional arguments to the model's parameter names."""
    if not args:
        return kwargs
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def needs_boundary(model: nn.Module, kwargs: dict) -> bool:
    """Whether some keyword inputs only reach the forward through its ``**kwargs``
    (transformers' ``num_items_in_batch``): ``torch.export`` can't give those dynamic
    shapes, so such calls are traced through the boundary, which takes one dict.
    Generation steps (a KV cache as tensors) go through the boundary too."""
    params = _parameters(type(model))
    return not all(k in params for k in kwargs) or isinstance(kwargs.get("past_key_values"), CacheInputs)


@functools.cache
def _parameters(model_class: type) -> frozenset[str]:
    sig = inspect.signature(model_class.forward)
    return frozenset(n for n, p in sig.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD)


@functools.cache
def showing_signature_of(base: type, model_class: type) -> type:
    """A subclass of ``base`` (:class:`~peftc.CompiledModel`) whose ``forward`` shows ``model_class.forward``'s
    parameters (and ``adapter_names``), as ``torch.fx.GraphModule`` makes a class per graph.

    Tools read a model's signature off its class and its ``forward``: transformers'
    ``Trainer`` keeps the dataset columns the forward takes, finds label names in it,
    and passes loss arguments (``num_items_in_batch``) when it takes ``**kwargs``.
    """
    try:
        sig = inspect.signature(model_class.forward)
    except (TypeError, ValueError):
        return base
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if "adapter_names" not in sig.parameters:
        params.append(inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
    params += [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]

    def forward(self, *args, **kwargs):
        return base.forward(self, *args, **kwargs)

    forward.__signature__ = sig.replace(parameters=params)
    forward.__doc__ = base.forward.__doc__
    return type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__})
