"""Give a bias-less ``aten.linear`` the bias that merging a BitFit delta created.

::

    %y = aten.linear(%x, %W)    ==>    %b = get_attr[fc.bias]
                                       %y = aten.linear(%x, %W, %b)

:func:`detach_biases` is the inverse, for ``unmerge``.
"""

from __future__ import annotations

from torch import fx, nn

from ..sites import find_sites
from .builder import META_BIAS


def attach_biases(gm: fx.GraphModule, model: nn.Module, created: list[str], prefix: str = "") -> int:
    """Wire each created bias (a path in ``model``) into the linear ops of its module."""
    if not created:
        return 0
    by_module = {path.rpartition(".")[0]: path for path in created}
    nodes = {n.name: n for n in gm.graph.nodes}
    count = 0
    for site in find_sites(gm, model, prefix):
        bias_path = by_module.get(site.path)
        if bias_path is None or site.op != "aten.linear.default" or site.has_bias:
            continue
        module_path, _, name = (prefix + bias_path).rpartition(".")
        gm.get_submodule(module_path).register_parameter(name, model.get_parameter(bias_path))
        for node_name in site.nodes:
            node = nodes[node_name]
            with gm.graph.inserting_before(node):
                bias = gm.graph.get_attr(prefix + bias_path)
            bias.meta[META_BIAS] = True
            node.args = (*node.args[:2], bias)
            count += 1
    gm.recompile()
    return count


def detach_biases(gm: fx.GraphModule) -> int:
    """Remove the biases :func:`attach_biases` wired in."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.meta.get(META_BIAS):
            for user in list(node.users):
                user.args = user.args[:2]
            module_path, _, name = node.target.rpartition(".")
            gm.get_submodule(module_path).register_parameter(name, None)
            gm.graph.erase_node(node)
            count += 1
    gm.recompile()
    return count
