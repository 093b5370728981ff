"""Model -> :class:`Trace`: ``torch.export`` in non-strict mode, dynamic batch and length.

One trace serves every call whose inputs have the same *signature*: the same
positional count, keyword names, tensor dtypes and ranks, constant values, and
train/eval mode. Batch and sequence dims are exported as ``Dim.AUTO``, so one
trace covers every size export could keep symbolic; a call it can't take
(a dim export specialised, e.g. a batch of 1 in the example) gets a trace of its own.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, TensorArgument
from torch.utils import _pytree as pytree

from .errors import PeftcError, TraceError
from .passes.inline import inline_grad_regions


def call_inputs(model: nn.Module, example_inputs) -> tuple[tuple, dict]:
    """Normalise ``example_inputs`` (dict, tuple, tensor, or None) to ``(args, kwargs)``."""
    if example_inputs is None:
        return (), default_inputs(model)
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(
        f"example_inputs must be a dict of keyword arguments, a tuple, or a tensor; got {type(example_inputs).__name__}"
    )


def default_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """A small batch for a transformers model: ``input_ids`` and ``attention_mask`` of shape 2x8."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None or getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise TraceError(
            f"example_inputs is required for {type(model).__name__}: peftc can only make a default "
            "batch for transformers text models. Pass e.g. example_inputs=(torch.randn(2, 16),)"
        )
    device = next(model.parameters()).device
    ids = torch.arange(16, device=device).remainder(min(vocab, 97)).reshape(2, 8) + 1
    return {"input_ids": ids.clamp(max=vocab - 1), "attention_mask": torch.ones_like(ids)}


def with_defaults(model: nn.Module, kwargs: dict) -> dict:
    """Drop keyword arguments that are None and ask transformers models not to build a KV cache."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "use_cache" not in kwargs and "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return kwargs


def signature(args: tuple, kwargs: dict, training: bool) -> tuple:
    """A hashable key: calls with equal keys can share a trace."""

    def leaf(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", v.dtype, v.dim(), v.device.type)
        return ("const", type(v).__name__, repr(v))

    flat, spec = pytree.tree_flatten((args, dict(sorted(kwargs.items()))))
    return (training, str(spec), tuple(leaf(v) for v in flat))


@dataclass
class Trace:
    """An exported program and the signature it serves."""

    ep: ExportedProgram
    key: tuple
    kwarg_order: tuple[str, ...]
    prefix: str = ""  # what module paths in the graph carry in front of the model's
    boundary: bool = False  # traced through the input boundary, which takes one dict

    def module(self) -> torch.fx.GraphModule:
        """A fresh graph module over the model's own parameters (never copies)."""
        gm = self.ep.module()
        inline_grad_regions(gm)
        return gm

    def order(self, kwargs: dict) -> dict:
        return {k: kwargs[k] for k in self.kwarg_order}

    def call_args(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The graph module's arguments for a model call with ``args`` and ``kwargs``."""
        if self.boundary:
            return (self.order(kwargs),), {}
        return args, self.order(kwargs)

    def accepts(self, args: tuple, kwargs: dict) -> bool:
        """Whether every tensor input's static dims and symbolic ranges fit this trace."""
        flat = pytree.tree_leaves((args, self.order(kwargs)))
        user = [s for s in self.ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        vals = {n.name: n.meta.get("val") for n in self.ep.graph.nodes if n.op == "placeholder"}
        if len(flat) != len(user):
            return False
        for value, spec in zip(flat, user, strict=True):
            if not isinstance(spec.arg, TensorArgument) or not isinstance(value, torch.Tensor):
                continue
            traced = vals.get(spec.arg.name)
            if traced is None or traced.dim() != value.dim():
                return False
            for dim, size in zip(traced.shape, value.shape, strict=True):
                if not _fits(dim, size, self.ep.range_constraints):
                    return False
        return True


def _fits(dim, size: int, ranges) -> bool:
    if isinstance(dim, int):
        return dim == size
    expr = dim.node.expr
    if expr in ranges:
        r = ranges[expr]
        return _bound(r.lower, size) <= size <= _bound(r.upper, size)
    return True


def _bound(value, size: int) -> int:
    """A range bound as an int; an infinite bound lets ``size`` through."""
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return size


def trace(model: nn.Module, args: tuple, kwargs: dict, key: tuple, boundary: nn.Module | None = None,
          prefix: str = "") -> Trace:
    """Export ``model`` (or ``boundary``, a wrapper around it) on these inputs, batch and sequence dims dynamic.

    Raises:
        TraceError: naming the model, the inputs, the reason, and what to try.
    """
    try:
        if boundary is not None:  # it takes the keyword inputs as one dict
            dynamic = ({k: pytree.tree_map(_dim_spec, v) for k, v in kwargs.items()},)
            ep = torch.export.export(boundary, (kwargs,), dynamic_shapes=dynamic, strict=False)
        else:
            dynamic = _dynamic_shapes(model, args, kwargs)
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except PeftcError:
        raise
    except Exception as e:
        raise TraceError(_explain(model, args, kwargs, e)) from e
    return Trace(ep, key, tuple(kwargs), prefix, boundary is not None)


def _dim_spec(v):
    """Batch (dim 0) of every tensor input is dynamic, and so is the sequence (dim 1) of
    token-like inputs: integer tensors and tensors of rank 3 or more. A float matrix's
    dim 1 is its features, which the model fixes anyway."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return None
    has_sequence = v.dim() >= 3 or (v.dim() == 2 and not v.is_floating_point())
    return {d: Dim.AUTO for d in range(2 if has_sequence else 1)}


def _dynamic_shapes(model, args, kwargs):
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise TraceError(
            f"example_inputs don't fit {type(model).__name__}.forward{inspect.signature(model.forward)}: {e}"
        ) from e
    return {name: pytree.tree_map(_dim_spec, value) for name, value in bound.arguments.items()}


def describe_inputs(args, kwargs) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"Tensor{list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
        return repr(v)

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _explain(model, args, kwargs, error: Exception) -> str:
    name = type(model).__name__
    first = (str(error).strip().splitlines() or [""])[0][:500]
    text = str(error)
    if "data-dependent" in text or "GuardOnDataDependent" in type(error).__name__:
        hint = ("the model's Python code branches on tensor values, which a graph can't express. "
                "Move that branch out of forward or pass inputs that avoid it")
    elif "use_cache" in text or "Cache" in text:
        hint = "pass use_cache=False, and don't pass past_key_values"
    elif isinstance(error, (TypeError, RuntimeError, ValueError, IndexError)):
        hint = (f"check that example_inputs fit {name}.forward{inspect.signature(model.forward)}: "
                "names, shapes and dtypes (the same call must work on the model itself)")
    else:
        hint = "run the model eagerly with the same inputs to find the failing line"
    return (f"peftc could not trace {name} with inputs {describe_inputs(args, kwargs)}: "
            f"{type(error).__name__}: {first}\nTry: {hint}. The full export error is chained below.")
