"""Read 4-bit packed weights with bitsandbytes' kernels: the linear ops of quantized weights, rewritten.

A traced graph reads a quantized linear as the float linear it stands for
(:func:`peftc.quantization.float_view`); adapters are inserted on that. This
pass then makes each such op read the packed storage, in place (the node stays,
so the adapter nodes that use its output are untouched)::

    %w = get_attr[fc.weight]                %q = get_attr[peftc_kbit.fc.packed]
    %y = aten.linear(%x, %w, %b)    ==>     %s = get_attr[peftc_kbit.fc.absmax]
                                            %y = peftc.linear_4bit(%x, %q, %s, 64, "nf4", [out, in], f32, %b)

``peftc::linear_4bit`` runs ``bitsandbytes::gemm_4bit`` forward (as
bitsandbytes' own ``Linear4bit`` does) and, for the input's gradient,
dequantizes the weight again with ``bitsandbytes::dequantize_4bit``: autograd
keeps only the packed weight, never a float copy, as bitsandbytes' ``MatMul4Bit``
does. The storage tensors are the model's own (``peftc_kbit`` holds them under
the graph module; never copies), so a merge that writes them in place is read
by every graph at once. :func:`restore_reads` undoes the pass exactly, for rebuilding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from ..sites import linear_use
from ..storage import is_packed, parts

KBIT_ROOT = "peftc_kbit"  # attribute of the graph module that holds the packed weights' tensors
META_KBIT = "peftc_kbit"  # on a rewritten op: its original (target, args, weight read's target)
_OPTIONAL = ("absmax2", "code2", "offset")


@torch.library.custom_op("peftc::linear_4bit", mutates_args=())
def linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                shape: Sequence[int], dtype: torch.dtype, bias: torch.Tensor | None = None,
                absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a 4-bit packed ``W`` (of ``shape``, quantized from ``dtype``).

    With double quantization ``absmax`` holds the scales' scales (``absmax2`` the
    8-bit scale codes, ``code2`` their table, ``offset`` their mean), as
    bitsandbytes' ``gemm_4bit`` takes them.
    """
    if absmax2 is None:
        return torch.ops.bitsandbytes.gemm_4bit.default(x, packed, list(shape), absmax, blocksize, quant_type,
                                                         bias=bias)
    return torch.ops.bitsandbytes.gemm_4bit.default(x, packed, list(shape), absmax2, blocksize, quant_type, bias=bias,
                                                     absmax_8bit=absmax, absmax_code=code2, absmax_offset=offset)


@linear_4bit.register_fake
def _(x, packed, absmax, blocksize, quant_type, shape, dtype, bias=None, absmax2=None, code2=None, offset=None):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _dequantized(packed, absmax, blocksize, quant_type, shape, dtype, absmax2, code2, offset) -> torch.Tensor:
    """The float weight, as bitsandbytes' ``dequantize_4bit`` computes it (scales first, when nested)."""
    if absmax2 is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, absmax2, code2, 256, torch.float32)
        absmax = absmax + offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, quant_type, list(shape), dtype)


def _setup(ctx, inputs, output):
    x, packed, absmax, blocksize, quant_type, shape, dtype, bias, absmax2, code2, offset = inputs
    ctx.args = (blocksize, quant_type, shape, dtype)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(packed, absmax, absmax2, code2, offset)


def _backward(ctx, grad):
    packed, absmax, absmax2, code2, offset = ctx.saved_tensors
    blocksize, quant_type, shape, dtype = ctx.args
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = _dequantized(packed, absmax, blocksize, quant_type, shape, dtype, absmax2, code2, offset)
        grad_x = grad @ weight.to(grad.dtype)
    if ctx.has_bias and ctx.needs_input_grad[7]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, None, grad_bias, None, None, None


linear_4bit.register_autograd(_backward, setup_context=_setup)


def quantize_reads(gm: fx.GraphModule, prefix: str = "") -> int:
    """Rewrite every ``aten.linear`` whose weight is packed into ``peftc::linear_4bit``; return how many.

    Arguments:
        prefix: what the graph's parameter names carry in front of the model's own.
    """
    if not any(is_packed(p) for p in gm.parameters()):
        return 0
    holder = nn.Module()
    gm.add_module(KBIT_ROOT, holder)
    count = 0
    for node in list(gm.graph.nodes):
        if node.target != torch.ops.aten.linear.default:
            continue
        use = linear_use(node)
        if use is None:
            continue
        weight = gm.get_parameter(use.weight.target)
        if not is_packed(weight):
            continue
        state = weight.quant_state
        key = use.weight.target.removeprefix(prefix).replace(".", "_")
        tensors = parts(weight)
        slot = nn.Module()
        for role, tensor in tensors.items():
            slot.register_buffer(role, tensor, persistent=False)
        holder.add_module(key, slot)
        x, _, *rest = node.args
        bias = rest[0] if rest else None
        with gm.graph.inserting_before(node):
            reads = {role: gm.graph.get_attr(f"{KBIT_ROOT}.{key}.{role}") for role in tensors}
        node.meta[META_KBIT] = (node.target, node.args, use.weight.target)
        node.target = torch.ops.peftc.linear_4bit.default
        node.args = (x, reads["packed"], reads["absmax"], state.blocksize, state.quant_type, list(state.shape),
                     state.dtype, bias, *(reads.get(role) for role in _OPTIONAL))
        if not use.weight.users:  # a packed Params4bit is read through its parts only
            gm.graph.erase_node(use.weight)
        count += 1
    if count:
        gm.recompile()
    else:
        delattr(gm, KBIT_ROOT)
    return count


def restore_reads(gm: fx.GraphModule) -> int:
    """Undo :func:`quantize_reads`: each rewritten op is an ``aten.linear`` of its weight again."""
    count = 0
    for node in list(gm.graph.nodes):
        if META_KBIT not in node.meta:
            continue
        target, args, weight_target = node.meta.pop(META_KBIT)
        reads = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"
                 and a.target.startswith(KBIT_ROOT + ".")]
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(weight_target)
        node.target, node.args = target, (args[0], weight, *args[2:])
        for read in reads:
            if not read.users:
                gm.graph.erase_node(read)
        count += 1
    if count:
        delattr(gm, KBIT_ROOT)
        gm.recompile()
    return count
