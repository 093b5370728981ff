"""Activation checkpointing as a graph pass: each layer's nodes run again in backward.

A traced training graph is one straight line of ATen ops; every node still
knows the module it ran in (``meta["nn_module_stack"]``). This pass cuts the
line into regions, one per run of nodes from a checkpointed layer (by default
the modules transformers marks as ``GradientCheckpointingLayer``: the decoder
layers), moves each region into a submodule of its own, and calls it through
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. Backward keeps
only each region's inputs and recomputes the rest; ``torch.compile`` lowers
the call to a ``tag_activation_checkpoint`` region and recomputes it too.

Before and after, for a layer ``model.layers.0`` with LoRA on one linear::

    %h1 = aten.mul(%h0, %w_norm)        [layers.0]      %w_norm = get_attr[model.layers.0.norm.weight]
    %q  = aten.linear(%h1, %Wq)         [layers.0]      %A      = get_attr[peftc.adapters.default...lora_A]
    %A  = get_attr[peftc...lora_A]              ==>     %c0     = get_attr[checkpoint_0]
    %a  = aten.linear(%h1, %A)          (LoRA)          %r0     = checkpoint(%c0, %h0, %w_norm, %Wq, %A, ...,
    ...                                                                      use_reentrant=False)
    %h2 = aten.add(%h0, %o)             [layers.0]      %h2     = getitem(%r0, 0)
    %h3 = aten.mul(%h2, %w_norm1)       [layers.1]      ...

    checkpoint_0(%h0, %w_norm, %Wq, %A, ...):
        %h1 = aten.mul(%h0, %w_norm)
        ...
        return (%h2,)

State reads (``get_attr``) stay in the outer graph and enter a region as
arguments, so a region holds no state of its own: adapters switched, added or
merged change the outer graph module's state, which the regions read through
their arguments. Nodes peftc inserted (adapters, which carry no module stack)
belong to the region around them. The input graph is left as it is: the pass
returns a new graph module that shares the input's state modules.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from ..errors import PeftcError
from .derive import empty_like, over_state
from .regions import layer_runs, map_outputs, region_graph

# ``torch.utils.checkpoint.checkpoint``'s own options; any other keyword it would pass to the region.
CHECKPOINT_OPTIONS = frozenset({"use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug",
                                "early_stop"})
REGION = "checkpoint_{}"  # the name of region i's submodule in the returned graph module


@dataclass(frozen=True)
class Checkpointing:
    """Which layers to checkpoint and how.

    Attributes:
        layers: the module paths (as the user's model names them) whose nodes each form a region.
        options: keyword arguments for ``torch.utils.checkpoint.checkpoint``.
    """

    layers: frozenset[str]
    options: dict = field(default_factory=dict)


def plan(model: nn.Module, options: dict | None = None, every_n_layers: int = 1,
         layers: str | None = None) -> Checkpointing:
    """Checkpoint the layers of ``model`` as transformers' ``activation_checkpointing_enable`` would.

    Arguments:
        options: for ``torch.utils.checkpoint.checkpoint`` (transformers'
            ``activation_checkpointing_kwargs``). ``use_reentrant=True`` is run
            non-reentrant (same gradients; the graph needs no inputs that require grad).
        every_n_layers: checkpoint layers 0, n, 2n, ... and keep the others' activations.
        layers: a regular expression over module paths choosing the layers instead
            of the ``GradientCheckpointingLayer`` modules (a model without them needs one).

    Raises:
        PeftcError: an option ``checkpoint`` doesn't take, a bad ``every_n_layers``,
            or no layer to checkpoint.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - CHECKPOINT_OPTIONS)
    if unknown:
        raise PeftcError(f"activation checkpointing options {unknown} are not torch.utils.checkpoint.checkpoint's "
                         f"options {sorted(CHECKPOINT_OPTIONS)}; remove them")
    if options.pop("use_reentrant", False):
        warnings.warn("peftc checkpoints its graph's layers non-reentrantly (use_reentrant=False): the "
                      "gradients are the same, and no input needs requires_grad", stacklevel=3)
    if not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise PeftcError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
    found = _layers(model, layers)
    if not found:
        how = (f"no module path matches layers={layers!r}" if layers is not None else
               f"{type(model).__name__} has no GradientCheckpointingLayer modules")
        raise PeftcError(f"activation checkpointing found no layer to checkpoint: {how}; pass layers=<a regular "
                         r"expression over module paths>, such as layers=r'model\.layers\.\d+'")
    return Checkpointing(frozenset(found[::every_n_layers]), options)


def checkpointed(gm: fx.GraphModule, plan: Checkpointing, prefix: str = "") -> fx.GraphModule:
    """A graph module computing what ``gm`` computes, each of ``plan``'s layers in a checkpointed region.

    Arguments:
        gm: an adapted training graph; left unchanged.
        plan: the layers and the options for ``checkpoint``.
        prefix: what module paths in ``gm`` carry in front of the model's own.

    Returns:
        A new graph module sharing ``gm``'s state modules (parameters, buffers,
        adapter state), with the regions as submodules ``checkpoint_0``, ...;
        ``gm`` itself when no node ran in a checkpointed layer.
    """
    runs = layer_runs(gm.graph, plan.layers, prefix)
    if not runs:
        return gm
    last = {run[-1]: i for i, run in enumerate(runs)}
    inside = {n for run in runs for n in run}
    graph = empty_like(gm)
    env: dict[fx.Node, fx.Node] = {}
    regions = {}
    for node in gm.graph.nodes:
        if node in last:
            i = last[node]
            regions[REGION.format(i)] = _outline(graph, runs[i], env, REGION.format(i), plan.options)
        elif node not in inside:
            env[node] = graph.node_copy(node, env.__getitem__)
    return over_state(gm, graph, regions)


def _layers(model: nn.Module, pattern: str | None) -> list[str]:
    """The outermost modules to checkpoint, in module order."""
    # transformers' modeling code takes seconds to import: only when asked
    from transformers.modeling_layers import GradientCheckpointingLayer

    chosen: list[str] = []
    for name, module in model.named_modules():
        if pattern is not None:
            hit = bool(name) and re.fullmatch(pattern, name) is not None
        else:
            hit = isinstance(module, GradientCheckpointingLayer)
        if hit and not any(name.startswith(outer + ".") for outer in chosen):
            chosen.append(name)
    return chosen


def _outline(graph: fx.Graph, run: list[fx.Node], env: dict, name: str,
             options: dict) -> fx.GraphModule:
    """Move ``run`` into a graph module called through ``checkpoint`` from ``graph``; map its outputs in ``env``."""
    sub, inputs, outputs = region_graph(run)
    region = fx.GraphModule(nn.Module(), sub, class_name=name)
    fn = graph.get_attr(name)
    call = graph.call_function(checkpoint, (fn, *(env[n] for n in inputs)), {**options, "use_reentrant": False})
    map_outputs(graph, call, outputs, env)
    return region

