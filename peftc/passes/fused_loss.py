"""Fuse the LM head's linear into the loss's cross-entropy, chunked over tokens.

A causal LM given ``labels`` computes ``[batch, seq, vocab]`` logits, casts
them to float32 and takes their cross-entropy; backward keeps the logits,
their float copy and the log-softmax, the largest tensors of a LoRA training
step. This pass replaces the chain by one
:func:`~peftc.linear_cross_entropy.linear_cross_entropy` node, which never
holds more than a chunk of logits::

    %logits = aten.linear(%h, %W)                   %h2   = aten.reshape(%h, [-1, hidden])
    %f      = aten.to.dtype(%logits, float32)  ==>  %loss = linear_cross_entropy(%h2, %W, None, %t,
    %flat   = aten.view(%f, [-1, vocab])                        ignore_index=-100, reduction=1, ...)
    %loss   = aten.cross_entropy_loss(%flat, %t)    return (%loss, None)
    return (%loss, %f)

The logits are no longer computed, so the model's output carries
``logits=None``. Training graphs only: an eval-mode call (``Trainer``'s
evaluation, ``compute_metrics``) keeps its logits. A user who reads
``.logits`` in training turns the pass off: ``peftc.compile(...,
optimize=peftc.Optimize(fused_loss=False))``.

Matched only where it is exact: the head is a plain ``aten.linear`` (no
adapter on it: its output would be the adapter's, not the linear's), the
cross-entropy has no class weights and no label smoothing, reduces by mean or
sum, and the logits feed nothing but the loss and the graph's output. The
input graph is left as it is: the pass returns a new graph module over the
same state.
"""

from __future__ import annotations

import torch
from torch import fx

from ..linear_cross_entropy import MEAN, SUM, linear_cross_entropy
from .derive import copied

aten = torch.ops.aten
_CROSS_ENTROPY = aten.cross_entropy_loss.default
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_CASTS = (aten.to.dtype, aten._to_copy.default)
_CHECKS = (aten._assert_tensor_metadata.default,)  # export's dtype assertions: read, compute nothing


CHUNK_LOGITS = 2**23  # logits per chunk when no chunk is given: 32 MiB in float32


def fused_loss(gm: fx.GraphModule, chunk: int | None = None) -> fx.GraphModule:
    """A graph module computing ``gm``'s loss without its logits (see the module docstring).

    Arguments:
        chunk: tokens per chunk of logits; None: ``CHUNK_LOGITS // vocab`` (at least 1).

    Returns:
        A new graph module over ``gm``'s state; ``gm`` itself when no loss matches.
    """
    if not any(_match(n) for n in gm.graph.nodes):
        return gm
    gm = copied(gm)
    graph = gm.graph
    for loss in [n for n in graph.nodes if n.target is _CROSS_ENTROPY]:
        found = _match(loss)
        if found is None:
            continue
        chain, linear, (ignore_index, reduction) = found
        h, weight = linear.args[0], linear.args[1]
        tokens = chunk or max(1, CHUNK_LOGITS // linear.meta["val"].shape[-1])
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        with graph.inserting_before(loss):
            flat = graph.call_function(aten.reshape.default, (h, [-1, h.meta["val"].shape[-1]]))
            fused = graph.call_function(linear_cross_entropy, (flat, weight, bias, loss.args[1]),
                                        {"ignore_index": ignore_index, "reduction": reduction, "chunk": tokens,
                                         "dtype": loss.meta["val"].dtype})
        fused.meta = {k: v for k, v in loss.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
        loss.replace_all_uses_with(fused)
        output = graph.output_node()
        output.args = fx.node.map_arg(output.args, lambda n, dropped=frozenset(chain): None if n in dropped else n)
        graph.erase_node(loss)
        for node in reversed(chain):
            for check in [u for u in node.users if u.target in _CHECKS]:
                graph.erase_node(check)
            graph.erase_node(node)
    gm.recompile()
    return gm


def _match(loss: fx.Node):
    """``(chain from the linear to the loss's input, the linear, (ignore_index, reduction))``
    when ``loss`` is a cross-entropy this pass can fuse; None otherwise."""
    if loss.op != "call_function" or loss.target is not _CROSS_ENTROPY:
        return None
    args = _arguments(loss)
    if args["weight"] is not None or args["label_smoothing"] != 0 or args["reduction"] not in (MEAN, SUM):
        return None
    chain, node = [], args["self"]
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEWS + _CASTS:
        if node.target in _VIEWS and len(chain) > 0:
            return None  # one flattening view, nearest the loss
        chain.append(node)
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is aten.linear.default):
        return None
    linear = node
    chain.append(linear)
    chain.reverse()  # linear first
    flat, logits = chain[-1].meta.get("val"), linear.meta.get("val")
    if not (chain[-1].target in _VIEWS and isinstance(flat, torch.Tensor) and isinstance(logits, torch.Tensor)
            and flat.dim() == 2 and flat.shape[-1] == logits.shape[-1]
            and flat.dtype in (torch.float32, torch.float64)):
        return None
    allowed = set(chain[1:]) | {loss}
    for node in chain:
        for user in node.users:
            if user not in allowed and user.op != "output" and user.target not in _CHECKS:
                return None  # the logits feed something else: keep them
    return chain, linear, (args["ignore_index"], args["reduction"])


def _arguments(node: fx.Node) -> dict:
    """``node``'s arguments by name, defaults filled in from the op's schema."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        else:
            out[arg.name] = node.kwargs.get(arg.name, arg.default_value if arg.has_default_value() else None)
    return out
