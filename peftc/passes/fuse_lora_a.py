"""Horizontal fusion of adapter projections that read the same input: one matmul, then split.

The q, k and v projections of a layer (and gate and up) read one activation;
LoRA on each computes its own ``x @ A.T``. This pass concatenates the ``A``
weights (any ranks) and runs one linear, which reads ``x`` once and, in
backward, gives ``x`` its gradient in one matmul instead of one per site::

    %a_q = aten.linear(%xg_q, %A_q)             %cat = aten.cat([%A_q, %A_k, %A_v])
    %a_k = aten.linear(%xg_k, %A_k)      ==>    %a   = aten.linear(%xg_q, %cat)
    %a_v = aten.linear(%xg_v, %A_v)             %s   = aten.split_with_sizes(%a, [r_q, r_k, r_v], -1)
                                                %a_q = getitem(%s, 0)  ...

"The same input" is decided by value numbering over the nodes peftc
inserted: in a training graph each site selects its input by its adapter's
gate (``where(gate, x, 0)``), and these selections are equal node for node
for the sites of one adapter, so they fuse; different adapters (other gates)
don't. A random op (dropout) is never equal to another, so LoRA with
dropout is left as it is. Only adapter linears without bias whose weight is
state (``get_attr``) fuse. The input graph is left as it is: the pass
returns a new graph module over the same state.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .builder import META_ADAPTER
from .derive import copied

aten = torch.ops.aten


def fuse_lora_a(gm: fx.GraphModule) -> fx.GraphModule:
    """A graph module computing what ``gm`` does, with adapter linears that share an input fused.

    Returns:
        A new graph module over ``gm``'s state; ``gm`` itself when no two linears share an input.
    """
    if not _groups(gm.graph):
        return gm
    gm = copied(gm)
    graph = gm.graph
    for group in _groups(graph):
        first = group[0]
        weights = [_state_tensor(gm, n.args[1].target) for n in group]
        with graph.inserting_before(first):
            reads = [graph.get_attr(n.args[1].target) for n in group]
            cat = graph.call_function(aten.cat.default, (reads, 0))
            fused = graph.call_function(aten.linear.default, (first.args[0], cat))
            split = graph.call_function(aten.split_with_sizes.default, (fused, [w.shape[0] for w in weights], -1))
            parts = [graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
        for node in (*reads, cat, fused, split, *parts):
            node.meta[META_ADAPTER] = first.meta[META_ADAPTER]
        for node, part in zip(group, parts, strict=True):
            node.replace_all_uses_with(part)
            graph.erase_node(node)
    for node in reversed(graph.nodes):  # the other sites' input selections, now unread
        if META_ADAPTER in node.meta and not node.users and node.op != "output":
            graph.erase_node(node)
    gm.recompile()
    return gm


def _state_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` of ``target`` reads."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _groups(graph: fx.Graph) -> list[list[fx.Node]]:
    """Adapter linears (no bias, state weight) by the value of their input; groups of two or more,
    each in graph order."""
    numbers: dict[fx.Node, object] = {}
    groups: dict[object, list[fx.Node]] = {}
    for node in graph.nodes:
        numbers[node] = _number(node, numbers)
        if (node.target is aten.linear.default and META_ADAPTER in node.meta and len(node.args) == 2
                and not node.kwargs and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr"
                and isinstance(node.args[0], fx.Node)):
            groups.setdefault(numbers[node.args[0]], []).append(node)
    return [g for g in groups.values() if len(g) > 1]


def _number(node: fx.Node, numbers: dict) -> object:
    """A key equal for nodes that compute the same value: inserted, deterministic ops on equal inputs."""
    if META_ADAPTER not in node.meta:
        return node
    if node.op == "get_attr":
        return ("get_attr", node.target)
    if node.op != "call_function" or (isinstance(node.target, torch._ops.OpOverload)
                                       and torch.Tag.nondeterministic_seeded in node.target.tags):
        return node
    args = fx.node.map_aggregate((node.args, tuple(sorted(node.kwargs.items()))),
                                 lambda a: numbers[a] if isinstance(a, fx.Node) else a)
    return (node.target, _hashable(args))


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value
