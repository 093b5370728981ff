"""BitFit: train a bias delta at each linear-like op, creating a bias where there was none.

::

    y = aten.linear(x, W)          y  = aten.linear(x, W)
                           ==>     y2 = aten.add(y, aten.where(gate, peftc.<name>.<path>.bias, 0))

``merge()`` adds the delta into the op's bias (creating a zero bias on the
module first when it has none); ``unmerge()`` takes it out again and removes a
bias it created. On disk the delta is ``base_model.model.<path>.bitfit.bias``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, widen

aten = torch.ops.aten


class BitFitState(nn.Module):
    def __init__(self, out_features: int, dtype, device):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))


class BitFit(Adapter):
    """Bias-only tuning: a trainable bias delta per linear-like op (zeros at the start)."""

    kind = "bitfit"
    # the gate selects the bias delta or 0 (``where``, then add): an inactive delta's values,
    # NaN or inf included, never reach the output, and the gate costs a few elements
    gates_itself = True

    def unsupported(self, site):
        if not site.is_linear:
            return f"BitFit supports linear-like ops (linear, addmm, mm, matmul), not {site.op}"
        return None

    def init_state(self, site) -> BitFitState:
        dtype = site.dtype if site.dtype == torch.float64 else torch.float32
        return BitFitState(site.out_features, dtype, site.device)

    def emit(self, b, site):
        bias = b.cast(b.gated(b.param("bias"), b.y), site.dtype)
        return b.call(aten.add.Tensor, b.y, bias)

    def merge_delta(self, site, state, weights):
        return {site.bias_name_or_default: widen(state.bias.detach())}

    def saved_state(self, site, state, prefix):
        return {f"{prefix}bitfit.bias": state.bias}

    def config(self):
        return {"kind": self.kind}

    def __repr__(self):
        return "BitFit()"
