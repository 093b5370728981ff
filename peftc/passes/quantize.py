"""Read quantized weights with bitsandbytes' kernels: the linear ops of 4-bit and 8-bit weights, rewritten.

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

An 8-bit weight's op becomes ``peftc.linear_8bit(%x, %int8, %scales, threshold,
training, %b)``, which runs bitsandbytes' own LLM.int8() matmul (``bnb.matmul``)
as ``Linear8bitLt`` does in the same mode, outlier threshold included; its input
gradient multiplies by the dequantized rows, as bitsandbytes' backward does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from ..sites import linear_use
from ..storage import bits, is_packed, parts

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


@torch.library.custom_op("peftc::linear_8bit", mutates_args=())
def linear_8bit(x: torch.Tensor, int8: torch.Tensor, row_scales: torch.Tensor, threshold: float, training: bool,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for an 8-bit ``W`` (``int8`` rows times ``row_scales / 127``), by
    bitsandbytes' ``matmul`` with the state a ``Linear8bitLt`` holds (its ``threshold`` and mode)."""
    import bitsandbytes as bnb

    state = bnb.MatmulLtState()
    state.CB, state.SCB, state.threshold = int8, row_scales, threshold
    state.has_fp16_weights, state.is_training = False, training
    return bnb.matmul(x, int8, bias=None if bias is None else bias.to(x.dtype), state=state)


@linear_8bit.register_fake
def _(x, int8, row_scales, threshold, training, bias=None):
    return x.new_empty((*x.shape[:-1], int8.shape[0]))


def _setup_8bit(ctx, inputs, output):
    x, int8, row_scales, _, _, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(int8, row_scales)


def _backward_8bit(ctx, grad):
    int8, row_scales = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:  # bitsandbytes' rows, dequantized in the gradient's dtype
        weight = int8.to(grad.dtype).mul_(row_scales.unsqueeze(1).mul(1.0 / 127.0))
        grad_x = grad @ weight
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, grad_bias


linear_8bit.register_autograd(_backward_8bit, setup_context=_setup_8bit)


def _quantized_call(weight, x, reads: dict[str, fx.Node], bias, training: bool) -> tuple:
    """The target and arguments of the op that reads ``weight`` from its storage ``reads``."""
    if bits(weight) == 8:
        threshold = float(weight.module.state.threshold)
        return torch.ops.peftc.linear_8bit.default, (x, reads["int8"], reads["scales"], threshold, training, bias)
    state = weight.quant_state
    return torch.ops.peftc.linear_4bit.default, (
        x, reads["packed"], reads["absmax"], state.blocksize, state.quant_type, list(state.shape), state.dtype, bias,
        *(reads.get(role) for role in _OPTIONAL))


def quantize_reads(gm: fx.GraphModule, prefix: str = "", training: bool = False) -> int:
    """Rewrite every ``aten.linear`` whose weight is quantized into ``peftc::linear_4bit`` or
    ``peftc::linear_8bit``; return how many.

    Arguments:
        prefix: what the graph's parameter names carry in front of the model's own.
        training: the mode the graph was traced in (bitsandbytes' 8-bit matmul depends on it).
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
        node.target, node.args = _quantized_call(weight, x, reads, bias, training)
        if not use.weight.users:  # a quantized weight is read through its parts only
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
