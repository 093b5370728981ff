"""LoHa (PEFT's ``LoHaConfig``): a Hadamard product of two low-rank matrices as the weight delta.

``delta = ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / r``, ``[out, in]``, added as
``linear(x, delta)`` (the graph is drawn in :mod:`peftc.adapters.lycoris`). PEFT's
initialisation: ``w1_a``, ``w1_b``, ``w2_a`` Kaiming-uniform, ``w2_b`` zeros (a no-op at the
start); with ``init=False`` all four are Kaiming-uniform. Saved under PEFT's names
``hada_w1_a`` ``[out, r]``, ``hada_w1_b`` ``[r, in]``, ``hada_w2_a``, ``hada_w2_b``.

At a convolution ``in`` counts ``in / groups * prod(kernel)``; with ``use_effective_conv2d``
(a kernel larger than 1) each product is instead ``einsum(t [r, r, *k], w_b [r, in / groups],
w_a [r, out])``, ``[out, in / groups, *k]``, with Kaiming-uniform cores ``hada_t1``, ``hada_t2``.
"""

from __future__ import annotations

import math

from torch import nn

from .lycoris import Lycoris, peft_options

_INITS = (True, False)


class LoHa(Lycoris):
    """Low-rank Hadamard-product adaptation of linear-like ops.

    Arguments:
        r: rank of each of the two factor pairs, > 0.
        alpha: scaling numerator; ``scaling = alpha / r``.
        rank_dropout: in training, the probability of dropping each output row of the
            delta (the kept rows rescaled by the mask's mean, as PEFT does).
        module_dropout: in training, the probability of skipping the adapter for a forward call.
        init: ``True`` (``w2_b`` zeros: a no-op at the start) or ``False`` (all random).
        rank_pattern, alpha_pattern: ``{pattern: value}`` overrides by module path, as PEFT matches them.
    """

    kind = "loha"
    label = "LoHa"

    def __init__(self, r: int = 8, alpha: float = 8, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 init: bool = True, rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                 use_effective_conv2d: bool = False):
        super().__init__(r, alpha, rank_dropout, module_dropout, init, rank_pattern, alpha_pattern, _INITS,
                         use_effective_conv2d)

    @classmethod
    def from_peft(cls, config: dict) -> LoHa:
        """The spec a PEFT ``LoHaConfig`` dict describes."""
        return cls(**peft_options(config))

    def factors(self, r, site):
        out_f, in_f = site.out_features, site.in_features
        if self.effective_conv(site):
            conv = site.conv
            core = (r, r, *(conv.kernel + (1,))[:2])  # PEFT's Conv1d core is [r, r, k, 1]
            return {"hada_t1": core, "hada_w1_a": (r, out_f), "hada_w1_b": (r, in_f // conv.groups),
                    "hada_t2": core, "hada_w2_a": (r, out_f), "hada_w2_b": (r, in_f // conv.groups)}
        if site.conv is not None:
            in_f = in_f // site.conv.groups * math.prod(site.conv.kernel)
        return {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_f), "hada_w2_a": (out_f, r), "hada_w2_b": (r, in_f)}

    def initialise(self, state):
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
            if name == "hada_w2_b" and self.init:
                nn.init.zeros_(state.hada_w2_b)
            elif hasattr(state, name):
                nn.init.kaiming_uniform_(getattr(state, name), a=math.sqrt(5))

    def delta(self, ops, state):
        if hasattr(state, "hada_t1"):  # [out, in, k1, k2]: each core taken to out and in channels
            w1 = ops.einsum("ijkl,jr,ip->prkl", ops.get("hada_t1"), ops.get("hada_w1_b"), ops.get("hada_w1_a"))
            w2 = ops.einsum("ijkl,jr,ip->prkl", ops.get("hada_t2"), ops.get("hada_w2_b"), ops.get("hada_w2_a"))
        else:
            w1 = ops.mm(ops.get("hada_w1_a"), ops.get("hada_w1_b"))
            w2 = ops.mm(ops.get("hada_w2_a"), ops.get("hada_w2_b"))
        return ops.mul(ops.mul(w1, w2), ops.get("scaling"))
