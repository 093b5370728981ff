"""LoKr (PEFT's ``LoKrConfig``): a Kronecker product of two small matrices as the weight delta.

Each side of the ``[out, in]`` weight is factored as PEFT factors it (``out = l * k``,
``in = m * n``, the factors nearest the square root, or ``decompose_factor``); then
``delta = kron(w1 [l, m], w2 [k, n]) * alpha / r``, added as ``linear(x, delta)`` (the graph
is drawn in :mod:`peftc.adapters.lycoris`). ``w2`` is a rank-``r`` product
``w2_a @ w2_b`` when ``r < max(k, n) / 2``, else a full matrix; ``w1`` likewise, only
with ``decompose_both``. Saved under PEFT's names (``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``,
``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``).

Initialisation, as PEFT's: ``init=True`` zeros ``w1`` (``w1_a``) and draws the rest
Kaiming-uniform; ``"lycoris"`` zeros ``w2`` (``w2_b``) instead; ``False`` draws everything.

At a convolution ``in`` is ``in / groups``; ``w2`` carries the kernel: full ``[k, n, *kernel]``,
or ``w2_a [k, r] @ w2_b [r, n * prod(kernel)]``, or with ``use_effective_conv2d`` (a kernel
larger than 1) ``einsum(t2 [r, r, *k], w2_a [r, k], w2_b [r, n])``; ``w1`` then gains unit
kernel dims for the Kronecker product, as PEFT's does.
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import RuleError
from .lycoris import Lycoris, peft_options

_INITS = (True, False, "lycoris")


def factorize(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)``, ``m <= n``, ``m * n == dimension``: ``factor`` and the rest when it divides
    ``dimension``, else the divisor pair nearest the square root with ``m`` at most
    ``factor`` (any ``m`` when ``factor`` is -1), PEFT's ``factorization``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    for d in range(2, dimension + 1):
        if m >= n or d > limit:
            break
        if dimension % d == 0:
            m, n = d, dimension // d
    return min(m, n), max(m, n)


class LoKr(Lycoris):
    """Low-rank Kronecker-product adaptation of linear-like ops.

    Arguments:
        r, alpha, rank_dropout, module_dropout, rank_pattern, alpha_pattern: as for
            :class:`~peftc.LoHa`, except that rank dropout rescales only with ``rank_dropout_scale``.
        init: ``True``, ``"lycoris"`` or ``False`` (see the module's docstring).
        decompose_both: factor ``w1`` as a rank-``r`` product too, when small enough.
        decompose_factor: the factor to split each dimension by (-1: nearest the square root).
        rank_dropout_scale: divide the rank-dropout mask by its mean.
    """

    kind = "lokr"
    label = "LoKr"

    def __init__(self, r: int = 8, alpha: float = 8, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 init=True, rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                 decompose_both: bool = False, decompose_factor: int = -1, rank_dropout_scale: bool = False,
                 use_effective_conv2d: bool = False):
        super().__init__(r, alpha, rank_dropout, module_dropout, init, rank_pattern, alpha_pattern, _INITS,
                         use_effective_conv2d)
        for what, value in (("decompose_both", decompose_both), ("rank_dropout_scale", rank_dropout_scale)):
            if not isinstance(value, bool):
                raise RuleError(f"LoKr {what}={value!r} must be True or False")
        if isinstance(decompose_factor, bool) or not isinstance(decompose_factor, int):
            raise RuleError(f"LoKr decompose_factor={decompose_factor!r} must be an integer (-1: near the square root)")
        self.decompose_both, self.decompose_factor = decompose_both, decompose_factor
        self.rank_dropout_scale = rank_dropout_scale

    @classmethod
    def from_peft(cls, config: dict) -> LoKr:
        """The spec a PEFT ``LoKrConfig`` dict describes."""
        return cls(**peft_options(config), decompose_both=config.get("decompose_both", False),
                   decompose_factor=config.get("decompose_factor", -1),
                   rank_dropout_scale=config.get("rank_dropout_scale", False))

    def factors(self, r, site):
        # out = a * b, in = c * d; w1 is [a, c] and w2 [b, d], so kron(w1, w2) is [out, in]
        conv = site.conv
        kernel = conv.kernel if conv is not None else ()
        in_features = site.in_features // conv.groups if conv is not None else site.in_features
        (a, b), (c, d) = factorize(site.out_features, self.decompose_factor), factorize(in_features, self.decompose_factor)
        out = {}
        if self.decompose_both and r < max(a, c) / 2:
            out.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
        else:
            out.update(lokr_w1=(a, c))
        if r >= max(b, d) / 2:
            out.update(lokr_w2=(b, d, *kernel))
        elif self.effective_conv(site):  # PEFT's order: t2 first; its Conv1d core is [r, r, k, 1]
            out = {**out, "lokr_t2": (r, r, *(kernel + (1,))[:2]), "lokr_w2_a": (r, b), "lokr_w2_b": (r, d)}
        else:
            out.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
        return out

    def initialise(self, state):
        # PEFT's order of draws: w1 (or w1_a, w1_b), then w2 (or, for "lycoris", w2_b before w2_a)
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[self.init]
        order = ["lokr_w1", "lokr_w1_a", "lokr_w1_b"]
        order += ["lokr_w2", "lokr_w2_b", "lokr_w2_a"] if self.init == "lycoris" else ["lokr_w2", "lokr_w2_a", "lokr_w2_b"]
        order.append("lokr_t2")
        for name in order:
            if hasattr(state, name):
                p = getattr(state, name)
                nn.init.zeros_(p) if name in zero else nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta(self, ops, state):
        if hasattr(state, "lokr_w1"):
            w1, w1_shape = ops.get("lokr_w1"), state.lokr_w1.shape
        else:
            w1 = ops.mm(ops.get("lokr_w1_a"), ops.get("lokr_w1_b"))
            w1_shape = (state.lokr_w1_a.shape[0], state.lokr_w1_b.shape[1])
        if hasattr(state, "lokr_w2"):
            w2, w2_dims = ops.get("lokr_w2"), state.lokr_w2.dim()
        elif hasattr(state, "lokr_t2"):  # the core taken to w2's rows and columns: [b, d, k1, k2]
            w2 = ops.einsum("ijkl,ip,jr->prkl", ops.get("lokr_t2"), ops.get("lokr_w2_a"), ops.get("lokr_w2_b"))
            w2_dims = 4
        else:
            w2, w2_dims = ops.mm(ops.get("lokr_w2_a"), ops.get("lokr_w2_b")), 2
        if w2_dims == 4:  # a 2-D kernel: w1 [a, c, 1, 1] (a Conv1d's 3-D w2 meets a 2-D w1, as in PEFT)
            w1 = ops.reshape(w1, (*w1_shape, 1, 1))
        return ops.mul(ops.kron(w1, w2), ops.get("scaling"))

    def config(self):
        return {**super().config(), "decompose_both": self.decompose_both,
                "decompose_factor": self.decompose_factor, "rank_dropout_scale": self.rank_dropout_scale}

    def peft_fields(self):
        return {**super().peft_fields(), "decompose_both": self.decompose_both,
                "decompose_factor": self.decompose_factor, "rank_dropout_scale": self.rank_dropout_scale}
