"""What adapter kinds write with: :class:`Builder`, and the vocabulary of node metadata.

An adapter's ``emit(b, site)`` inserts nodes at one site through ``b``: reads of
its state (``b.param``), ATen calls (``b.call``), casts, and its gate
(``b.gated``/``b.gate``). Every node the builder makes is tagged, so the
insert pass can strip it again exactly:

===================  ===================================================================
``meta`` key          meaning
===================  ===================================================================
``peftc``            made by peftc for the adapter of this name (every inserted node)
``peftc_replaces``   this node stands for that original output (rewire back on strip)
``peftc_inputs``     this op's original ``(args, kwargs)`` before an adapter rewired them
``peftc_dtype``      the dtype of a node that has no ``val`` (inserted nodes)
``peftc_ndim``       the rank of a node that has no ``val``
``peftc_bias``       a bias read that merge wired into a bias-less linear
===================  ===================================================================

All adapter state hangs under the graph module's ``peftc`` attribute
(:data:`STATE_ROOT`): ``peftc.adapters.<name>.<key>``, ``peftc.saved.<name>...``
and ``peftc.gates.<name>``.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from ..sites import linear_use

if TYPE_CHECKING:
    from ..state import Placement

STATE_ROOT = "peftc"  # attribute of the graph module that holds all adapter state
META_ADAPTER = "peftc"
META_REPLACES = "peftc_replaces"
META_INPUTS = "peftc_inputs"
META_DTYPE = "peftc_dtype"
META_NDIM = "peftc_ndim"
META_BIAS = "peftc_bias"

aten = torch.ops.aten


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
        node.meta[META_ADAPTER] = self._placement.adapter_name
        self.created.add(node)
        self._last = node
        return node

    def param(self, name: str) -> fx.Node:
        """A node reading the state's parameter or buffer ``name`` (dotted for submodules)."""
        with self.graph.inserting_after(self._last):
            node = self.graph.get_attr(f"{STATE_ROOT}.{self._placement.target}.{name}")
        module_path, _, attr = name.rpartition(".")
        node.meta[META_DTYPE] = getattr(self.state.get_submodule(module_path), attr).dtype
        return self._add(node)

    def state_reads(self) -> list[fx.Node]:
        """The graph's own reads of this placement's state that something uses: what an input
        rewrite traced (none in a graph traced without it). Unlike :meth:`param`, this makes no node."""
        root = f"{STATE_ROOT}.{self._placement.target}."
        return [n for n in self.graph.nodes if n.op == "get_attr" and n.target.startswith(root)
                and META_ADAPTER not in n.meta and n.users]

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
            node.meta[META_DTYPE] = out
        return self._add(node)

    def cast(self, node: fx.Node, dtype: torch.dtype) -> fx.Node:
        """``node`` converted to ``dtype``; no node when it already is."""
        if dtype_of(node) in (dtype, None):
            return node
        out = self.call(torch.ops.aten.to.dtype, node, dtype)
        out.meta[META_DTYPE] = dtype
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
        out.meta[META_NDIM] = ndim
        return out

    def gated(self, value: fx.Node, like: fx.Node, ndim: int | None = None) -> fx.Node:
        """``value`` where the adapter is on and 0 where it is off, per row of ``like``.

        A kind with ``gates_itself = True`` *adds* this to an activation instead of
        letting peftc select whole outputs: gating a bias costs a few elements
        instead of a full activation, and ``where`` selects, so NaN or inf in an
        inactive adapter's value never passes. Never *multiply* an activation by
        a gated value: ``NaN * 0`` is NaN, so an inactive adapter's non-finite
        values would reach the output; leave ``gates_itself`` off instead."""
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
            node = self.graph.get_attr(f"{STATE_ROOT}.gates.{self._placement.home}")
        node.meta[META_DTYPE] = torch.bool
        return self._add(node)

    def replace_input(self, index: int, value, name: str | None = None) -> None:
        """Rewire the op's input ``index`` (keyword ``name`` when not given positionally).

        For a gated kind the new input is selected by the adapter's gate."""
        old = self.arg(index, name)
        kind = self._placement.adapter
        if kind.gated and not kind.gates_itself and isinstance(value, fx.Node) and isinstance(old, fx.Node):
            value = self.gate(value, old)
        self.node.meta.setdefault(META_INPUTS, (self.node.args, dict(self.node.kwargs)))
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
    return node.meta.get(META_DTYPE)


def ndim_of(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    if META_NDIM in node.meta:
        return node.meta[META_NDIM]
    raise ValueError(f"peftc can't tell the rank of {node.format_node()}; gate a node with known shape")


def site_input(node: fx.Node):
    """The activation an op at a site consumes (None at a weight read: an expert stack's)."""
    use = linear_use(node)
    return node.args[use.input_index] if use is not None else (node.args[0] if node.args else None)
