"""modules_to_save: a module's parameter reads select its trainable copy when the adapter is active.

::

    %w = get_attr[classifier.weight]   ==>   %w  = get_attr[classifier.weight]
    %y = aten.linear(%x, %w)                 %c  = get_attr[peftc.saved.default.classifier.weight]
                                             %g  = get_attr[peftc.gates.default]
                                             %w2 = aten.where(%g, %c, %w)
                                             %y  = aten.linear(%x, %w2)

The original parameters stay frozen and untouched until ``merge`` copies the
trained values in (and ``unmerge`` puts the originals back). Inserted nodes are
tagged like the insert pass's, so ``strip_adapters`` removes them too.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .builder import META_ADAPTER, META_REPLACES, STATE_ROOT

aten = torch.ops.aten


def swap_params(gm: fx.GraphModule, copies: dict[str, nn.Module], name: str, model_prefix: str = "") -> int:
    """Make reads of ``copies``' modules select the copies while adapter ``name`` is active.

    Arguments:
        copies: ``{module path in the model: its trainable copy}``.
        name: the adapter the copies belong to (``peftc.saved.<name>``, ``peftc.gates.<name>``).
        model_prefix: what the graph's parameter names carry in front of the model's.

    Returns:
        How many parameter reads now select a copy.
    """
    moved = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or META_ADAPTER in node.meta:
            continue
        for path in copies:
            if not node.target.startswith(model_prefix + path + "."):
                continue
            rest = node.target[len(model_prefix + path) + 1:]
            current = _latest(node)
            with gm.graph.inserting_after(current):
                copy = gm.graph.get_attr(f"{STATE_ROOT}.saved.{name}.{path}.{rest}")
            with gm.graph.inserting_after(copy):
                gate = gm.graph.get_attr(f"{STATE_ROOT}.gates.{name}")
            with gm.graph.inserting_after(gate):
                chosen = gm.graph.call_function(aten.where.self, (gate, copy, current))
            for made in (copy, gate, chosen):
                made.meta[META_ADAPTER] = name
            chosen.meta[META_REPLACES] = current
            current.replace_all_uses_with(chosen, delete_user_cb=lambda user, c=chosen: user is not c)
            moved += 1
            break
    gm.recompile()
    return moved


def _latest(node: fx.Node) -> fx.Node:
    """The newest node standing for ``node``'s value (a copy selected by an earlier adapter)."""
    for user in node.users:
        if user.meta.get(META_REPLACES) is node:
            return _latest(user)
    return node
