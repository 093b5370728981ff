"""Which nodes of a graph ran in which layer: the runs that layer-wise passes (checkpointing,
sharding) move into regions of their own.

A traced graph is one straight line of ATen ops, each node knowing the modules
it ran in (``meta["nn_module_stack"]``). :func:`layer_runs` cuts the line into
maximal runs of one layer's nodes::

    %w  = get_attr[model.layers.0.q.weight]      (never in a run)
    %q  = aten.linear(%h0, %w)     [layers.0]    ─┐
    %a  = aten.linear(%h0, %A)     (LoRA)         │ run 0: model.layers.0
    %h1 = aten.add(%q, %a)         [layers.0]    ─┘
    %n  = aten.mul(%h1, %s)        [norm]          (ends the run)
"""

from __future__ import annotations

import operator

from torch import fx

from .builder import META_ADAPTER


def layer_of(node: fx.Node, layers: frozenset[str], prefix: str) -> str | None:
    """The outermost of ``layers`` (module paths) that ``node`` ran in, if any."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = path[len(prefix):] if prefix and path.startswith(prefix) else path
        if path in layers:
            return path
    return None


def layer_runs(graph: fx.Graph, layers: frozenset[str], prefix: str) -> list[list[fx.Node]]:
    """Maximal runs of nodes of one of ``layers``, each from its first node to its last.

    State reads (``get_attr``) never join a run; nodes peftc inserted join the run
    around them; any other node ends the run it falls in.
    """
    runs: list[list[fx.Node]] = []
    run: list[fx.Node] = []
    layer: str | None = None
    pending: list[fx.Node] = []  # peftc's nodes since the run's last node

    def close():
        nonlocal run, layer
        if run:
            runs.append(run)
        run, layer = [], None
        pending.clear()

    for node in graph.nodes:
        if node.op == "get_attr":
            continue
        here = layer_of(node, layers, prefix) if node.op == "call_function" else None
        if here is not None and here == layer:
            run += pending + [node]
            pending.clear()
        elif here is not None:
            close()
            run, layer = [node], here
        elif run and node.op == "call_function" and META_ADAPTER in node.meta:
            pending.append(node)
        else:
            close()
    close()
    return runs


def region_graph(run: list[fx.Node], reads: frozenset[fx.Node] = frozenset()) -> tuple[fx.Graph, list, list]:
    """``run`` copied into a graph of its own: ``(graph, inputs, outputs)``.

    Every value ``run`` uses from outside becomes a placeholder (``inputs``, in order),
    except the state ``reads`` (``get_attr`` nodes), which the region reads itself;
    it returns, as one tuple, each of its nodes used outside (``outputs``).
    """
    members = set(run)
    inputs: dict[fx.Node, None] = {}
    for node in run:
        fx.node.map_arg((node.args, node.kwargs),
                        lambda n: inputs.setdefault(n) if n not in members and n not in reads else None)
    outputs = [n for n in run if any(user not in members for user in n.users)]
    sub = fx.Graph()
    local: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        local[node] = sub.placeholder(node.name)
        local[node].meta = dict(node.meta)

    def arg(n: fx.Node) -> fx.Node:
        if n not in local:  # one of the reads
            local[n] = sub.get_attr(n.target)
            local[n].meta = dict(n.meta)
        return local[n]

    for node in run:
        local[node] = sub.node_copy(node, arg)
    sub.output(tuple(local[n] for n in outputs))
    return sub, list(inputs), outputs


def map_outputs(graph: fx.Graph, call: fx.Node, outputs: list[fx.Node], env: dict) -> None:
    """Map each of a region's ``outputs`` in ``env`` to its item of ``call``'s result in ``graph``."""
    for i, node in enumerate(outputs):
        env[node] = graph.call_function(operator.getitem, (call, i))
        env[node].meta = dict(node.meta)
