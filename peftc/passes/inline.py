"""Inline the grad-mode regions export wraps in higher-order ops.

Export puts ``torch.no_grad()`` regions of a training graph (the rotary
embedding of Llama, for one) into ``wrap_with_set_grad_enabled`` calls on a
submodule. ``torch.compile(fullgraph=True)`` can't trace those, and their ops
are hidden from site matching, so they are inlined between explicit switches::

    %w  = wrap_with_set_grad_enabled(False, %submod, %a)    %prev = torch.is_grad_enabled()
    %o0 = getitem(%w, 0)                           ==>      torch._C._set_grad_enabled(False)
                                                            ...submod's nodes on %a...
                                                            torch._C._set_grad_enabled(%prev)
"""

from __future__ import annotations

import operator

import torch
from torch import fx


def inline_grad_regions(gm: fx.GraphModule) -> int:
    """Inline every ``wrap_with_set_grad_enabled`` call; return how many."""
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    count = 0
    for node in list(gm.graph.nodes):
        if hop is None or node.op != "call_function" or node.target is not hop:
            continue
        enabled, sub_node, *operands = node.args
        sub = getattr(gm, sub_node.target)
        graph = gm.graph
        with graph.inserting_before(node):
            prev = graph.call_function(torch.is_grad_enabled)
            graph.call_function(torch._C._set_grad_enabled, (enabled,))
            env: dict[fx.Node, object] = {}
            placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
            env.update(zip(placeholders, operands, strict=True))
            outputs = None
            for inner in sub.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    outputs = fx.map_arg(inner.args[0], env.__getitem__)
                    continue
                env[inner] = graph.node_copy(inner, env.__getitem__)
            graph.call_function(torch._C._set_grad_enabled, (prev,))
        for user in list(node.users):
            assert user.target is operator.getitem, "grad region outputs are read with getitem"
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not sub_node.users:
            graph.erase_node(sub_node)
            delattr(gm, sub_node.target)
        count += 1
    if count:
        gm.recompile()
    return count
