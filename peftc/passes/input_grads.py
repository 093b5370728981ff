"""Make the input embeddings' output require grad, as transformers' ``enable_input_require_grads`` does.

transformers hooks the embedding module; a traced graph calls no module, so
the hook becomes a node after the module's last op::

    %e = aten.embedding(%W, %ids)  [model.embed_tokens]     %e  = aten.embedding(%W, %ids)
    %h = aten.mul(%e, %s)                            ==>    %e2 = require_grad(%e)
                                                            %h  = aten.mul(%e2, %s)

``torch.compile`` can't return a tensor made to require grad inside its graph,
so this is for graphs run as they are (``backend="eager"``). The input graph is
left as it is: the pass returns a new graph module over the same state.
"""

from __future__ import annotations

import torch
from torch import fx

from ..sites import module_path
from .derive import empty_like, over_state


def require_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``, made to require grad (transformers' hook: ``output.requires_grad_(True)``)."""
    return x.requires_grad_(True)


def requiring_input_grads(gm: fx.GraphModule, embeddings: str, prefix: str = "") -> fx.GraphModule:
    """A graph module computing what ``gm`` computes, with module ``embeddings``'s outputs requiring grad.

    Arguments:
        embeddings: the input embeddings' module path, as the user's model names it.
        prefix: what module paths in ``gm`` carry in front of the model's own.

    Returns:
        A new graph module over ``gm``'s state; ``gm`` itself when no node ran in ``embeddings``.
    """
    outputs = _outputs(gm.graph, prefix + embeddings)
    if not outputs:
        return gm
    graph = empty_like(gm)
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
        if node in outputs:
            env[node] = graph.call_function(require_grad, (env[node],))
            env[node].meta = dict(node.meta)
    return over_state(gm, graph)


def _outputs(graph: fx.Graph, path: str) -> set[fx.Node]:
    """The floating-point nodes of ``path``'s calls that are read outside them: its outputs."""
    inside = {n for n in graph.nodes if module_path(n) == path}
    return {n for n in inside
            if isinstance(v := n.meta.get("val"), torch.Tensor) and v.is_floating_point()
            and any(user not in inside for user in n.users)}
