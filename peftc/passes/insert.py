"""Insert adapter nodes at their sites, and strip them out again.

Before and after, for a LoRA on one linear (see ``adapters/lora.py`` for the
nodes LoRA emits)::

    %y = aten.linear(%x, %W)              %y  = aten.linear(%x, %W)
    %z = aten.relu(%y)            ==>     %a  = aten.linear(%x, %peftc.adapters.default.fc.lora_A)
                                          ...
                                          %y2 = aten.add(%y, %d)
                                          %z  = aten.relu(%y2)

An adapter kind with ``position = "before"`` (IA³ on feed-forward layers) emits its nodes in
front of the op and rewires the op's inputs instead.

Each adapter's effect is selected by its gate, a boolean tensor per adapter
(``peftc.gates.<name>``): ``aten.where(gate, adapted, original)``, with the
gate repeated over the rows of the op's output, so one adapter can serve some
batch rows and another the rest. ``where`` picks exactly one side, so an
active adapter's output is bit-identical to an ungated one.

Every inserted node carries ``meta["peftc"] = adapter name``; a node that
replaces a site's output carries ``meta["peftc_replaces"]``, and a rewired op
carries its original inputs in ``meta["peftc_inputs"]`` (see
:mod:`peftc.passes.builder`), so :func:`strip_adapters` undoes the pass exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from ..sites import Site
from .builder import META_ADAPTER, META_INPUTS, META_NDIM, META_REPLACES, Builder, ndim_of

if TYPE_CHECKING:
    from ..state import Placement


def insert_adapters(gm: fx.GraphModule, placements: list[Placement], sites: dict[str, Site],
                    training: bool) -> int:
    """Insert every placement's nodes; return how many site nodes were adapted.

    Arguments:
        sites: this graph's sites by weight path. A graph traced for another
            input signature has its own node names, so placements are found
            again by the weight they adapt; one whose weight this graph never
            reads is skipped.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    current: dict[str, fx.Node] = {}
    count = 0
    for p in placements:
        here = sites.get(p.site.weight_path)
        for name in here.nodes if here is not None else ():
            node = nodes[name]
            y = current.get(name, node)
            anchor = node.prev if p.adapter.position == "before" else y
            b = Builder(gm.graph, node, anchor, y, p, training)
            new = p.adapter.emit(b, here)
            if new is not y and p.adapter.gated and not p.adapter.gates_itself_at(here):
                new = b.gate(new, y)
            if new is not y:
                new.meta[META_REPLACES] = y
                new.meta.setdefault(META_NDIM, ndim_of(y))  # same shape as the output it replaces
                y.replace_all_uses_with(new, delete_user_cb=lambda user, made=b.created: user not in made)
                current[name] = new
            count += 1
    gm.recompile()
    return count


def strip_adapters(gm: fx.GraphModule) -> int:
    """Delete every inserted node, rewiring users back to the original outputs and inputs."""
    made = [n for n in gm.graph.nodes if META_ADAPTER in n.meta]
    for node in gm.graph.nodes:
        if META_INPUTS in node.meta:
            node.args, node.kwargs = node.meta.pop(META_INPUTS)
    for node in reversed(made):
        if META_REPLACES in node.meta:
            node.replace_all_uses_with(node.meta[META_REPLACES])
    for node in reversed(made):
        gm.graph.erase_node(node)
    gm.recompile()
    return len(made)
