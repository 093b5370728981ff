"""FSDP2 through the graph: each sharded layer's nodes run inside a call of the layer module itself.

torch's ``fully_shard(layer)`` keeps a layer's parameters as DTensor shards and
hooks the layer's ``__call__``: before its forward it all-gathers them and sets
the full parameters on the layer's modules; after, it frees them again and
hooks the outputs, so that backward gathers them once more (and reduce-scatters
gradients). A traced graph never calls the layer, and reads its parameters from
its own containers, once, at the top.

This pass builds a graph that does both right. Each run of one sharded layer's
nodes moves into a region; the region reads that layer's parameters itself
(``get_attr``, resolved at call time on the user's live modules); and the outer
graph calls the region *through the layer*, so FSDP2's own hooks run around it.
Every other state read resolves on the live modules too (the root's parameters,
gathered by the root's hook before the graph runs; the adapters), except the
constants export lifted out of the model's code, which only the traced copies
of the modules hold::

    %w  = get_attr[model.layers.0.q.weight]            %A  = get_attr[peftc.adapters...lora_A]
    %A  = get_attr[peftc.adapters...lora_A]     ==>    %u0 = get_attr[shard_0]
    %q  = aten.linear(%h0, %w)  [layers.0]             %r0 = run_layer(%u0, %h0, %A)
    %a  = aten.linear(%h0, %A)  (LoRA)                 %h1 = getitem(%r0, 0)
    %h1 = aten.add(%q, %a)      [layers.0]
                                                       shard_0.region(%h0, %A):
                                                           %w  = get_attr[model.layers.0.q.weight]
                                                           %q  = aten.linear(%h0, %w) ...
                                                           return (%h1,)

``run_layer`` calls ``layer(*inputs)`` with the region standing in for the
layer's ``forward`` for that one call (:class:`LayerCall`). The call nodes keep
the layer's module stack, so activation checkpointing (applied after this
pass) recomputes them, FSDP2's hooks included, as it would an FSDP layer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from torch import fx, nn

from ..errors import PeftcError
from .builder import STATE_ROOT
from .derive import empty_like
from .regions import layer_of, layer_runs, map_outputs, region_graph

UNIT = "shard_{}"  # the name of run i's LayerCall in the returned graph module
CONSTANT = "constant_{}"  # the name of the i-th constant only the traced modules hold (never the live ones)


@dataclass(frozen=True, eq=False)
class Sharding:
    """Which layers FSDP2 shards, by module path, and the model they are in.

    Attributes:
        model: the user's model (its modules hold the shards; the graph reads through them).
        layers: module path -> the layer module ``fully_shard`` was applied to.
        gathered: a context in which every parameter is whole (unsharded), for tracing.
    """

    model: nn.Module
    layers: dict[str, nn.Module]
    gathered: Callable[[], AbstractContextManager]


class LayerCall(nn.Module):
    """A region of one layer's nodes, run as that layer's forward so its hooks (FSDP2's) run around it."""

    def __init__(self, layer: nn.Module, region: fx.GraphModule):
        super().__init__()
        self.region = region
        object.__setattr__(self, "layer", layer)  # not a child: its parameters are the model's

    def forward(self, *inputs):
        layer = self.layer
        object.__setattr__(layer, "forward", self.region.forward)  # shadows the class's forward, one call long
        try:
            return layer(*inputs)
        finally:
            object.__delattr__(layer, "forward")


def run_layer(unit: LayerCall, *inputs):
    """The outer graph's call of a region (a function, so checkpointing sees the node as the layer's)."""
    return unit(*inputs)


def sharded(gm: fx.GraphModule, plan: Sharding, prefix: str = "") -> fx.GraphModule:
    """A graph module computing what ``gm`` computes, reading every state through the live model
    and each of ``plan``'s layers through a call of that layer.

    Arguments:
        gm: an adapted graph; left unchanged.
        plan: the sharded layers.
        prefix: what module paths in ``gm`` carry in front of the model's own.

    Returns:
        A new graph module over the user's live modules and ``gm``'s adapter state,
        with a :class:`LayerCall` per run as submodules ``shard_0``, ...

    Raises:
        PeftcError: a layer's parameter read outside that layer's nodes (a weight tied
            across layers), which can't be gathered only while the layer runs.
    """
    layers = frozenset(plan.layers)
    runs = layer_runs(gm.graph, layers, prefix)
    owner = {n: _owner(n.target, layers, prefix) for n in gm.graph.nodes if n.op == "get_attr"}
    runs_of = {n: i for i, run in enumerate(runs) for n in run}
    for read, layer in owner.items():
        strays = [u for u in read.users if layer is not None and (u not in runs_of or
                                                                  _layer(runs[runs_of[u]], layers, prefix) != layer)]
        if strays:
            raise PeftcError(f"FSDP: {read.target} belongs to layer {layer}, but {strays[0].name} reads it outside "
                             f"that layer (a weight tied across layers?). Leave {layer} out of layers=, or untie it")
    holder = _live_holder(gm, plan.model, prefix)
    constants = _hold_constants(gm, holder)
    graph = empty_like(gm)
    env: dict[fx.Node, fx.Node] = {}
    last = {run[-1]: i for i, run in enumerate(runs)}
    for node in gm.graph.nodes:
        if node in last:
            i = last[node]
            layer = _layer(runs[i], layers, prefix)
            region = _outline(runs[i], {n for n, o in owner.items() if o == layer}, graph, env, UNIT.format(i))
            holder.add_module(UNIT.format(i), LayerCall(plan.layers[layer], _over(holder, region, constants)))
        elif node not in runs_of and owner.get(node) is None:
            env[node] = graph.node_copy(node, env.__getitem__)
    return _over(holder, graph, constants)


def _owner(target: str, layers: frozenset[str], prefix: str) -> str | None:
    """The sharded layer a state read's target lies under, if any."""
    path = target[len(prefix):] if prefix and target.startswith(prefix) else target
    return next((layer for layer in layers if path.startswith(layer + ".")), None)


def _layer(run: list[fx.Node], layers: frozenset[str], prefix: str) -> str:
    return next(here for n in run if (here := layer_of(n, layers, prefix)) is not None)


def _outline(run: list[fx.Node], owned: set[fx.Node], graph: fx.Graph, env: dict, name: str) -> fx.Graph:
    """Move ``run`` into a region graph that reads the ``owned`` state itself; call it from ``graph``
    through ``run_layer`` and map the run's outputs in ``env``."""
    sub, inputs, outputs = region_graph(run, frozenset(owned))  # owned reads: inside, after the hooks gathered
    call = graph.call_function(run_layer, (graph.get_attr(name), *(env[n] for n in inputs)))
    call.meta["nn_module_stack"] = dict(run[0].meta.get("nn_module_stack") or {})
    map_outputs(graph, call, outputs, env)
    return sub


def _live_holder(gm: fx.GraphModule, model: nn.Module, prefix: str) -> nn.Module:
    """A module whose top-level attributes are the *live* objects ``gm``'s state reads mean: the
    user's modules (which FSDP2 swaps shards and gathered parameters into), not ``gm``'s copies."""
    holder = nn.Module()
    for atom in {n.target.split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}:
        if prefix and atom == prefix.rstrip("."):
            live = model
        elif not prefix and atom != STATE_ROOT and hasattr(model, atom):
            live = getattr(model, atom)
        else:
            live = getattr(gm, atom)
        if isinstance(live, nn.Module):
            holder.add_module(atom, live)
        else:
            setattr(holder, atom, live)
    return holder


def _hold_constants(gm: fx.GraphModule, holder: nn.Module) -> dict[str, str]:
    """Give ``holder`` the tensors ``gm`` reads that the live modules lack: the constants export lifted
    out of a layer's code live only in ``gm``'s copies of the modules (the first generation step's
    ``DynamicCache`` makes its empty keys with ``torch.tensor([])`` inside each attention module:
    ``model.layers.0.self_attn.lifted_tensor_0``). Each is held flat, as ``CONSTANT.format(i)``.

    Returns:
        ``gm``'s target -> the name ``holder`` holds it by, for :func:`_over`.
    """
    targets = dict.fromkeys(n.target for n in gm.graph.nodes
                            if n.op == "get_attr" and _lookup(holder, n.target) is None)
    for i, target in enumerate(targets):
        setattr(holder, CONSTANT.format(i), _lookup(gm, target))
    return {target: CONSTANT.format(i) for i, target in enumerate(targets)}


def _lookup(module: nn.Module, target: str):
    """The object at dotted path ``target`` under ``module``, None if there is none."""
    obj = module
    for atom in target.split("."):
        obj = getattr(obj, atom, None)
        if obj is None:
            return None
    return obj


def _over(holder: nn.Module, graph: fx.Graph, constants: dict[str, str]) -> fx.GraphModule:
    """A graph module running ``graph`` over ``holder``'s children themselves (never copies), its
    reads of ``constants`` retargeted to where ``holder`` holds them."""
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in constants:
            node.target = constants[node.target]
    out = fx.GraphModule(holder, graph)
    used = {n.target.split(".")[0] for n in graph.nodes if n.op in ("get_attr", "call_module")}
    for name, child in holder.named_children():  # the constructor copied the containers: share them instead
        if name in used:
            out.add_module(name, child)
    return out
