"""modules_to_save: point a module's parameter reads at a trainable copy.

::

    %w = get_attr[classifier.weight]   ==>   %w = get_attr[peftc.saved.default.classifier.weight]

The original parameters stay frozen and untouched until ``merge`` copies the
trained values in (and ``unmerge`` puts the originals back).
"""

from __future__ import annotations

from torch import fx, nn

from .insert import STATE_ROOT


def swap_params(gm: fx.GraphModule, copies: dict[str, nn.Module], prefix: str, model_prefix: str = "") -> int:
    """Redirect reads of ``copies``' modules to their copies; return how many reads moved.

    Arguments:
        copies: ``{module path in the model: its trainable copy}``.
        prefix: where the copies live under the graph module's ``peftc`` state.
        model_prefix: what the graph's parameter names carry in front of the model's.
    """
    moved = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        for path in copies:
            if node.target.startswith(model_prefix + path + "."):
                rest = node.target[len(model_prefix + path) + 1:]
                node.meta["peftc_swap"] = node.target
                node.target = f"{STATE_ROOT}.{prefix}.{path}.{rest}"
                moved += 1
                break
    gm.recompile()
    return moved


def unswap_params(gm: fx.GraphModule) -> int:
    moved = 0
    for node in gm.graph.nodes:
        if "peftc_swap" in node.meta:
            node.target = node.meta.pop("peftc_swap")
            moved += 1
    gm.recompile()
    return moved
