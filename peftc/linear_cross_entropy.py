"""Cross-entropy of a linear layer's output, chunked over tokens: the logits are never whole.

``linear_cross_entropy(h, W, b, target)`` equals
``F.cross_entropy(F.linear(h, W, b).to(dtype), target, ignore_index=..., reduction=...)``
(mean or sum) but holds at most ``chunk`` rows of logits at a time. The
forward computes the gradients too, one chunk after another
(``softmax - onehot`` is all the loss's backward needs), and keeps only
``dh`` (``[tokens, hidden]``) and, for a trained head, ``dW`` and ``db``:
backward multiplies them by the incoming scalar. That costs the same two
matmuls per chunk as the unfused forward and backward, and none of the
``[tokens, vocab]`` tensors the unfused graph keeps (the logits, their float
copy and the log-softmax).

It is a ``torch.library`` custom op with its autograd registered, so
``torch.compile`` (``fullgraph=True``, dynamic shapes) and ``torch.export``
see one opaque node with a known output shape. Gradients are computed only
for the inputs that need them (decided when the op is called, outside it).
"""

from __future__ import annotations

import torch
from torch import Tensor

MEAN, SUM = 1, 2  # aten's reduction codes


@torch.library.custom_op("peftc::linear_cross_entropy", mutates_args=())
def _fused(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int, reduction: int,
           chunk: int, float64: bool, grad_h: bool, grad_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = torch.float64 if float64 else torch.float32
    total = torch.zeros((), dtype=dtype, device=h.device)
    count = torch.zeros((), dtype=torch.int64, device=h.device)
    dh = torch.empty_like(h) if grad_h else h.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=dtype, device=h.device) if grad_weight else h.new_empty(0)
    db = torch.zeros(weight.shape[0], dtype=dtype, device=h.device) if grad_weight and bias is not None \
        else h.new_empty(0)
    for start in range(0, h.shape[0], chunk):
        hc, tc = h[start:start + chunk], target[start:start + chunk]
        z = torch.nn.functional.linear(hc, weight, bias).to(dtype)
        valid = tc != ignore_index
        picked = torch.where(valid, tc, 0).unsqueeze(1)
        target_logit = z.gather(1, picked).squeeze(1)
        # log-sum-exp and softmax in four passes over the chunk, in place: max, shift and exp, sum, scale
        top = z.amax(dim=1, keepdim=True)
        g = z.sub_(top).exp_()
        norm = g.sum(dim=1, keepdim=True)
        lse = (top + norm.log()).squeeze(1)
        total += torch.where(valid, lse - target_logit, 0).sum()
        count += valid.sum()
        if not (grad_h or grad_weight):
            continue
        g.mul_(valid.unsqueeze(1) / norm)  # softmax on counted rows, 0 on ignored ones
        g.scatter_add_(1, picked, -valid.unsqueeze(1).to(dtype))  # minus the one-hot target
        if grad_h:
            dh[start:start + chunk] = g.to(weight.dtype) @ weight
        if grad_weight:
            dw += g.T @ hc.to(dtype)
            if bias is not None:
                db += g.sum(0)
    scale = 1 / count.to(dtype) if reduction == MEAN else torch.ones((), dtype=dtype, device=h.device)
    loss = total * scale
    if grad_h:
        dh.mul_(scale.to(dh.dtype))
    return loss, dh, (dw * scale).to(weight.dtype), (db * scale).to(weight.dtype)


@_fused.register_fake
def _(h, weight, bias, target, ignore_index, reduction, chunk, float64, grad_h, grad_weight):
    loss = h.new_empty((), dtype=torch.float64 if float64 else torch.float32)
    dh = torch.empty_like(h) if grad_h else h.new_empty(0)
    dw = torch.empty_like(weight) if grad_weight else h.new_empty(0)
    db = weight.new_empty(weight.shape[0]) if grad_weight and bias is not None else h.new_empty(0)
    return loss, dh, dw, db


def _setup(ctx, inputs, output):
    _, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.grad_h, ctx.grad_weight, ctx.bias = inputs[8], inputs[9], inputs[2] is not None


def _backward(ctx, grad_loss, *_):
    dh, dw, db = ctx.saved_tensors
    out_h = dh * grad_loss.to(dh.dtype) if ctx.grad_h else None
    out_w = dw * grad_loss.to(dw.dtype) if ctx.grad_weight else None
    out_b = db * grad_loss.to(db.dtype) if ctx.grad_weight and ctx.bias else None
    return out_h, out_w, out_b, None, None, None, None, None, None, None


_fused.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, *,
                         ignore_index: int = -100, reduction: int = MEAN, chunk: int = 1024,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """``cross_entropy(linear(h, weight, bias).to(dtype), target)`` without the whole logits.

    Arguments:
        h: ``[tokens, hidden]``; weight: ``[vocab, hidden]``; bias: ``[vocab]`` or None;
        target: ``[tokens]`` class indices, ``ignore_index`` where no loss is taken.
        reduction: aten's code, 1 (mean over the counted tokens) or 2 (sum).
        chunk: tokens per chunk of logits.
        dtype: the logits' dtype for the softmax (float32 or float64), as the unfused graph casts them.

    Returns:
        The loss, a scalar of ``dtype``.
    """
    grad = torch.is_grad_enabled()
    loss, *_ = _fused(h, weight, bias, target, ignore_index, reduction, chunk, dtype == torch.float64,
                      grad and h.requires_grad,
                      grad and (weight.requires_grad or (bias is not None and bias.requires_grad)))
    return loss
