"""IA³: learned vectors that rescale an op's output, or (feed-forward sites) its input.

PEFT's semantics: at an ordinary site the op's output is scaled, ``y * l``; at
a ``feedforward_modules`` site its input is, ``W (x * l) + b``. Vectors start
as ones, so a new adapter changes nothing. The state is PEFT's ``ia3_l``, shaped
as PEFT shapes it: ``[out, 1]`` after the op, ``[1, in]`` before it.

The gate selects the *scale*, not the activation: rows where the adapter is off
are multiplied by exactly 1, so NaN or inf in an inactive vector reaches
neither the output nor (in training) any gradient upstream::

    y = aten.linear(x, W, b)          s  = aten.view(ia3_l, [-1])
                               ==>    s  = aten.where(row_mask, s, 1)     # [rows, 1, out]
                                      y  = aten.linear(x, W, b)
                                      y2 = aten.mul(y, s)                  # float32, cast back

    (feedforward)                     xs = aten.mul(x, where(row_mask, s, 1))
                                      y  = aten.linear(xs, W, b)

Merging is multiplicative: ``diag(l) W`` and ``b * l`` after the op, ``W diag(l)``
before it (the weight's layout decides whether ``l`` runs along its rows or
columns). ``unmerge_delta`` divides by ``l`` again, which a zero in ``l`` makes
impossible: unmerging then refuses instead of writing inf.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MergeError, RuleError
from .base import Adapter

aten = torch.ops.aten


class IA3State(nn.Module):
    """One site's scaling vector ``ia3_l`` (``[out, 1]``, or ``[1, in]`` for feed-forward)."""

    def __init__(self, shape: tuple[int, int], dtype, device):
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))


class IA3(Adapter):
    """IA³ scaling of linear-like ops.

    Arguments:
        feedforward: scale the op's input (PEFT's ``feedforward_modules``) instead of its output.
        init: ``True``: vectors of ones (a no-op at the start, PEFT's ``init_ia3_weights``);
            ``False``: standard-normal vectors, as PEFT draws them.
    """

    kind = "ia3"
    # the gate selects the scale (``where(gate, l, 1)``) rather than the whole activation
    gates_itself = True

    def __init__(self, feedforward: bool = False, init: bool = True):
        if not isinstance(feedforward, bool):
            raise RuleError(f"IA3 feedforward={feedforward!r} must be True or False")
        if not isinstance(init, bool):
            raise RuleError(f"IA3 init={init!r} must be True (ones) or False (random normal)")
        self.feedforward, self.init = feedforward, init
        self.position = "before" if feedforward else "after"  # per spec; the insert pass reads it

    def unsupported(self, site):
        if not site.is_linear:
            return f"IA3 scales linear-like ops (linear, addmm, mm, matmul), not {site.op}"
        return None

    def init_state(self, site) -> IA3State:
        dtype = site.dtype if site.dtype == torch.float64 else torch.float32
        shape = (1, site.in_features) if self.feedforward else (site.out_features, 1)
        state = IA3State(shape, dtype, site.device)
        if not self.init:
            with torch.no_grad():
                nn.init.normal_(state.ia3_l)
        return state

    def emit(self, b, site):
        scale = b.call(aten.view.default, b.param("ia3_l"), [-1])
        # x and y of a linear-like op have the same rank; the op's own output carries it
        mask = b.row_mask(b.x if self.feedforward else b.y, b.node.meta["val"].dim())
        scale = b.call(aten.where.ScalarOther, mask, scale, 1.0)
        if self.feedforward:  # x * l in the vector's dtype, then back, as PEFT computes it
            x = b.cast(b.call(aten.mul.Tensor, b.cast(b.x, b.dtype_of(scale)), scale), b.dtype_of(b.x))
            b.replace_input(list(b.node.args).index(b.x), x)
            return b.y
        return b.cast(b.call(aten.mul.Tensor, b.y, scale), site.dtype)

    def _deltas(self, site, state, weights, factor):
        """``{name: W * factor(l)}`` for the weight (and, after the op, the bias)."""
        w = weights[site.weight_name]
        s = state.ia3_l.detach().to(w).flatten()
        along_rows = (site.layout == "out_in") != self.feedforward  # l indexes the weight's rows?
        out = {site.weight_name: w * factor(s.view(-1, 1) if along_rows else s.view(1, -1))}
        if not self.feedforward and site.has_bias and site.bias_name:
            out[site.bias_name] = weights[site.bias_name] * factor(s)
        return out

    def merge_delta(self, site, state, weights):  # W' = W l: add W (l - 1)
        return self._deltas(site, state, weights, lambda s: s - 1)

    def unmerge_delta(self, site, state, weights):  # W = W' / l: subtract W' (1 - 1/l)
        zeros = int((state.ia3_l == 0).sum())
        if zeros:
            raise MergeError(
                f"IA3 at {site.path} has {zeros} zero scale(s): merging it erased those weights, so it "
                "can't be unmerged. Reload the base weights instead; nothing was changed"
            )
        return self._deltas(site, state, weights, lambda s: 1 - 1 / s)

    def saved_state(self, site, state, prefix):
        return {f"{prefix}ia3_l": state.ia3_l}

    def config(self):
        return {"kind": self.kind, "feedforward": self.feedforward, "init": self.init}

    def __repr__(self):
        return f"IA3(feedforward={self.feedforward})"
