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

fx also keeps the Python source of every ``recompile`` (for tracebacks), in a
process-wide cache it never empties: a rebuild recompiles each graph a few
times, so a service that merges and unmerges would grow by the graphs' source
text each cycle. :func:`forget_sources` drops the sources no graph runs any
more.
"""

from __future__ import annotations

import copy
import linecache
from collections.abc import Iterable

from torch import fx, nn
from torch.fx import graph_module as fx_graph_module


def compact(gm: fx.GraphModule) -> None:
    """Replace ``gm``'s graph by a copy holding only its live nodes (same names, same code)."""
    gm.graph = copy.deepcopy(gm.graph)  # fx.Graph's deepcopy copies node by node into a new namespace


def sources() -> set[str]:
    """The keys (dummy file names) of the generated sources fx holds now."""
    return set(fx_graph_module._loader.eval_cache)  # fx's loader: no public way to release its entries


def sources_run_by(modules: Iterable) -> set[str]:
    """The source keys the graph modules among ``modules`` (and their submodules) run."""
    return {type(sub).forward.__code__.co_filename for m in modules if isinstance(m, nn.Module)
            for sub in m.modules() if isinstance(sub, fx.GraphModule)}


def forget_sources(keys: Iterable[str]) -> None:
    """Drop these generated sources from fx's cache and ``linecache`` (their code still runs;
    only a traceback through it would show no source line)."""
    for key in keys:
        fx_graph_module._loader.eval_cache.pop(key, None)
        linecache.cache.pop(key, None)
