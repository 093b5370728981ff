"""Give a graph module a fresh copy of its graph, so that the nodes erased from it are freed.

An ``fx.Graph`` remembers every name it ever handed out, with the node that
holds it, so that no two nodes share a name; erasing a node does not forget
it. A graph that adapters are inserted into and stripped out of again on every
``merge``/``unmerge``/``add_adapter``/``delete_adapter`` would keep every node
it ever held alive (a few hundred a cycle). Copying the graph node by node
gives it a namespace of the live nodes only; the old graph, and every erased
node with it, is then garbage::

    graph (live: x, W, y, out; named before: lora_a, lora_b, mul, add, where, ...)
                               ==>
    graph (live: x, W, y, out; named: x, W, y, out)

The copy keeps each node's name, ``meta`` (shallow: fake values are shared)
and the graph's code generator (an export graph's input and output spec).
"""

from __future__ import annotations

import copy

from torch import fx


def compact(gm: fx.GraphModule) -> None:
    """Replace ``gm``'s graph by a copy holding only its live nodes (same names, same code)."""
    gm.graph = copy.deepcopy(gm.graph)  # fx.Graph's deepcopy copies node by node into a new namespace
