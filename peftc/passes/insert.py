"""Insert adapter nodes after the ops at their sites.

Before and after, for a LoRA on one linear (see ``adapters/lora.py`` for the
nodes LoRA emits)::

    %y = aten.linear(%x, %W)              %y  = aten.linear(%x, %W)
    %z = aten.relu(%y)            ==>     %a  = aten.linear(%x, %peftc.default.fc.lora_A)
                                          ...
                                          %y2 = aten.add(%y, %d)
                                          %z  = aten.relu(%y2)

Every inserted node carries ``meta["peftc"] = adapter name``; the node that
replaces a site's output also carries ``meta["peftc_replaces"]``, so
:func:`strip_adapters` can undo the pass exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ..sites import Site, linear_use

STATE_ROOT = "peftc"  # attribute of the graph module that holds all adapter state


@dataclass
class Placement:
    """One adapter on one site.

    Attributes:
        site: where (module path, op, shapes, graph nodes).
        adapter: the adapter spec.
        adapter_name: which named adapter this belongs to (``"default"``).
        state: the site's parameters and buffers.
        target: the state's attribute path under the graph module's ``peftc``.
    """

    site: Site
    adapter: object
    adapter_name: str
    state: nn.Module
    target: str

    @property
    def path(self) -> str:
        return self.site.path

    @property
    def op(self) -> str:
        return self.site.op

    @property
    def nodes(self) -> list[str]:
        return self.site.nodes

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.state.parameters())

    def __str__(self):
        return f"{self.adapter_name}: {self.adapter!r} at {self.site}"


class Builder:
    """What an adapter's ``emit`` writes with: its input, output, state, and ops.

    Attributes:
        x: the site op's input node (the activation).
        y: the node holding the site's current output.
        state: the site's state module (read its shapes and dtypes).
        training: whether this graph is for training mode.
    """

    def __init__(self, graph: fx.Graph, anchor: fx.Node, x, y, placement: Placement, training: bool):
        self.graph, self.x, self.y = graph, x, y
        self.state, self.training = placement.state, training
        self._placement, self._last = placement, anchor
        self.created: set[fx.Node] = set()

    def _add(self, node: fx.Node) -> fx.Node:
        node.meta["peftc"] = self._placement.adapter_name
        self.created.add(node)
        self._last = node
        return node

    def param(self, name: str) -> fx.Node:
        """A node reading the state attribute ``name`` (a parameter or buffer)."""
        with self.graph.inserting_after(self._last):
            node = self.graph.get_attr(f"{STATE_ROOT}.{self._placement.target}.{name}")
        node.meta["peftc_dtype"] = getattr(self.state, name).dtype
        return self._add(node)

    def call(self, op, *args, **kwargs) -> fx.Node:
        """A node computing ``op(*args, **kwargs)``; ``op`` is an ATen overload."""
        with self.graph.inserting_after(self._last):
            node = self.graph.call_function(op, args, kwargs)
        dtypes = [dtype_of(a) for a in args if isinstance(a, fx.Node)]
        dtypes = [d for d in dtypes if d is not None]
        if dtypes:
            out = dtypes[0]
            for d in dtypes[1:]:
                out = torch.promote_types(out, d)
            node.meta["peftc_dtype"] = out
        return self._add(node)

    def cast(self, node: fx.Node, dtype: torch.dtype) -> fx.Node:
        """``node`` converted to ``dtype``; no node when it already is."""
        if dtype_of(node) in (dtype, None):
            return node
        out = self.call(torch.ops.aten.to.dtype, node, dtype)
        out.meta["peftc_dtype"] = dtype
        return out


def dtype_of(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    return node.meta.get("peftc_dtype")


def site_input(node: fx.Node):
    """The activation an op at a site consumes."""
    use = linear_use(node)
    return node.args[use.input_index] if use is not None else node.args[0]


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
            b = Builder(gm.graph, y, site_input(node), y, p, training)
            new = p.adapter.emit(b, p.site)
            new.meta["peftc_replaces"] = y
            y.replace_all_uses_with(new, delete_user_cb=lambda user, made=b.created: user not in made)
            current[name] = new
            count += 1
    gm.recompile()
    return count


def strip_adapters(gm: fx.GraphModule) -> int:
    """Delete every inserted node, rewiring users back to the original outputs."""
    made = [n for n in gm.graph.nodes if "peftc" in n.meta]
    for node in reversed(made):
        if "peftc_replaces" in node.meta:
            node.replace_all_uses_with(node.meta["peftc_replaces"])
    for node in reversed(made):
        gm.graph.erase_node(node)
    gm.recompile()
    return len(made)
