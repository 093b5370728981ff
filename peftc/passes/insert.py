"""Insert adapter nodes at their sites, and strip them out again.

Before and after, for a LoRA on one linear (see ``adapters/lora.py`` for the
nodes LoRA emits)::

    %y = aten.linear(%x, %W)              %y  = aten.linear(%x, %W)
    %z = aten.relu(%y)            ==>     %a  = aten.linear(%x, %peftc.adapters.default.fc.lora_A)
                                          ...
                                          %y2 = aten.add(%y, %d)
                                          %z  = aten.relu(%y2)

An adapter kind with ``position = "before"`` (prefix tuning) emits its nodes in
front of the op and rewires the op's inputs instead.

Each adapter's effect is selected by its gate, a boolean tensor per adapter
(``peftc.gates.<name>``): ``aten.where(gate, adapted, original)``, with the
gate repeated over the rows of the op's output, so one adapter can serve some
batch rows and another the rest. ``where`` picks exactly one side, so an
active adapter's output is bit-identical to an ungated one.

Every inserted node carries ``meta["peftc"] = adapter name``; a node that
replaces a site's output carries ``meta["peftc_replaces"]``, and a rewired op
carries its original inputs in ``meta["peftc_inputs"]``, so
:func:`strip_adapters` undoes the pass exactly.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..sites import Site, linear_use

STATE_ROOT = "peftc"  # attribute of the graph module that holds all adapter state
aten = torch.ops.aten


@dataclass
class Placement:
    """One adapter on one site.

    Attributes:
        site: where (module path, op, shapes, graph nodes).
        adapter: the adapter spec.
        adapter_name: which named adapter this belongs to (``"default"``).
        state: the site's parameters and buffers (shared between sites for some kinds).
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
    def key(self) -> str:
        """Where the state lives under ``peftc.adapters.<name>`` and, for PEFT, on disk."""
        return self.target.split(".", 2)[2]

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
    """What an adapter's ``emit`` writes with: the op, its input and output, state, and ops.

    Attributes:
        node: the site's op node.
        x: the op's input node (the activation).
        y: the node holding the op's current output.
        state: the site's state module (read its shapes and dtypes).
        training: whether this graph is for training mode.
    """

    def __init__(self, graph: fx.Graph, node: fx.Node, anchor: fx.Node, y: fx.Node,
                 placement: Placement, training: bool):
        self.graph, self.node, self.x, self.y = graph, node, site_input(node), y
        self.state, self.training = placement.state, training
        self._placement, self._last = placement, anchor
        self.created: set[fx.Node] = set()

    def _add(self, node: fx.Node) -> fx.Node:
        node.meta["peftc"] = self._placement.adapter_name
        self.created.add(node)
        self._last = node
        return node

    def param(self, name: str) -> fx.Node:
        """A node reading the state's parameter or buffer ``name`` (dotted for submodules)."""
        with self.graph.inserting_after(self._last):
            node = self.graph.get_attr(f"{STATE_ROOT}.{self._placement.target}.{name}")
        module_path, _, attr = name.rpartition(".")
        node.meta["peftc_dtype"] = getattr(self.state.get_submodule(module_path), attr).dtype
        return self._add(node)

    def call(self, op, *args, **kwargs) -> fx.Node:
        """A node computing ``op(*args, **kwargs)``; ``op`` is an ATen overload."""
        with self.graph.inserting_after(self._last):
            node = self.graph.call_function(op, args, kwargs)
        inputs: list[fx.Node] = []
        fx.node.map_arg((args, kwargs), lambda n: inputs.append(n) or n)
        dtypes = [d for n in inputs if (d := dtype_of(n)) is not None]
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

    def dtype_of(self, node: fx.Node) -> torch.dtype | None:
        return dtype_of(node)

    def arg(self, index: int, name: str | None = None):
        """The op's input at position ``index`` (or keyword ``name``); None when absent."""
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name) if name else None

    def gate(self, adapted: fx.Node, original: fx.Node) -> fx.Node:
        """``where(gate, adapted, original)``, the gate repeated over ``original``'s rows."""
        ndim = ndim_of(original)
        out = self.call(aten.where.self, self.row_mask(original, ndim), adapted, original)
        out.meta["peftc_ndim"] = ndim
        return out

    def gated(self, value: fx.Node, like: fx.Node, ndim: int | None = None) -> fx.Node:
        """``value`` where the adapter is on and 0 where it is off, per row of ``like``.

        A kind with ``gates_itself = True`` multiplies or adds this instead of
        letting peftc select whole outputs: gating a scale or a bias costs a few
        elements instead of a full activation."""
        return self.call(aten.where.ScalarOther, self.row_mask(like, ndim), value, 0)

    def row_mask(self, like: fx.Node, ndim: int | None = None) -> fx.Node:
        """The gate as a ``[rows, 1, ...]`` mask over ``like``'s first dim."""
        gate = self.graph_gate()
        rows = self.call(aten.sym_size.int, like, 0)
        per = self.call(operator.floordiv, rows, self.call(aten.sym_size.int, gate, 0))
        mask = self.call(aten.repeat_interleave.self_int, gate, per)
        ndim = ndim if ndim is not None else ndim_of(like)
        return self.call(aten.view.default, mask, [-1] + [1] * (ndim - 1))

    def graph_gate(self) -> fx.Node:
        with self.graph.inserting_after(self._last):
            node = self.graph.get_attr(f"{STATE_ROOT}.gates.{self._placement.adapter_name}")
        node.meta["peftc_dtype"] = torch.bool
        return self._add(node)

    def replace_input(self, index: int, value, name: str | None = None) -> None:
        """Rewire the op's input ``index`` (keyword ``name`` when not given positionally).

        For a gated kind the new input is selected by the adapter's gate."""
        old = self.arg(index, name)
        kind = self._placement.adapter
        if kind.gated and not kind.gates_itself and isinstance(value, fx.Node) and isinstance(old, fx.Node):
            value = self.gate(value, old)
        self.node.meta.setdefault("peftc_inputs", (self.node.args, dict(self.node.kwargs)))
        if index < len(self.node.args) or name is None:
            args = list(self.node.args)
            args[index] = value
            self.node.args = tuple(args)
        else:
            self.node.kwargs = {**self.node.kwargs, name: value}


def dtype_of(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    return node.meta.get("peftc_dtype")


def ndim_of(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    if "peftc_ndim" in node.meta:
        return node.meta["peftc_ndim"]
    raise ValueError(f"peftc can't tell the rank of {node.format_node()}; gate a node with known shape")


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
            anchor = node.prev if p.adapter.position == "before" else y
            b = Builder(gm.graph, node, anchor, y, p, training)
            new = p.adapter.emit(b, here)
            if new is not y and p.adapter.gated and not p.adapter.gates_itself:
                new = b.gate(new, y)
            if new is not y:
                new.meta["peftc_replaces"] = y
                new.meta.setdefault("peftc_ndim", ndim_of(y))  # same shape as the output it replaces
                y.replace_all_uses_with(new, delete_user_cb=lambda user, made=b.created: user not in made)
                current[name] = new
            count += 1
    gm.recompile()
    return count


def strip_adapters(gm: fx.GraphModule) -> int:
    """Delete every inserted node, rewiring users back to the original outputs and inputs."""
    made = [n for n in gm.graph.nodes if "peftc" in n.meta]
    for node in gm.graph.nodes:
        if "peftc_inputs" in node.meta:
            node.args, node.kwargs = node.meta.pop("peftc_inputs")
    for node in reversed(made):
        if "peftc_replaces" in node.meta:
            node.replace_all_uses_with(node.meta["peftc_replaces"])
    for node in reversed(made):
        gm.graph.erase_node(node)
    gm.recompile()
    return len(made)
