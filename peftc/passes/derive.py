"""Infrastructure for passes that leave their input alone: a new graph module over the same state.

A lowering-time pass (checkpointing, input gradients) builds a new graph from
an adapted one instead of editing it, so the adapted graph stays what the
adapter passes insert into and strip from. The new graph module must read the
*same* state as the old one: ``fx.GraphModule(gm, graph)`` would copy the
containers along each ``get_attr`` path, and a state tensor re-registered
later (a gate resized for a mixed batch) would be missed by the copy.
"""

from __future__ import annotations

from torch import fx, nn


def empty_like(gm: fx.GraphModule) -> fx.Graph:
    """An empty graph with ``gm``'s calling convention (pytree inputs and outputs)."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    return graph


def over_state(gm: fx.GraphModule, graph: fx.Graph, modules: dict[str, nn.Module] | None = None) -> fx.GraphModule:
    """A graph module running ``graph`` over ``gm``'s own state modules (shared, never copied),
    with ``modules`` added as submodules by name."""
    holder = nn.Module()
    for atom in {n.target.split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}:
        setattr(holder, atom, getattr(gm, atom))
    for name, module in (modules or {}).items():
        holder.add_module(name, module)
    out = fx.GraphModule(holder, graph)
    for name, child in holder.named_children():  # the constructor copied the containers: share them instead
        out.add_module(name, child)
    return out


def copied(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm``'s graph in a new graph module over ``gm``'s state, for a pass to edit in place."""
    graph = empty_like(gm)
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    return over_state(gm, graph)
