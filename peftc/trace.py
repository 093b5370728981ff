"""Model -> :class:`Trace`: ``torch.export`` in non-strict mode, dynamic batch and length.

One trace serves every call whose inputs have the same *signature*: the same
positional count, keyword names, tensor dtypes and ranks, constant values, and
train/eval mode. Batch and sequence dims are exported as ``Dim.AUTO``, so one
trace covers every size export could keep symbolic; a call it can't take
(a dim export specialised, e.g. a batch of 1 in the example) gets a trace of its own.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, TensorArgument
from torch.utils import _pytree as pytree

from .boundary import MODEL_PREFIX, Boundary
from .errors import PeftcError, TraceError, first_line
from .kv_cache import CacheInputs
from .quantization import float_view
from .quiet import quiet
from .signature import needs_boundary


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
    """A small batch for a transformers model: ``input_ids`` and ``attention_mask`` of shape 2x8
    (and ``decoder_input_ids``, 2x5, for an encoder-decoder model)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None or getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise TraceError(
            f"example_inputs is required for {type(model).__name__}: peftc can only make a default "
            "batch for transformers text models. Pass e.g. example_inputs=(torch.randn(2, 16),)"
        )
    device = next(model.parameters()).device
    ids = (torch.arange(16, device=device).remainder(min(vocab, 97)).reshape(2, 8) + 1).clamp(max=vocab - 1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def with_defaults(model: nn.Module, kwargs: dict) -> dict:
    """Drop keyword arguments that are None and ask transformers models not to build a KV cache."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "use_cache" not in kwargs and _takes_use_cache(type(model)):
        kwargs["use_cache"] = False
    return kwargs


@functools.cache
def _takes_use_cache(model_class: type) -> bool:
    # Every forward call asks: look the signature up once per class.
    return "use_cache" in inspect.signature(model_class.forward).parameters


class Signature(NamedTuple):
    """What calls that can share a trace have in common."""

    training: bool
    spec: str  # the pytree structure of (args, sorted kwargs)
    leaves: tuple  # per leaf: ("tensor", dtype, rank, device type) or ("const", type, repr)


class Flat(NamedTuple):
    """A call's inputs flattened once (a KV cache is many tensors): the leaves of
    ``(args, kwargs)`` with the keywords sorted by name, and their structure.
    :func:`signature` and :meth:`Trace.accepts` both read them."""

    leaves: list
    spec: pytree.TreeSpec


def flatten(args: tuple, kwargs: dict) -> Flat:
    """A call's inputs as :class:`Flat`."""
    return Flat(*pytree.tree_flatten((args, dict(sorted(kwargs.items())))))


def signature(flat: Flat, training: bool) -> Signature:
    """Calls with equal signatures can share a trace."""

    def leaf(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", v.dtype, v.dim(), v.device.type)
        return ("const", type(v).__name__, repr(v))

    return Signature(training, str(flat.spec), tuple(leaf(v) for v in flat.leaves))


@dataclass
class Trace:
    """An exported program and the signature it serves.

    Attributes:
        rewrites: the state paths (under ``peftc``) of the input rewrites traced in
            through the input boundary; empty when the bare model was traced.
    """

    ep: ExportedProgram
    signature: Signature
    kwarg_order: tuple[str, ...]
    rewrites: tuple[str, ...] = ()
    boundary: bool = False  # traced through the input boundary, which takes the keyword inputs as one dict

    @property
    def key(self) -> tuple[Signature, tuple[str, ...]]:
        """Calls with equal keys (signature and active input rewrites) can share this trace."""
        return self.signature, self.rewrites

    @property
    def training(self) -> bool:
        """Whether this trace is of the model in training mode."""
        return self.signature.training

    @property
    def prefix(self) -> str:
        """What module paths in the graph carry in front of the model's own."""
        return MODEL_PREFIX if self.boundary else ""

    def module(self) -> torch.fx.GraphModule:
        """A fresh graph module over the model's own parameters (never copies).

        A plain ``GraphModule``: without export's input guards (a ``_guards_fn`` call in
        the graph and a pre-hook that flattens and checks every input on every call,
        ~1 ms a decode step on the CPU). :meth:`accepts` checks each call's dims
        against the trace's ranges before it runs, and a compiled graph has
        torch.compile's own guards.
        """
        unlifted = self.ep.module(check_guards=False)
        return torch.fx.GraphModule(unlifted, unlifted.graph, class_name=type(self.ep.graph_module).__name__)

    def order(self, kwargs: dict) -> dict:
        return {k: kwargs[k] for k in self.kwarg_order}

    def call_args(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The graph module's arguments for a model call with ``args`` and ``kwargs``."""
        if self.boundary:
            return (self.order(kwargs),), {}
        return args, self.order(kwargs)

    def accepts(self, flat: Flat) -> bool:
        """Whether every tensor input's static dims and symbolic ranges fit this trace."""
        if len(flat.leaves) != len(self._input_bounds):
            return False
        for value, bounds in zip(flat.leaves, self._input_bounds, strict=True):
            if bounds is None or not isinstance(value, torch.Tensor):
                continue
            if len(bounds) != value.dim():
                return False
            if not all(lo <= size <= hi for (lo, hi), size in zip(bounds, value.shape, strict=True)):
                return False
        return True

    @functools.cached_property
    def _input_bounds(self) -> list[list[tuple[float, float]] | None]:
        """Per user input, in :func:`flatten`'s order (keywords sorted by name), ``(low, high)``
        for each dim (None for a non-tensor), read off the graph once: ``accepts`` runs on every call."""
        user = [s for s in self.ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        vals = {n.name: n.meta.get("val") for n in self.ep.graph.nodes if n.op == "placeholder"}
        out = []
        for spec in user:
            traced = vals.get(spec.arg.name) if isinstance(spec.arg, TensorArgument) else None
            out.append(None if traced is None else [_dim_range(d, self.ep.range_constraints) for d in traced.shape])
        # the graph takes its inputs in the traced call's order: number them, then flatten as a call is
        args, kwargs = pytree.tree_unflatten(list(range(len(out))), self.ep.call_spec.in_spec)
        if self.boundary:  # it took the keyword inputs as one dict
            args, kwargs = (), args[0]
        return [out[i] for i in flatten(args, kwargs).leaves]


def _dim_range(dim, ranges) -> tuple[float, float]:
    """The sizes a traced dim takes: itself when static, its value range when symbolic."""
    if isinstance(dim, int):
        return dim, dim
    r = ranges.get(dim.node.expr)
    if r is None:  # an expression of other dims: export's own check decides
        return 0, math.inf
    return range_bound(r.lower, 0), range_bound(r.upper, math.inf)


def range_bound(value, infinite: float) -> float:
    """A symbolic range bound as an int; ``infinite`` when it is unbounded (sympy's ``oo``)."""
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return infinite


def trace(model: nn.Module, args: tuple, kwargs: dict, sig: Signature, boundary: Boundary | None = None) -> Trace:
    """Export ``model`` (or ``boundary``, a wrapper around it) on these inputs, batch and sequence dims dynamic.

    Raises:
        TraceError: naming the model, the inputs, the reason, and what to try.
    """
    if boundary is None and needs_boundary(model, kwargs):
        if args:
            raise TraceError(f"{type(model).__name__}: pass every input by keyword when passing "
                             f"{sorted(set(kwargs) - set(inspect.signature(model.forward).parameters))}")
        boundary = Boundary(model, nn.Module(), [])
    try:
        # float_view: 4-bit linears read as float ones, then point at their storage;
        # quiet: export's notes on the dims it specialised
        # and the model's own activation checkpointing off (peftc's graph pass does it instead)
        with float_view(model) as own_storage, quiet(["torch._export.non_strict_utils"], warnings=False), \
                _own_checkpointing_off(model):
            if boundary is not None:  # it takes the keyword inputs as one dict
                dynamic = ({k: pytree.tree_map(_dim_spec, v, is_leaf=_is_cache) for k, v in kwargs.items()},)
                ep = torch.export.export(boundary, (kwargs,), dynamic_shapes=dynamic, strict=False)
            else:
                dynamic = _dynamic_shapes(model, args, kwargs)
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
            own_storage(ep)
    except PeftcError:
        raise
    except Exception as e:
        raise TraceError(_explain(model, args, kwargs, e)) from e
    return Trace(ep, sig, tuple(kwargs), boundary.targets if boundary is not None else (), boundary is not None)


@contextlib.contextmanager
def _own_checkpointing_off(model: nn.Module):
    """transformers' layers with ``gradient_checkpointing`` set call ``torch.utils.checkpoint``
    themselves, which export can't trace: switch them off while tracing, back on after."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def _dim_spec(v):
    """Batch (dim 0) of every tensor input is dynamic, and so is the sequence (dim 1) of
    token-like inputs: integer tensors and tensors of rank 3 or more. A float matrix's
    dim 1 is its features, which the model fixes anyway. Every dim of a KV cache's
    tensors is dynamic (batch and capacity; export keeps heads and head size static)."""
    if isinstance(v, CacheInputs):
        return pytree.tree_map(lambda t: {d: Dim.AUTO for d in range(t.dim())} if t.dim() else None, v)
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return None
    has_sequence = v.dim() >= 3 or (v.dim() == 2 and not v.is_floating_point())
    return {d: Dim.AUTO for d in range(2 if has_sequence else 1)}


def _is_cache(v) -> bool:
    return isinstance(v, CacheInputs)


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
    first = first_line(error, 500)
    text = str(error)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        hint = ("the model's parameters are DTensor shards (torch's fully_shard, FSDP2), which export can't trace. "
                "Compile the unsharded model, then shard it with peftc.distributed.fully_shard(cm, mesh): "
                "it shards each layer and makes the graph gather the shards. With Accelerate's FSDP plugin, "
                "call it before accelerator.prepare(cm): Accelerate keeps a model that is sharded already")
    elif "Int8Params" in text or "Params4bit" in text or "attribute 'CB'" in text or "attribute 'SCB'" in text:
        hint = ("the model holds bitsandbytes-quantized weights outside the Linear4bit and Linear8bitLt layers "
                "peftc traces through (a custom quantized layer?). Load the model with "
                "BitsAndBytesConfig(load_in_4bit=True), or in float and compile it with quantize='nf4'")
    elif "data-dependent" in text or "GuardOnDataDependent" in type(error).__name__:
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
