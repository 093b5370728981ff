"""LoHa (PEFT's ``LoHaConfig``): a Hadamard product of two low-rank matrices as the weight delta.

``delta = ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / r``, ``[out, in]``, added as
``linear(x, delta)`` (the graph is drawn in :mod:`peftc.adapters.lycoris`). PEFT's
initialisation: ``w1_a``, ``w1_b``, ``w2_a`` Kaiming-uniform, ``w2_b`` zeros (a no-op at the
start); with ``init=False`` all four are Kaiming-uniform. Saved under PEFT's names
``hada_w1_a`` ``[out, r]``, ``hada_w1_b`` ``[r, in]``, ``hada_w2_a``, ``hada_w2_b``.
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
                 init: bool = True, rank_pattern: dict | None = None, alpha_pattern: dict | None = None):
        super().__init__(r, alpha, rank_dropout, module_dropout, init, rank_pattern, alpha_pattern, _INITS)

    @classmethod
    def from_peft(cls, config: dict) -> LoHa:
        """The spec a PEFT ``LoHaConfig`` dict describes (``use_effective_conv2d`` concerns only
        convolutions, which peftc doesn't adapt with LoHa)."""
        return cls(**peft_options(config))

    def factors(self, r, out_features, in_features):
        return {"hada_w1_a": (out_features, r), "hada_w1_b": (r, in_features),
                "hada_w2_a": (out_features, r), "hada_w2_b": (r, in_features)}

    def initialise(self, state):
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            if name == "hada_w2_b" and self.init:
                nn.init.zeros_(state.hada_w2_b)
            else:
                nn.init.kaiming_uniform_(getattr(state, name), a=math.sqrt(5))

    def delta(self, ops, state):
        w1 = ops.mm(ops.get("hada_w1_a"), ops.get("hada_w1_b"))
        w2 = ops.mm(ops.get("hada_w2_a"), ops.get("hada_w2_b"))
        return ops.mul(ops.mul(w1, w2), ops.get("scaling"))
